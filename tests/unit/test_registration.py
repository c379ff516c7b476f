"""The scheduler's registration of a worker that joins a running elastic job, without processes:
its activation waits for a server that is being restarted, and its register fails in time, naming
the server, when that one does not come back (scheduler/registration.py)."""

from __future__ import annotations

import time

from psframework import protocol as P
from psframework.config import SchedulerConfig, Timing
from psframework.scheduler.registration import Registration
from psframework.scheduler.roster import DEAD, Roster

TIMING = Timing(heartbeat_interval=0.2, heartbeat_timeout=2.0, start_timeout=30.0)


class Job:
    """Servers 0 and 1 and workers 0 and 1, registered; worker 1 died and a new process took its rank."""

    def __init__(self):
        config = SchedulerConfig(num_workers=2, num_servers=2, mode="async", elastic=True, restart_servers=True,
                                 timing=TIMING)
        self.roster = Roster(config)
        for role, rank in (("server", 0), ("server", 1), ("worker", 0), ("worker", 1)):
            self.roster.admit(f"{role}-{rank}".encode(), self.hello(role, rank, pid=100 + rank))
        self.roster.assign_ranks()
        self.sent: list[tuple[bytes, P.Message]] = []
        self.registration = Registration(self.roster, lambda peer, m: self.sent.append((peer, m)), lambda: 0)
        self.registration.shard_map = {}  # registered (no tensors: nothing to compare)
        self.die("worker", 1)
        self.late = self.rejoin("worker", 1, pid=200)
        self.registration.joined_late(1)

    @staticmethod
    def hello(role: str, rank: int, pid: int) -> P.Hello:
        return P.Hello(role=role, host="h", pid=pid, version=P.VERSION, rank=rank,
                       address=f"tcp://h:{pid}" if role == "server" else "")

    def die(self, role: str, rank: int) -> None:
        node = self.roster.nodes[(role, rank)]
        self.roster.mark(node, DEAD, "no heartbeat for 2.0 s")
        node.fatal = False

    def rejoin(self, role: str, rank: int, pid: int) -> bytes:
        peer = f"{role}-{rank}-{pid}".encode()
        self.roster.rejoin(peer, self.hello(role, rank, pid), restoring=role == "server")
        return peer

    def register(self) -> None:
        self.registration.on_register(self.late, P.Register(rank=1, tensors=[], optimizer={}))

    def activated(self, server: int) -> None:
        self.registration.on_activated(self.roster.server(server), P.Activated(worker=1))

    def to(self, peer: bytes) -> list[P.Message]:
        messages = [m for p, m in self.sent if p == peer]
        self.sent = [(p, m) for p, m in self.sent if p != peer]
        return messages


def test_a_dead_servers_new_process_is_asked_to_activate_a_worker_that_registered_meanwhile():
    job = Job()
    job.die("server", 0)
    job.register()
    assert job.to(b"server-0") == [] and [type(m) for m in job.to(b"server-1")] == [P.Activate]
    job.activated(1)
    assert job.to(job.late) == []
    new = job.rejoin("server", 0, pid=300)
    job.registration.server_back(job.roster.server(0))
    assert [(type(m), m.worker) for m in job.to(new)] == [(P.Activate, 1)]
    job.activated(0)
    assert [type(m) for m in job.to(job.late)] == [P.Registered]


def test_a_late_register_fails_naming_the_server_that_did_not_come_back_and_may_be_tried_again():
    job = Job()
    job.die("server", 0)
    job.register()
    job.activated(1)
    job.sent.clear()
    job.registration.expire(time.monotonic() + 1.0)
    assert job.to(job.late) == []
    job.registration.expire(time.monotonic() + TIMING.heartbeat_timeout + TIMING.start_timeout + 1.0)
    [error] = job.to(job.late)
    assert error.kind == P.TIMEOUT and "server 0 on host h (pid 100) (dead)" in error.message, error
    assert "call register() again once it is back" in error.message
    job.register()  # not refused as a second register()
    assert [type(m) for m in job.to(b"server-1")] == [P.Activate]


def test_a_late_register_fails_when_the_job_fails():
    job = Job()
    job.register()
    job.registration.fail(P.PEER_LOST, "register cannot complete: server 0 on host h (pid 100) died")
    [error] = job.to(job.late)
    assert error.kind == P.PEER_LOST and "server 0" in error.message


def _placed_chunk(worker_hosts: list[str], device_lanes: list[bool], servers: int = 1, chunk=None) -> int:
    """The block size the scheduler places a job's tensors with, for GPU servers on host "h"."""
    config = SchedulerConfig(num_workers=len(worker_hosts), num_servers=servers, server_device="cuda",
                             chunk_bytes=chunk, timing=TIMING)
    roster = Roster(config)
    for rank in range(servers):
        roster.admit(f"server-{rank}".encode(), P.Hello(role="server", host="h", pid=10 + rank, version=P.VERSION,
                                                         rank=rank, address=f"tcp://h:{10 + rank}"))
    for rank, host in enumerate(worker_hosts):
        roster.admit(f"worker-{rank}".encode(), P.Hello(role="worker", host=host, pid=20 + rank, version=P.VERSION,
                                                         rank=rank, address=""))
    roster.assign_ranks()
    sent: list[tuple[bytes, P.Message]] = []
    registration = Registration(roster, lambda peer, m: sent.append((peer, m)), lambda: 0)
    tensors = [P.TensorInfo("w", [100 << 20], "float32")]  # 400 MiB
    for rank, lanes in enumerate(device_lanes):
        registration.on_register(f"worker-{rank}".encode(),
                                 P.Register(rank=rank, tensors=tensors, optimizer={"name": "sgd"}, device_lanes=lanes))
    setups = [m for _, m in sent if isinstance(m, P.Setup)]
    assert len(setups) == servers, sent
    return setups[0].shard_map["chunk_bytes"]


def test_one_gpu_server_gets_whole_blocks_only_where_every_worker_reaches_it_by_device_lanes():
    """Blocks that cross PCIe or a network keep the size whose copies overlap: a worker on another
    host, or one whose tensors are not on a GPU, keeps 64 MiB blocks; so do several servers and a
    PS_CHUNK_BYTES that was given."""
    assert _placed_chunk(["h", "h"], [True, True]) == 1 << 30
    assert _placed_chunk(["h", "g"], [True, True]) == 64 << 20
    assert _placed_chunk(["h", "h"], [True, False]) == 64 << 20
    assert _placed_chunk(["h"], [True], servers=2) == 64 << 20
    assert _placed_chunk(["h"], [True], chunk=4 << 20) == 4 << 20
