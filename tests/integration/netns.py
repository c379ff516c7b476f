"""Virtual multi-host clusters on one Linux machine, for ``ps-launch`` tests.

Every virtual host is a network namespace with its own network stack and its
own ``sshd``.  The namespaces hang off one Linux bridge in the root namespace::

                    root namespace  (bridge_address = 10.231.X.1/24)
                    +----------------------------------------------+
                    |   pshbr-<id>  (bridge)                       |
                    |     |- pshv0-<id> --veth--> [psh0-<id>] eth0 10.231.X.10
                    |     |- pshv1-<id> --veth--> [psh1-<id>] eth0 10.231.X.11
                    +----------------------------------------------+

All namespaces share the file system, so a process started over ssh in a
namespace can run the same Python interpreter in the same working directory
as the launcher.  Environment variables do *not* travel over ssh (sshd has no
``AcceptEnv``); the launcher must put them on the remote command line.

Only addresses in a private /24 that this module creates are used; nothing is
routed beyond the bridge (the root namespace does not forward).

Usage::

    with virtual_cluster(2, tmp_path) as cluster:
        h = cluster.hosts[0]
        subprocess.run(cluster.ssh_argv(h, "hostname"), check=True)

Resource names all start with ``psh`` and carry a random hex id per cluster:
namespaces ``psh<i>-<id>``, bridge ``pshbr-<id>``, host-side veths
``pshv<i>-<id>``.  A registry under ``/run/psh-netns/<id>.json`` records the
owning process; resources whose owner is dead (a crashed or SIGKILLed run) are
removed by the next :func:`virtual_cluster` call or by
``python -m tests.integration.netns --cleanup``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import ipaddress
import json
import logging
import os
import random
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

__all__ = [
    "VirtualHost",
    "VirtualCluster",
    "virtual_cluster",
    "netns_unavailable_reason",
    "cleanup_stale",
    "ours",
    "PREFIX",
]

log = logging.getLogger(__name__)

PREFIX = "psh"
REGISTRY_DIR = Path("/run/psh-netns")
SSHD_PRIV_SEP_DIR = Path("/run/sshd")
SUBNET_BASE = "10.231"           # clusters use 10.231.X.0/24, X random
BRIDGE_HOST_OCTET = 1
FIRST_HOST_OCTET = 10
MAX_HOSTS = 254 - FIRST_HOST_OCTET + 1

SSHD_START_TIMEOUT = 10.0         # seconds until every sshd must accept TCP
SSH_CHECK_TIMEOUT = 10.0          # seconds for the `ssh ... true` probe per host
KILL_GRACE = 1.0                  # seconds between SIGTERM and SIGKILL

_ID_RE = r"([0-9a-f]{6})"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-{_ID_RE}$")
_BRIDGE_RE = re.compile(rf"^{PREFIX}br-{_ID_RE}$")
_VETH_RE = re.compile(rf"^{PREFIX}v(\d+)-{_ID_RE}$")
_SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin"


# --------------------------------------------------------------------------
# public data types
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class VirtualHost:
    name: str        # namespace name, e.g. "psh0-a1b2c3"
    address: str     # IPv4 address of the namespace on the bridge
    ssh_port: int    # port sshd listens on inside the namespace


@dataclass(frozen=True)
class VirtualCluster:
    hosts: tuple[VirtualHost, ...]
    ssh_config: Path      # `ssh -F ssh_config -o BatchMode=yes -p PORT ADDR cmd`
    bridge_address: str   # root namespace's address, reachable from every host
    cluster_id: str = ""  # the random hex id shared by all names of this cluster
    bridge: str = ""      # bridge interface name in the root namespace
    subnet: str = ""      # e.g. "10.231.77.0/24"
    sshd_pids: tuple[int, ...] = ()  # pid of each host's sshd (same order as hosts)

    def run_in(self, host: VirtualHost, argv: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """``ip netns exec NAME argv`` (kwargs go to :func:`subprocess.run`)."""
        return subprocess.run([_ip(), "netns", "exec", host.name, *argv], **kw)

    def popen_in(self, host: VirtualHost, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Like :meth:`run_in` but returns a :class:`subprocess.Popen`."""
        return subprocess.Popen([_ip(), "netns", "exec", host.name, *argv], **kw)

    def pids_in(self, host: VirtualHost) -> list[int]:
        """Pids of live processes in the namespace (``ip netns pids NAME``)."""
        return _netns_pids(host.name)

    def ssh_argv(self, host: VirtualHost, *command: str) -> list[str]:
        """argv for running ``command`` (a remote shell command line) on host."""
        return ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes",
                "-p", str(host.ssh_port), host.address, *command]

    def ssh(self, host: VirtualHost, *command: str, **kw) -> subprocess.CompletedProcess:
        """Run ``command`` on ``host`` over ssh (kwargs go to subprocess.run)."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.ssh_argv(host, *command), **kw)

    def host(self, name_or_index: str | int) -> VirtualHost:
        if isinstance(name_or_index, int):
            return self.hosts[name_or_index]
        for h in self.hosts:
            if name_or_index in (h.name, h.address):
                return h
        raise KeyError(name_or_index)


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _which(prog: str) -> str | None:
    path = os.environ.get("PATH", os.defpath) + ":" + _SBIN_PATH
    return shutil.which(prog, path=path)


def _ip() -> str:
    return _which("ip") or "ip"


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    p = subprocess.run(list(argv), stdin=subprocess.DEVNULL, capture_output=True,
                       text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"command failed (rc={p.returncode}): {' '.join(argv)}\n"
                           f"{p.stderr.strip() or p.stdout.strip()}")
    return p


def _ipcmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run([_ip(), *args], check=check)


def _netns_list() -> list[str]:
    p = _ipcmd("netns", "list", check=False)
    return [line.split()[0] for line in p.stdout.splitlines() if line.strip()]


def _link_names() -> list[str]:
    p = _ipcmd("-o", "link", "show", check=False)
    names = []
    for line in p.stdout.splitlines():
        # "12: pshv0-abcdef@if11: <...>"
        parts = line.split(":", 2)
        if len(parts) >= 2:
            names.append(parts[1].strip().split("@", 1)[0])
    return names


def _netns_pids(name: str) -> list[int]:
    p = _ipcmd("netns", "pids", name, check=False)
    if p.returncode != 0:
        return []
    return [int(tok) for tok in p.stdout.split() if tok.isdigit()]


def ours(names: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Namespaces and links in the root namespace whose names follow this
    module's naming scheme (for leak checks in tests)."""
    nss = [n for n in (_netns_list() if names is None else names) if _NS_RE.match(n)]
    links = [n for n in _link_names() if _BRIDGE_RE.match(n) or _VETH_RE.match(n)]
    return {"netns": nss, "links": links}


