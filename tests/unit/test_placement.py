"""Placement of the scheduler, servers and workers on hosts."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from psframework.launch.hostfile import HostEntry, parse_hostfile
from psframework.launch.placement import JobLayout, Placement, plan_job
from psframework.errors import ConfigError

EXAMPLE = """\
node1          slots=4 servers=1
node2:2222     slots=4
10.0.0.3       servers=2
[::1]:22 slots=1
"""


def hosts(text: str) -> tuple[HostEntry, ...]:
    return parse_hostfile(text, "hosts.txt")


def where(placements: tuple[Placement, ...]) -> list[str]:
    return [p.host for p in placements]


def ranks(placements: tuple[Placement, ...]) -> list[int]:
    return [p.rank for p in placements]


# --- no hostfile -------------------------------------------------------------------------------

def test_local_defaults():
    layout = plan_job(None, None, None)
    assert layout == JobLayout(
        scheduler=Placement("scheduler", 0, "127.0.0.1", None),
        servers=(Placement("server", 0, "127.0.0.1", None),),
        workers=(Placement("worker", 0, "127.0.0.1", None),),
        source="<local>",
    )


def test_local_counts_and_local_host():
    layout = plan_job(None, 3, 2, local_host="10.0.0.9")
    assert where(layout.workers) == ["10.0.0.9"] * 3 and ranks(layout.workers) == [0, 1, 2]
    assert where(layout.servers) == ["10.0.0.9"] * 2 and ranks(layout.servers) == [0, 1]
    assert layout.scheduler.host == "10.0.0.9"
    assert layout.hosts() == ("10.0.0.9",)


def test_local_with_scheduler_host():
    assert plan_job(None, 1, 1, scheduler_host="node7:5000").scheduler.host == "node7"


# --- hostfile defaults and filling order -------------------------------------------------------

def test_hostfile_defaults_use_all_capacity():
    layout = plan_job(hosts(EXAMPLE), None, None, source="hosts.txt")
    assert where(layout.workers) == ["node1"] * 4 + ["node2"] * 4 + ["::1"]
    assert ranks(layout.workers) == list(range(9))
    assert where(layout.servers) == ["node1", "10.0.0.3", "10.0.0.3"]
    assert ranks(layout.servers) == [0, 1, 2]
    assert layout.source == "hosts.txt"


def test_ssh_ports_follow_hosts():
    layout = plan_job(hosts(EXAMPLE), None, None)
    assert {p.host: p.ssh_port for p in layout.all()} == {"node1": None, "node2": 2222, "10.0.0.3": None,
                                                          "::1": 22}


def test_fewer_workers_fill_in_file_order():
    layout = plan_job(hosts(EXAMPLE), 5, 2)
    assert where(layout.workers) == ["node1"] * 4 + ["node2"]
    assert where(layout.servers) == ["node1", "10.0.0.3"]


def test_workers_skip_server_only_hosts():
    layout = plan_job(hosts("srv servers=1\nnode1 slots=2\n"), None, None)
    assert where(layout.workers) == ["node1", "node1"]
    assert where(layout.servers) == ["srv"]


def test_no_servers_declared_defaults_to_one_server_on_first_slot_host():
    layout = plan_job(hosts("node1 slots=2\nnode2 slots=2\n"), None, None)
    assert where(layout.servers) == ["node1"]


def test_round_robin_servers_when_none_declared():
    layout = plan_job(hosts("node1 slots=2\nnode2\nnode3 slots=1\n"), 2, 5)
    assert where(layout.servers) == ["node1", "node2", "node3", "node1", "node2"]
    assert ranks(layout.servers) == [0, 1, 2, 3, 4]


def test_all_and_hosts_order():
    layout = plan_job(hosts("node1 slots=1\nnode2 slots=1 servers=1\n"), None, None)
    assert [(p.role, p.rank, p.host) for p in layout.all()] == [
        ("scheduler", 0, "node1"), ("server", 0, "node2"), ("worker", 0, "node1"), ("worker", 1, "node2")]
    assert layout.hosts() == ("node1", "node2")


# --- scheduler host ----------------------------------------------------------------------------

def test_scheduler_defaults_to_first_host_even_if_server_only():
    layout = plan_job(hosts("srv:2200 servers=1\nnode1 slots=1\n"), None, None)
    assert layout.scheduler == Placement("scheduler", 0, "srv", 2200)


@pytest.mark.parametrize("given_host,expected", [
    ("node2", "node2"), ("node2:5000", "node2"), ("[::1]:5000", "::1"), ("::1", "::1"), ("other", "other")])
def test_scheduler_host_strips_port(given_host, expected):
    layout = plan_job(hosts(EXAMPLE), None, None, scheduler_host=given_host)
    assert layout.scheduler.host == expected
    assert layout.scheduler.rank == 0 and layout.scheduler.role == "scheduler"


def test_scheduler_on_listed_host_uses_its_ssh_port():
    layout = plan_job(hosts(EXAMPLE), None, None, scheduler_host="node2:5000")
    assert layout.scheduler.ssh_port == 2222
    assert plan_job(hosts(EXAMPLE), None, None, scheduler_host="other").scheduler.ssh_port is None


def test_scheduler_host_bad_port():
    with pytest.raises(ConfigError, match="bad port"):
        plan_job(hosts(EXAMPLE), None, None, scheduler_host="node2:http")


# --- errors ------------------------------------------------------------------------------------

def test_too_many_workers_names_numbers_and_hosts():
    with pytest.raises(ConfigError) as info:
        plan_job(hosts("node1 slots=4\nnode2 slots=4\n"), 9, None, source="hosts.txt")
    assert str(info.value) == ("asked for 9 workers but hosts.txt offers 8 slots (node1: 4, node2: 4); "
                               "add slots or lower -n")


def test_too_many_servers_names_numbers_and_hosts():
    with pytest.raises(ConfigError) as info:
        plan_job(hosts(EXAMPLE), None, 4, source="hosts.txt")
    msg = str(info.value)
    assert msg.startswith("asked for 4 servers but hosts.txt declares 3 servers (node1: 1, 10.0.0.3: 2)")
    assert "--num-servers" in msg


def test_capacity_list_is_truncated():
    text = "".join(f"node{i} slots=1\n" for i in range(20))
    with pytest.raises(ConfigError, match=r"offers 20 slots \(node0: 1, .*node7: 1, \.\.\. 12 more hosts\)"):
        plan_job(hosts(text), 21, None)


@pytest.mark.parametrize("workers,servers,what", [(0, None, "0 workers"), (-1, None, "-1 workers"),
                                                   (None, 0, "0 servers"), (1, -2, "-2 servers")])
@pytest.mark.parametrize("hostfile", [None, EXAMPLE])
def test_counts_below_one(workers, servers, what, hostfile):
    with pytest.raises(ConfigError, match=f"asked for {what}; a job needs at least 1"):
        plan_job(hosts(hostfile) if hostfile else None, workers, servers)


def test_server_only_hostfile_has_no_worker_slots():
    with pytest.raises(ConfigError, match="hosts.txt offers no worker slots"):
        plan_job(hosts("srv servers=2\n"), None, None, source="hosts.txt")


def test_empty_host_list():
    with pytest.raises(ConfigError, match="hosts.txt: no hosts"):
        plan_job((), None, None, source="hosts.txt")


# --- property: placements respect capacity -----------------------------------------------------

@st.composite
def hostfile_and_counts(draw):
    n_hosts = draw(st.integers(1, 8))
    declare_servers = draw(st.booleans())
    entries = []
    for i in range(n_hosts):
        slots = draw(st.integers(0, 5))
        servers = draw(st.integers(0, 3)) if declare_servers else 0
        if slots == 0 and servers == 0:
            slots = 1
        port = draw(st.none() | st.integers(1, 65535))
        entries.append(HostEntry(f"node{i}", port, slots, servers, i + 1))
    total_slots = sum(e.slots for e in entries)
    total_servers = sum(e.servers for e in entries)
    if total_slots == 0:  # every host server-only: give the first one a slot
        entries[0] = HostEntry(entries[0].host, entries[0].ssh_port, 1, entries[0].servers, 1)
        total_slots = 1
    max_servers = total_servers or 10
    num_workers = draw(st.none() | st.integers(1, total_slots))
    num_servers = draw(st.none() | st.integers(1, max_servers))
    return entries, num_workers, num_servers


@settings(max_examples=300, deadline=None)
@given(hostfile_and_counts())
def test_plan_respects_capacity(case):
    entries, num_workers, num_servers = case
    layout = plan_job(entries, num_workers, num_servers)
    total_slots = sum(e.slots for e in entries)
    declared = sum(e.servers for e in entries)
    want_workers = total_slots if num_workers is None else num_workers
    want_servers = num_servers if num_servers is not None else (declared or 1)

    assert len(layout.workers) == want_workers
    assert len(layout.servers) == want_servers
    assert ranks(layout.workers) == list(range(want_workers))
    assert ranks(layout.servers) == list(range(want_servers))
    assert {p.role for p in layout.workers} == {"worker"} and {p.role for p in layout.servers} == {"server"}

    by_host = {e.host: e for e in entries}
    for host, count in Counter(where(layout.workers)).items():
        assert count <= by_host[host].slots
    if declared:
        for host, count in Counter(where(layout.servers)).items():
            assert count <= by_host[host].servers
    else:
        assert all(by_host[p.host].slots > 0 for p in layout.servers)
    for p in layout.all():
        assert p.ssh_port == by_host[p.host].ssh_port
    assert layout.scheduler.host == entries[0].host
    assert layout.hosts()[0] == entries[0].host


@settings(max_examples=100, deadline=None)
@given(hostfile_and_counts(), st.integers(1, 5))
def test_plan_rejects_more_than_capacity(case, extra):
    entries, _, _ = case
    total_slots = sum(e.slots for e in entries)
    with pytest.raises(ConfigError, match=f"asked for {total_slots + extra} workers .* offers {total_slots} slots"):
        plan_job(entries, total_slots + extra, None, source="hosts.txt")
    declared = sum(e.servers for e in entries)
    if declared:
        with pytest.raises(ConfigError, match=f"asked for {declared + extra} servers .* declares {declared}"):
            plan_job(entries, None, declared + extra, source="hosts.txt")


@settings(max_examples=100, deadline=None)
@given(hostfile_and_counts())
def test_generated_hostfile_text_round_trips(case):
    entries, _, _ = case
    text = "\n".join(f"{e.address} slots={e.slots} servers={e.servers}" for e in entries)
    assert parse_hostfile(text) == tuple(entries)
