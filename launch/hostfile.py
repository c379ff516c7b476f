"""Parse hostfiles: MPI/DeepSpeed/Horovod ``host slots=N`` lines plus the parameter-server key ``servers=N``.

Example::

    >>> text = '''
    ... # comments and blank lines are ignored
    ... node1          slots=4 servers=1   # 4 workers and 1 server
    ... node2:2222     slots=4             # ssh port 2222
    ... 10.0.0.3       servers=2           # a server-only host
    ... [::1]:22 slots=1
    ... '''
    >>> [(h.host, h.ssh_port, h.slots, h.servers) for h in parse_hostfile(text, "hosts.txt")]
    [('node1', None, 4, 1), ('node2', 2222, 4, 0), ('10.0.0.3', None, 0, 2), ('::1', 22, 1, 0)]

A line is a host (``name``, ``name:port``, ``addr``, ``[v6]:port``) then whitespace-separated
``key=value`` tokens. Every error names the file and line: ``hosts.txt:3: unknown key 'slot' ...``.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from dataclasses import dataclass

from .hosts import join_host_port, split_host_port
from ..errors import ConfigError

KNOWN_KEYS = ("slots", "servers")
_INT_RE = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class HostEntry:
    """One hostfile line: where to ssh and how many workers (slots) and servers it takes."""

    host: str
    ssh_port: int | None
    slots: int
    servers: int
    line: int

    @property
    def address(self) -> str:
        """``host`` or ``host:port`` (``[v6]:port``), as it would be written in a hostfile."""
        return join_host_port(self.host, self.ssh_port)


def read_hostfile(path: str | os.PathLike[str]) -> tuple[HostEntry, ...]:
    """Read and parse the hostfile at ``path``; ConfigError if it cannot be read or is invalid."""
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read hostfile {name}: {e.strerror or e}; check the path given to --hostfile") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"cannot read hostfile {name}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return parse_hostfile(text, name)


def parse_hostfile(text: str, path: str = "<hostfile>") -> tuple[HostEntry, ...]:
    """Parse hostfile ``text``; ``path`` only names the file in error messages."""
    entries: list[HostEntry] = []
    seen: dict[tuple[str, int | None], int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        tokens = raw.split("#", 1)[0].split()
        if not tokens:
            continue
        entry = _parse_line(tokens, number, path)
        key = (_host_key(entry.host), entry.ssh_port)
        if key in seen:
            raise ConfigError(
                f"{path}:{number}: host '{entry.address}' is listed twice, on lines {seen[key]} and {number}; "
                f"merge them into one line")
        seen[key] = number
        entries.append(entry)
    if not entries:
        raise ConfigError(f"{path}: no hosts: the file is empty or only has comments; "
                          f"add a line like 'node1 slots=4 servers=1'")
    return tuple(entries)


def _parse_line(tokens: list[str], number: int, path: str) -> HostEntry:
    where = f"{path}:{number}"
    first = tokens[0]
    if "=" in first:
        raise ConfigError(f"{where}: empty host: the line starts with '{first}'; "
                          f"start it with a host name, e.g. 'node1 {first}'")
    try:
        host, port = split_host_port(first)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    values: dict[str, int] = {}
    for token in tokens[1:]:
        key, value = _parse_token(token, where)
        if key in values:
            raise ConfigError(f"{where}: key '{key}' given twice on one line; keep only one {key}=")
        values[key] = value
    if not values:
        slots = 1  # a bare host name means one worker slot, as in MPI hostfiles
    else:
        slots = values.get("slots", 0)
    servers = values.get("servers", 0)
    if slots == 0 and servers == 0:
        raise ConfigError(f"{where}: host '{first}' has slots=0 and servers=0, so it runs nothing; "
                          f"give it slots=N or servers=N, or delete the line")
    return HostEntry(host=host, ssh_port=port, slots=slots, servers=servers, line=number)


def _parse_token(token: str, where: str) -> tuple[str, int]:
    key, eq, value = token.partition("=")
    if not eq or not key:
        raise ConfigError(f"{where}: malformed token '{token}': expected key=value with no spaces, e.g. slots=4")
    if key not in KNOWN_KEYS:
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"{where}: unknown key '{key}' (known keys: {', '.join(KNOWN_KEYS)}){hint}")
    if not _INT_RE.fullmatch(value):
        raise ConfigError(f"{where}: bad number in '{token}': '{value}' is not a whole number; write e.g. {key}=4")
    number = int(value)
    if number < 0:
        raise ConfigError(f"{where}: bad number in '{token}': {key} cannot be negative; use 0 or more")
    return key, number


def _host_key(host: str) -> str:
    """Compare hosts case-insensitively, and IP addresses in canonical form (::1 == 0::1)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


__all__ = ["KNOWN_KEYS", "HostEntry", "parse_hostfile", "read_hostfile"]
