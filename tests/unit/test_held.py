"""The server's held device-lane pushes (``server/held.py``): which requests wait, in what order
they are handled, and what lets a held one go. The GPU test of the whole path is in
``tests/integration/test_cuda_ipc.py``; here its parts stand in for a lane's events and process."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from psframework import protocol as P
from psframework.server import held as held_module
from psframework.server.held import HeldRequests
from psframework.server.lanes import ServerLanes

WORKER, OTHER = b"worker-0", b"worker-1"


class Event:
    def __init__(self, done: bool = False):
        self.done = done

    def query(self) -> bool:
        return self.done


class Process:
    def __init__(self):
        self.alive = True

    def running(self) -> bool:
        return self.alive


class Lane:
    def __init__(self, events: dict[int, Event]):
        self.pushed, self.peer = events, Process()
        self.offsets = {block_id: 0 for block_id in events}
        self.flags_written: list[tuple[int, int]] = []  # (block, number), by our stream

    def write_flag(self, stream, block_id: int, number: int) -> None:
        self.flags_written.append((block_id, number))


class Lanes:
    """The server's lanes, with ``ServerLanes``'s own ``refused``."""

    refused = ServerLanes.refused

    def __init__(self, **lanes):
        self.device_lanes = {int(rank[1:]): lane for rank, lane in lanes.items()}
        self.io = SimpleNamespace(stream=None)


class Requests:
    """Records what was handled; refuses the requests of workers named in ``refuse``."""

    def __init__(self):
        self.handled: list[tuple[bytes, int, bool]] = []
        self.refuse: set[int] = set()

    def on_block(self, peer: bytes, message: P.BlockRequest, bare: bool = False) -> None:
        if message.rank in self.refuse:
            raise P.Rejected(P.PEER_LOST, f"worker {message.rank} died")
        self.handled.append((peer, message.req, bare))


class Speakers:
    def speaks_for(self, peer: bytes, rank) -> bool:
        return (peer, rank) in ((WORKER, 0), (OTHER, 1))

    def check(self, peer: bytes, message: P.Message) -> None:
        if peer == b"stranger":
            raise P.Rejected(P.PROTOCOL, "this connection did not introduce itself as a worker of the job")


class Socket:
    def __init__(self):
        self.sent: list[tuple[bytes, P.Message]] = []

    def send(self, frames, peer=None, **_):
        self.sent.append((peer, P.decode(frames[0])))


def push(req: int, block: int = 0, rank: int = 0, ipc: bool = True) -> P.PushPull:
    """A device-ordered push_pull: it names the flag number ``100 + req``."""
    return P.PushPull(req=req, block=block, rank=rank, ipc=ipc, step=0, flag=100 + req)


@pytest.fixture
def parts():
    events = {0: Event(), 1: Event()}
    lane = Lane(events)
    requests, socket = Requests(), Socket()
    held = HeldRequests(socket, Lanes(w0=lane, w1=Lane({0: Event(done=True)})), requests, Speakers())
    return held, events, lane, requests, socket


def test_a_push_whose_copies_have_not_landed_waits_with_its_connections_later_requests_behind_it(parts):
    held, events, _, requests, _ = parts
    assert held.take(WORKER, push(1, block=0), bare=True)
    assert held.take(WORKER, push(2, block=1), bare=True)
    assert held.take(WORKER, P.Pull(req=3, block=0, rank=0, ipc=True), bare=True)  # behind the pushes
    assert not held.take(OTHER, push(4, rank=1), bare=True)  # another worker's landed push goes now
    assert held.waiting and held.held == 3
    held.release()
    assert requests.handled == []
    events[0].done = True
    held.release()
    assert requests.handled == [(WORKER, 1, True)]  # the next push's copies are still in flight
    events[1].done = True
    held.release()
    assert requests.handled == [(WORKER, 1, True), (WORKER, 2, True), (WORKER, 3, True)]
    assert not held.waiting


def test_a_landed_push_or_a_socket_request_of_a_connection_with_nothing_held_is_not_held(parts):
    held, events, _, _, _ = parts
    events[0].done = True
    assert not held.take(WORKER, push(1, block=0), bare=True)
    assert not held.take(WORKER, push(2, block=1, ipc=False), bare=False)
    assert not held.take(WORKER, P.Mark(rank=0, step=0), bare=True)
    assert not held.waiting


def test_a_message_that_cannot_wait_has_the_held_requests_handled_first(parts):
    held, _, _, requests, _ = parts
    assert held.take(WORKER, push(1, block=0), bare=True)
    assert not held.take(WORKER, push(2, block=1, ipc=False), bare=False)  # frames on the socket: now
    assert requests.handled == [(WORKER, 1, True)]  # handled first, waiting for its event there
    assert not held.waiting
    assert held.take(WORKER, push(3, block=0), bare=True)
    assert not held.take(WORKER, P.Mark(rank=0, step=1), bare=True)  # not a block request: now
    assert requests.handled[-1] == (WORKER, 3, True)


def test_a_held_push_of_a_worker_whose_process_is_gone_is_refused_to_its_connection(parts):
    held, _, lane, requests, socket = parts
    assert held.take(WORKER, push(1, block=0), bare=True)
    lane.peer.alive = False
    requests.refuse.add(0)
    deadline = time.monotonic() + 1
    while held.waiting and time.monotonic() < deadline:
        held.release()
    assert not held.waiting
    assert [(peer, type(m), m.req, m.kind) for peer, m in socket.sent] == [(WORKER, P.Error, 1, P.PEER_LOST)]


def test_a_held_push_of_a_live_worker_is_refused_once_the_event_deadline_passed_not_waited_for_again(
        parts, monkeypatch):
    held, events, _, requests, socket = parts
    monkeypatch.setattr(held_module, "PEER_EVENT_DEADLINE", 0.05)
    assert held.take(WORKER, push(1, block=0), bare=True)
    assert held.take(WORKER, push(2, block=1), bare=True)
    events[1].done = True
    held.release()
    assert requests.handled == [] and socket.sent == []
    time.sleep(0.06)
    held.release()
    assert requests.handled == [(WORKER, 2, True)]  # its own copies landed: it goes on
    [(peer, error)] = socket.sent
    assert peer == WORKER and error.req == 1 and error.kind == P.TIMEOUT and "have not landed" in error.message
    # the flag it named is written all the same: the worker's copy queued behind it goes on
    assert held._lanes.device_lanes[0].flags_written == [(0, 101)]


def test_a_stranger_s_push_is_refused_not_held(parts):
    held, _, _, requests, _ = parts
    with pytest.raises(P.Rejected, match="did not introduce itself"):
        held.take(b"stranger", push(1, block=0), bare=True)
    assert not held.waiting and requests.handled == []


def test_a_held_push_whose_device_lane_was_replaced_is_refused_not_read_from_the_new_lane(parts):
    """A new process of the worker's rank attached a lane of its own while the old one's push was
    held: the push must not be read out of the new lane's slot."""
    held, events, old, requests, socket = parts
    assert held.take(WORKER, push(1, block=0), bare=True)
    new = held._lanes.device_lanes[0] = Lane({0: Event(done=True)})
    events[0].done = True
    held.release()
    assert requests.handled == []
    [(peer, error)] = socket.sent
    assert peer == WORKER and error.kind == P.PEER_LOST and "device lane of worker 0 was closed" in error.message
    assert new.flags_written == [] and old.flags_written == []  # the new lane's numbers are its own


def test_a_refused_request_of_a_connection_that_is_not_the_workers_writes_no_flag(parts):
    held, events, lane, requests, socket = parts
    requests.refuse.add(0)
    held._handle(OTHER, push(2, block=0, rank=0), None)  # claims worker 0 on worker 1's connection
    assert lane.flags_written == []
    held._handle(WORKER, push(3, block=0, rank=0), None)
    assert lane.flags_written == [(0, 103)]
