"""Host names and addresses: splitting ``HOST[:PORT]`` and telling whether a host is this machine.

Example::

    >>> split_host_port("node2:2222")
    ('node2', 2222)
    >>> split_host_port("[::1]:22")
    ('::1', 22)
    >>> split_host_port("fe80::1")
    ('fe80::1', None)
    >>> join_host_port("::1", 22)
    '[::1]:22'
    >>> is_local_host("localhost")
    True
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket

from ..errors import ConfigError

_PORT_RE = re.compile(r"[0-9]+")
_MAX_PORT = 65535


def split_host_port(text: str) -> tuple[str, int | None]:
    """Split ``host``, ``host:22``, ``1.2.3.4:22``, ``[::1]:22`` or a bare ``::1`` into (host, port).

    Raises ConfigError for an empty host, a bad port or an unbracketed IPv6 address with junk.
    """
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"'{text}' has '[' without ']'; write IPv6 addresses as [addr] or [addr]:port")
        host, rest = text[1:close], text[close + 1:]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"unexpected '{rest}' after ']' in '{text}'; write [addr]:port")
        port = _parse_port(rest[1:], text) if rest else None
    elif text.count(":") > 1:
        # Several colons without brackets can only be a bare IPv6 address: a port needs [addr]:port.
        host, port = text, None
        if not _is_ip(host):
            raise ConfigError(f"'{text}' is not a valid IPv6 address; to give a port write [addr]:port")
    elif ":" in text:
        host, port_text = text.split(":")
        port = _parse_port(port_text, text)
    else:
        host, port = text, None
    if not host:
        raise ConfigError(f"empty host name in '{text}'; write a host name or address before the port")
    return host, port


def join_host_port(host: str, port: int | None) -> str:
    """The inverse of split_host_port: ``host``, ``host:port`` or ``[v6]:port``."""
    if port is None:
        return host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_local_host(host: str) -> bool:
    """True if ``host`` names this machine: localhost, loopback, its hostname/FQDN or an interface address.

    Names are resolved once with getaddrinfo (cached); names that do not resolve are not local.
    """
    return _is_local(_normalize(host))


def _parse_port(port_text: str, text: str) -> int:
    if not _PORT_RE.fullmatch(port_text):
        raise ConfigError(f"bad port '{port_text}' in '{text}': must be a number from 1 to {_MAX_PORT}")
    port = int(port_text)
    if not 1 <= port <= _MAX_PORT:
        raise ConfigError(f"bad port {port} in '{text}': must be from 1 to {_MAX_PORT}")
    return port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _normalize(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host.rstrip(".")


@functools.lru_cache(maxsize=1024)
def _is_local(host: str) -> bool:
    if not host:
        return False
    if host == "localhost" or host in _local_names():
        return True
    if _is_ip(host):
        return _is_local_address(host)
    return any(_is_local_address(addr) for addr in _resolve(host))


def _is_local_address(addr: str) -> bool:
    try:
        ip = ipaddress.ip_address(addr.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    return ip.is_loopback or str(ip) in _local_addresses()


def _resolve(host: str) -> set[str]:
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return set()
    return {str(info[4][0]) for info in infos}


@functools.lru_cache(maxsize=1)
def _local_names() -> frozenset[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    return frozenset(_normalize(name) for name in names if name)


@functools.lru_cache(maxsize=1)
def _local_addresses() -> frozenset[str]:
    addrs = _resolve(socket.gethostname()) | _proc_ipv4_addresses() | _proc_ipv6_addresses()
    normalized = set()
    for addr in addrs:
        try:
            normalized.add(str(ipaddress.ip_address(addr.split("%", 1)[0])))
        except ValueError:
            continue
    return frozenset(normalized)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().splitlines()
    except OSError:
        return []


def _proc_ipv4_addresses(path: str = "/proc/net/fib_trie") -> set[str]:
    """IPv4 addresses of this machine's interfaces: each ``|-- A`` followed by ``/32 host LOCAL``."""
    lines = _read_lines(path)
    found = set()
    for prev, line in zip(lines, lines[1:]):
        if line.strip() == "/32 host LOCAL" and prev.strip().startswith("|--"):
            found.add(prev.strip()[3:].strip())
    return found


def _proc_ipv6_addresses(path: str = "/proc/net/if_inet6") -> set[str]:
    """IPv6 addresses of this machine's interfaces: the first field, 32 hex digits, of each line."""
    lines = _read_lines(path)
    found = set()
    for line in lines:
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(str(ipaddress.IPv6Address(int(fields[0], 16))))
            except ValueError:
                continue
    return found


__all__ = ["is_local_host", "join_host_port", "split_host_port"]
