"""Tests for the network-namespace virtual cluster used by ps-launch tests."""
from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.integration import netns as vnet
from tests.integration.netns import VirtualCluster, virtual_cluster

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]


@pytest.fixture(autouse=True)
def _require_netns():
    reason = vnet.netns_unavailable_reason()
    if reason:
        pytest.skip(reason)


# ---------------------------------------------------------------- helpers

LISTENER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 0))
s.listen(16)
print(s.getsockname()[1], flush=True)
while True:
    c, peer = s.accept()
    c.sendall(("%s %s\n" % (sys.argv[1], peer[0])).encode())
    c.close()
"""

CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
print(s.makefile().readline().strip())
"""


def _connect(address: str, port: int) -> str:
    with socket.create_connection((address, port), timeout=5) as s:
        return s.makefile().readline().strip()


def _alive(pid: int) -> bool:
    """True if pid is a live (non-zombie) process.  PID 1 on some machines
    does not reap orphans, so a killed orphan may linger as a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _assert_gone(c: VirtualCluster, extra_pids=()) -> None:
    names = {h.name for h in c.hosts}
    assert names.isdisjoint(vnet._netns_list()), vnet._netns_list()
    links = vnet._link_names()
    ours = [l for l in links if l.endswith("-" + c.cluster_id)]
    assert not ours, f"links left behind: {ours}"
    assert c.bridge not in links
    for pid in (*c.sshd_pids, *extra_pids):
        assert not _alive(pid), f"pid {pid} still running"
    assert not (vnet.REGISTRY_DIR / f"{c.cluster_id}.json").exists()
    assert c.subnet.split("/")[0].rsplit(".", 1)[0] + "." not in \
        vnet._ipcmd("-4", "-o", "addr", "show").stdout


# ---------------------------------------------------------------- tests

def test_two_hosts_come_up(tmp_path):
    t0 = time.monotonic()
    with virtual_cluster(2, tmp_path) as c:
        setup_s = time.monotonic() - t0
        assert len(c.hosts) == 2
        assert len({h.name for h in c.hosts}) == 2
        assert len({h.address for h in c.hosts}) == 2
        listed = vnet._netns_list()
        for h, sshd_pid in zip(c.hosts, c.sshd_pids):
            assert h.name.startswith("psh") and h.name in listed
            assert h.address.startswith("10.231.") and h.address != c.bridge_address
            assert sshd_pid in c.pids_in(h), "sshd must run inside its own namespace"
        assert c.ssh_config.is_file()
        # the bridge address lives in the root namespace
        assert c.bridge_address in vnet._ipcmd("-4", "-o", "addr", "show", "dev", c.bridge).stdout
    assert setup_s < 15, f"setup took {setup_s:.1f}s"


def test_ssh_runs_inside_the_right_namespace(tmp_path, monkeypatch):
    with virtual_cluster(2, tmp_path) as c:
        for h in c.hosts:
            base = ["ssh", "-F", str(c.ssh_config), "-o", "BatchMode=yes",
                    "-p", str(h.ssh_port), h.address]
            r = subprocess.run(base + ["hostname"], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, timeout=15)
            assert r.returncode == 0, r.stderr
            # namespaces share the UTS namespace: same hostname everywhere
            assert r.stdout.strip() == socket.gethostname()

            r = subprocess.run(base + ["ip -o -4 addr; ip netns identify"], capture_output=True,
                               text=True, stdin=subprocess.DEVNULL, timeout=15)
            assert r.returncode == 0, r.stderr
            assert f"inet {h.address}/" in r.stdout
            for other in c.hosts:
                if other != h:
                    assert f"inet {other.address}/" not in r.stdout
            assert r.stdout.strip().splitlines()[-1] == h.name

            # the ssh_config also knows every host by its namespace name
            r = subprocess.run(["ssh", "-F", str(c.ssh_config), h.name, "ip netns identify"],
                               capture_output=True, text=True, stdin=subprocess.DEVNULL,
                               timeout=15)
            assert (r.returncode, r.stdout.strip()) == (0, h.name), r.stderr

        # what ps-launch does: same interpreter and cwd, env on the command line
        workdir = tmp_path / "job dir"
        workdir.mkdir()
        monkeypatch.setenv("PSF_LOCAL_ONLY", "1")
        probe = ("import os, sys, json; print(json.dumps([os.getcwd(), sys.executable, "
                 "os.environ.get('PSF_A'), os.environ.get('PSF_B'), "
                 "os.environ.get('PSF_LOCAL_ONLY')]))")
        remote = (f"cd {shlex.quote(str(workdir))} && env PSF_A=1 PSF_B={shlex.quote('x y')} "
                  f"{shlex.quote(sys.executable)} -c {shlex.quote(probe)}")
        r = c.ssh(c.hosts[1], remote, capture_output=True, text=True, timeout=15)
        assert r.returncode == 0, r.stderr
        cwd, exe, a, b, local_only = json.loads(r.stdout)
        assert (cwd, exe, a, b) == (str(workdir), sys.executable, "1", "x y")
        assert local_only is None, "ssh must not forward the local environment"


def test_hosts_without_ssh_have_no_sshd_and_still_reach_each_other(tmp_path):
    with virtual_cluster(2, tmp_path, ssh=False) as c:
        h0, h1 = c.hosts
        assert c.sshd_pids == () and not c.ssh_config.exists()
        assert c.pids_in(h0) == [] and c.pids_in(h1) == []
        listener = c.popen_in(h1, [sys.executable, "-c", LISTENER, h1.name], stdout=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, text=True)
        try:
            port = int(listener.stdout.readline())
            r = c.run_in(h0, [sys.executable, "-c", CLIENT, h1.address, str(port)], capture_output=True,
                         text=True, timeout=15)
            assert (r.returncode, r.stdout.strip()) == (0, f"{h1.name} {h0.address}"), r.stderr
        finally:
            listener.kill()
            listener.wait(5)
            listener.stdout.close()
    _assert_gone(c, [listener.pid])


def test_tcp_between_namespaces_and_root(tmp_path):
    with virtual_cluster(2, tmp_path) as c:
        h0, h1 = c.hosts
        listeners = {}
        try:
            # a listener in each namespace
            for h in c.hosts:
                p = c.popen_in(h, [sys.executable, "-c", LISTENER, h.name],
                               stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
                listeners[h] = p
            ports = {h: int(p.stdout.readline()) for h, p in listeners.items()}

            # root namespace -> each namespace (source: the bridge address)
            for h in c.hosts:
                assert _connect(h.address, ports[h]) == f"{h.name} {c.bridge_address}"

            # namespace -> other namespace, through the bridge
            for src, dst in ((h0, h1), (h1, h0)):
                r = c.run_in(src, [sys.executable, "-c", CLIENT, dst.address, str(ports[dst])],
                             capture_output=True, text=True, timeout=15)
                assert r.returncode == 0, r.stderr
                assert r.stdout.strip() == f"{dst.name} {src.address}"

            # loopback is per namespace: h0's listener is not on h1's 127.0.0.1
            r = c.run_in(h1, [sys.executable, "-c", CLIENT, "127.0.0.1", str(ports[h0])],
                         capture_output=True, text=True, timeout=15)
            assert r.returncode != 0 and "ConnectionRefused" in r.stderr

            # each namespace -> a listener in the root namespace on the bridge address
            srv = socket.socket()
            srv.bind((c.bridge_address, 0))
            srv.listen(8)
            srv.settimeout(10)
            seen = []

            def serve():
                for _ in c.hosts:
                    conn, peer = srv.accept()
                    seen.append(peer[0])
                    conn.sendall(f"root {peer[0]}\n".encode())
                    conn.close()

            t = threading.Thread(target=serve, daemon=True)
            t.start()
            for h in c.hosts:
                r = c.run_in(h, [sys.executable, "-c", CLIENT, c.bridge_address,
                                 str(srv.getsockname()[1])],
                             capture_output=True, text=True, timeout=15)
                assert r.returncode == 0, r.stderr
                assert r.stdout.strip() == f"root {h.address}"
            t.join(5)
            srv.close()
            assert sorted(seen) == sorted(h.address for h in c.hosts)
        finally:
            for p in listeners.values():
                p.kill()
                p.wait(5)
                p.stdout.close()


def test_nothing_left_after_exit_and_second_run_works(tmp_path):
    with virtual_cluster(2, tmp_path) as c:
        # a daemon detached from its ssh session must not survive teardown
        r = c.ssh(c.hosts[0], "setsid sleep 300 >/dev/null 2>&1 </dev/null & echo $!",
                  capture_output=True, text=True, timeout=15)
        daemon = int(r.stdout.strip())
        assert daemon in c.pids_in(c.hosts[0])
        # and neither must a process started with `ip netns exec`
        p = c.popen_in(c.hosts[1], ["sleep", "300"])
        t0 = time.monotonic()
    teardown_s = time.monotonic() - t0
    assert p.wait(5) is not None
    _assert_gone(c, extra_pids=(daemon, p.pid))
    assert teardown_s < 10, f"teardown took {teardown_s:.1f}s"

    # a second cluster (same tmp_path) comes up fine and is distinct
    with virtual_cluster(2, tmp_path) as c2:
        assert c2.cluster_id != c.cluster_id
        assert c2.ssh(c2.hosts[1], "true", timeout=15).returncode == 0
    _assert_gone(c2)


def test_custom_ssh_port(tmp_path):
    with virtual_cluster(1, tmp_path, ssh_port=2222) as c:
        (h,) = c.hosts
        assert h.ssh_port == 2222
        r = c.ssh(h, "ip netns identify", capture_output=True, text=True, timeout=15)
        assert (r.returncode, r.stdout.strip()) == (0, h.name), r.stderr


class Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_teardown_when_body_raises(tmp_path, exc):
    seen = []
    with pytest.raises(exc):
        with virtual_cluster(2, tmp_path) as c:
            seen.append(c)
            raise exc("body failed")
    (c,) = seen
    _assert_gone(c)


def test_teardown_on_sigterm(tmp_path):
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("SIGTERM already has a handler in this process")
    seen = []
    with pytest.raises(KeyboardInterrupt):
        with virtual_cluster(1, tmp_path) as c:
            seen.append(c)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
            pytest.fail("SIGTERM did not interrupt the body")
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    _assert_gone(seen[0])


def test_setup_failure_is_reported_and_cleaned_up(tmp_path, monkeypatch):
    before = vnet.ours()
    monkeypatch.setattr(vnet, "_SSHD_CONFIG", vnet._SSHD_CONFIG + "NoSuchOption yes\n")
    with pytest.raises(RuntimeError) as ei:
        with virtual_cluster(2, tmp_path):
            pytest.fail("must not get here")
    msg = str(ei.value)
    assert "sshd for" in msg and "NoSuchOption" in msg, msg   # sshd's own log is quoted
    assert vnet.ours() == before


def test_stale_leftovers_are_removed_but_live_ones_kept(tmp_path):
    dead, live = "dead00", "11fe00"
    ns_dead, br_dead, ns_live = f"psh0-{dead}", f"pshbr-{dead}", f"psh0-{live}"
    vnet.REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    # a crashed run: owner pid gone, a process still running in its namespace
    (vnet.REGISTRY_DIR / f"{dead}.json").write_text(json.dumps({"pid": 2**22 + 7, "starttime": "1"}))
    # a run in progress: owned by this very process
    (vnet.REGISTRY_DIR / f"{live}.json").write_text(json.dumps(
        {"pid": os.getpid(), "starttime": vnet._proc_starttime(os.getpid())}))
    sleeper = None
    try:
        vnet._ipcmd("netns", "add", ns_dead)
        vnet._ipcmd("link", "add", br_dead, "type", "bridge")
        vnet._ipcmd("netns", "add", ns_live)
        sleeper = subprocess.Popen(["ip", "netns", "exec", ns_dead, "sleep", "300"])
        deadline = time.monotonic() + 5
        while sleeper.pid not in vnet._netns_pids(ns_dead) and time.monotonic() < deadline:
            time.sleep(0.01)

        # bringing up a cluster cleans the dead run's leftovers first
        with virtual_cluster(1, tmp_path) as c:
            assert c.ssh(c.hosts[0], "true", timeout=15).returncode == 0
        assert sleeper.wait(5) is not None
        assert ns_dead not in vnet._netns_list()
        assert br_dead not in vnet._link_names()
        assert not (vnet.REGISTRY_DIR / f"{dead}.json").exists()
        # the live run's namespace is untouched
        assert ns_live in vnet._netns_list()
        assert vnet.cleanup_stale() == []
    finally:
        if sleeper is not None and sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()
        for args in (("netns", "del", ns_dead), ("link", "del", br_dead), ("netns", "del", ns_live)):
            vnet._ipcmd(*args, check=False)
        for cid in (dead, live):
            (vnet.REGISTRY_DIR / f"{cid}.json").unlink(missing_ok=True)