def _proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may contain spaces and parentheses: split after the last ')'
    fields = stat.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat


def _owner_alive(cid: str) -> bool:
    try:
        info = json.loads((REGISTRY_DIR / f"{cid}.json").read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return _proc_starttime(pid) == info.get("starttime")


@contextmanager
def _registry_lock() -> Iterator[None]:
    REGISTRY_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(REGISTRY_DIR / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _kill_all_in(ns: str, grace: float = KILL_GRACE) -> None:
    """SIGTERM every process in namespace ns, SIGKILL what is left after grace,
    until the namespace is empty (zombies are not listed by `ip netns pids`)."""
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    hard_deadline = time.monotonic() + grace + 10.0
    while True:
        pids = [p for p in _netns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        if time.monotonic() > hard_deadline:
            raise RuntimeError(f"processes in namespace {ns} survive SIGKILL: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        time.sleep(0.02)
        if sig == signal.SIGTERM and time.monotonic() > deadline:
            sig = signal.SIGKILL


# --------------------------------------------------------------------------
# availability probe
# --------------------------------------------------------------------------

_unavailable_cache: list[str | None] = []


def netns_unavailable_reason(ssh: bool = True) -> str | None:
    """None if root + ``ip`` + namespace/veth/bridge creation (and with ``ssh``, ``sshd`` and
    ``ssh``) all work here, else a human-readable reason (for pytest.skip)."""
    missing = [p for p in ("sshd", "ssh", "ssh-keygen") if ssh and not _which(p)]
    if missing:
        return ("missing programs: " + ", ".join(missing) +
                " (apt-get install -y openssh-server openssh-client iproute2)")
    if not _unavailable_cache:
        _unavailable_cache.append(_probe())
    return _unavailable_cache[0]


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces need root (euid is %d)" % os.geteuid()
    if not _which("ip"):
        return "missing program: ip (apt-get install -y iproute2)"
    tag = secrets.token_hex(3)
    ns, br, va, vb = f"pshq-{tag}", f"pshqb-{tag}", f"pshqa-{tag}", f"pshqz-{tag}"
    try:
        for argv, what in (
            (("netns", "add", ns), "create a network namespace"),
            (("link", "add", br, "type", "bridge"), "create a bridge"),
            (("link", "add", va, "type", "veth", "peer", "name", vb, "netns", ns),
             "create a veth pair into a namespace"),
            (("link", "set", va, "master", br), "attach a veth to a bridge"),
        ):
            p = _ipcmd(*argv, check=False)
            if p.returncode != 0:
                return f"cannot {what} (`ip {' '.join(argv)}`): {p.stderr.strip()}"
        p = _run([_ip(), "netns", "exec", ns, "true"], check=False)
        if p.returncode != 0:
            return f"`ip netns exec` does not work: {p.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as e:
        return f"network namespace probe failed: {e}"
    finally:
        _ipcmd("link", "del", va, check=False)
        _ipcmd("link", "del", br, check=False)
        _ipcmd("netns", "del", ns, check=False)
    return None


# --------------------------------------------------------------------------
# stale cleanup
# --------------------------------------------------------------------------

def cleanup_stale(*, include_live: bool = False) -> list[str]:
    """Remove psh* namespaces, bridges and veths left behind by runs whose
    owning process is gone.  With include_live=True remove all of them (only
    for manual use: it breaks clusters of concurrently running tests).
    Returns the names removed."""
    with _registry_lock():
        return _cleanup_stale_locked(include_live)


def _cleanup_stale_locked(include_live: bool) -> list[str]:
    removed: list[str] = []
    alive: dict[str, bool] = {}

    def stale(cid: str) -> bool:
        if include_live:
            return True
        if cid not in alive:
            alive[cid] = _owner_alive(cid)
        return not alive[cid]

    cids: set[str] = set()
    for ns in _netns_list():
        m = _NS_RE.match(ns)
        if m and stale(m.group(2)):
            cids.add(m.group(2))
            with contextlib.suppress(Exception):
                _kill_all_in(ns, grace=0.2)
            _ipcmd("netns", "del", ns, check=False)
            removed.append(ns)
    for name in _link_names():
        m = _VETH_RE.match(name)
        if m and stale(m.group(2)):
            cids.add(m.group(2))
            _ipcmd("link", "del", name, check=False)
            removed.append(name)
    for name in _link_names():
        m = _BRIDGE_RE.match(name)
        if m and stale(m.group(1)):
            cids.add(m.group(1))
            _ipcmd("link", "del", name, check=False)
            removed.append(name)
    if REGISTRY_DIR.is_dir():
        for f in REGISTRY_DIR.glob("*.json"):
            if stale(f.stem):
                cids.add(f.stem)
                with contextlib.suppress(OSError):
                    f.unlink()
    if removed:
        log.warning("removed stale virtual-cluster leftovers: %s", " ".join(removed))
    return removed


# --------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------

def _used_networks() -> list[ipaddress.IPv4Network]:
    nets = []
    for args in (("-4", "-o", "route", "show", "table", "all"), ("-4", "-o", "addr", "show")):
        out = _ipcmd(*args, check=False).stdout
        for tok in re.findall(r"\b(\d+\.\d+\.\d+\.\d+(?:/\d+)?)\b", out):
            with contextlib.suppress(ValueError):
                nets.append(ipaddress.ip_network(tok, strict=False))
    return nets


def _pick_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    candidates = list(range(256))
    random.SystemRandom().shuffle(candidates)
    for x in candidates:
        net = ipaddress.ip_network(f"{SUBNET_BASE}.{x}.0/24")
        if not any(net.overlaps(u) for u in used if u.prefixlen > 0):
            return net
    raise RuntimeError(f"no free /24 in {SUBNET_BASE}.0.0/16 (all overlap existing routes)")


_SSHD_CONFIG = """\
# generated by tests/integration/netns.py for namespace {ns}
Port {port}
ListenAddress {address}
AddressFamily inet
HostKey "{host_key}"
PidFile "{pid_file}"
AuthorizedKeysFile "{authorized_keys}"
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
HostbasedAuthentication no
UsePAM no
UseDNS no
StrictModes no
PrintMotd no
PrintLastLog no
PermitUserEnvironment no
X11Forwarding no
# a launcher opens many connections at once; the default 10:30:100 drops some
MaxStartups 256
MaxSessions 256
LoginGraceTime 30
LogLevel VERBOSE
"""

_SSH_CONFIG_HEADER = """\
# generated by tests/integration/netns.py (cluster {cid})
# use: ssh -F {path} -o BatchMode=yes -p PORT ADDRESS cmd   (or: ssh -F {path} NAME cmd)
"""

_SSH_CONFIG_HOST = """\
Host {name}
    HostName {address}
    Port {port}
"""

_SSH_CONFIG_ALL = """\
Host *
    User root
    IdentityFile "{key}"
    IdentitiesOnly yes
    IdentityAgent none
    PasswordAuthentication no
    KbdInteractiveAuthentication no
    BatchMode yes
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    GlobalKnownHostsFile /dev/null
    CheckHostIP no
    LogLevel ERROR
    # the default post-quantum kex (sntrup761) costs ~0.1s per login here
    KexAlgorithms curve25519-sha256,curve25519-sha256@libssh.org
    ConnectTimeout 5
    ServerAliveInterval 5
    ServerAliveCountMax 3
    ControlMaster no
    ControlPath none
"""


def _keygen(path: Path, comment: str) -> None:
    _run([_which("ssh-keygen") or "ssh-keygen", "-q", "-t", "ed25519", "-N", "",
          "-C", comment, "-f", str(path)])


def _wait_listening(address: str, port: int, sshd: subprocess.Popen, log_file: Path,
                    deadline: float) -> None:
    while True:
        rc = sshd.poll()
        if rc is not None:
            raise RuntimeError(f"sshd for {address} exited with rc={rc} before accepting "
                               f"connections; its log ({log_file}):\n{_tail(log_file)}")
        try:
            with socket.create_connection((address, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"sshd for {address}:{port} did not accept connections within "
                               f"{SSHD_START_TIMEOUT}s; its log ({log_file}):\n{_tail(log_file)}")
        time.sleep(0.01)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:] or "(empty)"
    except OSError as e:
        return f"(unreadable: {e})"


class _State:
    """Everything created so far, so teardown can undo a partial setup."""

    def __init__(self, cid: str) -> None:
        self.cid = cid
        self.bridge: str | None = None
        self.namespaces: list[str] = []
        self.veths: list[str] = []
        self.sshds: list[subprocess.Popen] = []
        self.registry_file: Path | None = None


@contextmanager
def _defer_signals() -> Iterator[None]:
    """Block SIGINT/SIGTERM (delivered once the block ends) so a Ctrl-C cannot
    interrupt teardown halfway.  Only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextmanager
def _sigterm_as_keyboardinterrupt() -> Iterator[None]:
    """While a cluster is up, turn SIGTERM (default action: die without running
    finally blocks) into KeyboardInterrupt, so the teardown still runs."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _setup(n: int, tmp_path: Path, ssh_port: int, st: _State, ssh: bool = True) -> VirtualCluster:
    cid = st.cid
    workdir = Path(tmp_path) / f"vcluster-{cid}"
    workdir.mkdir(mode=0o700, parents=True)
    hosts, bridge_address, net = _network(n, ssh_port, st, workdir)
    cluster = VirtualCluster(
        hosts=tuple(hosts), ssh_config=workdir / "ssh_config", bridge_address=bridge_address,
        cluster_id=cid, bridge=st.bridge, subnet=str(net))
    return _with_sshd(cluster, st, workdir) if ssh else cluster


def _network(n: int, ssh_port: int, st: _State, workdir: Path) -> tuple[list[VirtualHost], str, ipaddress.IPv4Network]:
    """The bridge, and n namespaces on it, each with its veth as eth0."""
    cid = st.cid
    # bridge + subnet allocation, under the lock (so two runs never pick the
    # same /24) together with the cleanup of stale leftovers
    with _registry_lock():
        _cleanup_stale_locked(include_live=False)
        st.registry_file = REGISTRY_DIR / f"{cid}.json"
        st.registry_file.write_text(json.dumps({
            "pid": os.getpid(), "starttime": _proc_starttime(os.getpid()),
            "tmp": str(workdir), "n": n}))
        net = _pick_subnet()
        hosts_ip = list(net.hosts())
        bridge_address = str(hosts_ip[BRIDGE_HOST_OCTET - 1])
        st.bridge = f"{PREFIX}br-{cid}"
        _ipcmd("link", "add", st.bridge, "type", "bridge", "forward_delay", "0")
        _ipcmd("addr", "add", f"{bridge_address}/{net.prefixlen}", "dev", st.bridge)
        _ipcmd("link", "set", st.bridge, "up")

    # namespaces and veths
    hosts: list[VirtualHost] = []
    for i in range(n):
        ns, veth, peer = f"{PREFIX}{i}-{cid}", f"{PREFIX}v{i}-{cid}", f"{PREFIX}p{i}-{cid}"
        address = str(hosts_ip[FIRST_HOST_OCTET - 1 + i])
        _ipcmd("netns", "add", ns)
        st.namespaces.append(ns)
        _ipcmd("link", "add", veth, "type", "veth", "peer", "name", peer, "netns", ns)
        st.veths.append(veth)
        _ipcmd("link", "set", veth, "master", st.bridge)
        _ipcmd("link", "set", veth, "up")
        _ipcmd("-n", ns, "link", "set", "lo", "up")
        _ipcmd("-n", ns, "link", "set", peer, "name", "eth0")
        _ipcmd("-n", ns, "addr", "add", f"{address}/{net.prefixlen}", "dev", "eth0")
        _ipcmd("-n", ns, "link", "set", "eth0", "up")
        _ipcmd("-n", ns, "route", "add", "default", "via", bridge_address)
        hosts.append(VirtualHost(name=ns, address=address, ssh_port=ssh_port))
    return hosts, bridge_address, net


def _with_sshd(cluster: VirtualCluster, st: _State, workdir: Path) -> VirtualCluster:
    """Start an sshd in every host of ``cluster`` and log in to each once."""
    cid, hosts = st.cid, cluster.hosts
    host_key, user_key = workdir / "ssh_host_ed25519_key", workdir / "id_ed25519"
    _keygen(host_key, f"psh-host-{cid}")
    _keygen(user_key, f"psh-user-{cid}")
    authorized_keys = workdir / "authorized_keys"
    authorized_keys.write_text((workdir / "id_ed25519.pub").read_text())
    authorized_keys.chmod(0o600)
    SSHD_PRIV_SEP_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)

    # ssh client config
    ssh_config = cluster.ssh_config
    parts = [_SSH_CONFIG_HEADER.format(cid=cid, path=ssh_config)]
    parts += [_SSH_CONFIG_HOST.format(name=h.name, address=h.address, port=h.ssh_port)
              for h in hosts]
    parts.append(_SSH_CONFIG_ALL.format(key=user_key))
    ssh_config.write_text("\n".join(parts))

    # one sshd per namespace, a direct child of ours (ip netns exec execs it)
    sshd_bin = _which("sshd")
    logs: list[Path] = []
    for h in hosts:
        cfg = workdir / f"sshd_config.{h.name}"
        cfg.write_text(_SSHD_CONFIG.format(
            ns=h.name, port=h.ssh_port, address=h.address, host_key=host_key,
            pid_file=workdir / f"sshd.{h.name}.pid", authorized_keys=authorized_keys))
        log_file = workdir / f"sshd.{h.name}.log"
        logs.append(log_file)
        with open(log_file, "wb") as lf:
            st.sshds.append(subprocess.Popen(
                [_ip(), "netns", "exec", h.name, sshd_bin, "-D", "-e", "-f", str(cfg)],
                stdin=subprocess.DEVNULL, stdout=lf, stderr=subprocess.STDOUT,
                start_new_session=True))  # no terminal Ctrl-C straight into sshd

    deadline = time.monotonic() + SSHD_START_TIMEOUT
    for h, sshd, lf in zip(hosts, st.sshds, logs):
        _wait_listening(h.address, h.ssh_port, sshd, lf, deadline)

    cluster = dataclasses.replace(cluster, sshd_pids=tuple(p.pid for p in st.sshds))

    # one real login per host, in parallel
    probes = [(h, subprocess.Popen(cluster.ssh_argv(h, "true"), stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
              for h in hosts]
    errors = []
    for (h, p), lf in zip(probes, logs):
        try:
            out, _ = p.communicate(timeout=SSH_CHECK_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate()
            errors.append(f"{h.name}: `ssh true` timed out\n{out.decode(errors='replace')}")
            continue
        if p.returncode != 0:
            errors.append(f"{h.name} ({h.address}): `ssh ... true` rc={p.returncode}: "
                          f"{out.decode(errors='replace').strip()}\nsshd log:\n{_tail(lf)}")
    if errors:
        raise RuntimeError("ssh into virtual hosts failed:\n" + "\n".join(errors))
    return cluster


def _teardown(st: _State) -> list[str]:
    errors: list[str] = []

    def attempt(what: str, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as e:  # keep going, report at the end
            errors.append(f"{what}: {e}")

    # 1. everything running inside the namespaces (ssh sessions, user
    #    processes, daemons they started, sshd itself)
    for ns in st.namespaces:
        attempt(f"kill processes in {ns}", _kill_all_in, ns)
    # 2. reap our sshd children (no zombies of ours left behind)
    for p in st.sshds:
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            p.kill()
            attempt(f"reap sshd {p.pid}", p.wait, 5)
    # 3. links and namespaces (deleting one end of a veth deletes both)
    for veth in st.veths:
        if veth in _link_names():
            attempt(f"delete {veth}", _ipcmd, "link", "del", veth)
    for ns in st.namespaces:
        if ns in _netns_list():
            attempt(f"delete namespace {ns}", _ipcmd, "netns", "del", ns)
    if st.bridge and st.bridge in _link_names():
        attempt(f"delete bridge {st.bridge}", _ipcmd, "link", "del", st.bridge)
    # 4. verify
    left = [x for x in _netns_list() if x in st.namespaces]
    left += [x for x in _link_names() if x in st.veths or x == st.bridge]
    if left:
        errors.append("still present after teardown: " + " ".join(left))
    elif st.registry_file is not None:
        with contextlib.suppress(OSError):
            st.registry_file.unlink()
    return errors


@contextmanager
def virtual_cluster(n: int, tmp_path: Path, *, ssh_port: int = 22, ssh: bool = True) -> Iterator[VirtualCluster]:
    """Bring up n virtual hosts (namespaces with sshd; without ``ssh``, no sshd: for jobs started
    with ``run_in``/``popen_in``) and tear them down on exit, also when the body raises or is
    interrupted."""
    if not 1 <= n <= MAX_HOSTS:
        raise ValueError(f"n must be in 1..{MAX_HOSTS}, got {n}")
    reason = netns_unavailable_reason(ssh)
    if reason:
        raise RuntimeError(f"virtual clusters unavailable: {reason}")
    st = _State(secrets.token_hex(3))
    body_failed = False
    t0 = time.monotonic()
    try:
        with _sigterm_as_keyboardinterrupt():
            cluster = _setup(n, Path(tmp_path), ssh_port, st, ssh)
            log.info("virtual cluster %s (%d hosts) up in %.2fs", st.cid, n,
                     time.monotonic() - t0)
            try:
                yield cluster
            except BaseException:
                body_failed = True
                raise
    except BaseException:
        body_failed = True
        raise
    finally:
        t1 = time.monotonic()
        with _defer_signals():
            errors = _teardown(st)
        log.info("virtual cluster %s torn down in %.2fs", st.cid, time.monotonic() - t1)
        if errors:
            msg = "virtual cluster teardown problems:\n" + "\n".join(errors)
            if body_failed:
                log.error(msg)  # do not mask the original exception
            else:
                raise RuntimeError(msg)


# --------------------------------------------------------------------------
# command line: python -m tests.integration.netns [--cleanup [--all]] [--demo N]
# --------------------------------------------------------------------------

def _main(argv: list[str]) -> int:
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cleanup", action="store_true",
                    help="remove leftovers of crashed runs (owner process gone)")
    ap.add_argument("--all", action="store_true",
                    help="with --cleanup: remove every psh* namespace/link, live or not")
    ap.add_argument("--check", action="store_true", help="print whether netns tests can run")
    ap.add_argument("--demo", type=int, metavar="N", help="bring up N hosts, time it, tear down")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if a.check:
        r = netns_unavailable_reason()
        print(r or "available")
        return 1 if r else 0
    if a.cleanup:
        print("\n".join(cleanup_stale(include_live=a.all)) or "nothing to clean")
    if a.demo:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.monotonic()
            with virtual_cluster(a.demo, Path(d)) as c:
                t1 = time.monotonic()
                for h in c.hosts:
                    print(h, c.ssh(h, "ip netns identify", capture_output=True,
                                   text=True).stdout.strip())
                t2 = time.monotonic()
            t3 = time.monotonic()
            print(f"setup {t1 - t0:.2f}s  body {t2 - t1:.2f}s  teardown {t3 - t2:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
