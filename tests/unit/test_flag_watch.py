"""The worker's watch over its streams' waits for servers' flags (``datapath/cuda_ipc.py:FlagWatch``):
when it lets a wait be, when it writes the number itself, and what error it keeps. The GPU tests
of the whole path are in ``tests/integration/test_cuda_ipc.py``; here its parts stand in for a
device lane, its server's process, our events, streams and the driver."""

from __future__ import annotations

import contextlib
import time

import pytest
import torch

import psframework as ps
from psframework.datapath import cuda_ipc
from psframework.datapath.cuda_ipc import FlagWatch


class Event:
    """Completes once ``lane``'s flags hold ``numbers`` (as our stream's copy after its waits would)."""

    def __init__(self, lane: "Lane", numbers: dict[int, int]):
        self.lane, self.numbers = lane, numbers
        self.synchronized = 0

    def query(self) -> bool:
        return all(cuda_ipc._reached(self.lane.flags.get(b, 0), n) for b, n in self.numbers.items())

    def synchronize(self) -> None:
        assert self.query(), "synchronize() on a wait nobody released would hang"
        self.synchronized += 1


class Process:
    pid = 4242

    def __init__(self):
        self.alive = True

    def running(self) -> bool:
        return self.alive


class Lane:
    def __init__(self):
        self.flags: dict[int, int] = {}
        self.peer = Process()
        self.memory = torch.zeros(8)  # not closed

    def flag_value(self, block_id: int) -> int:
        return self.flags.get(block_id, 0)

    def flag_address(self, block_id: int) -> int:
        return 0x1000 + 4 * block_id


class Driver:
    """Stands in for ``memops()``: a write lands in the lane it was aimed at."""

    def __init__(self, lanes: list[Lane]):
        self.lanes, self.writes = lanes, []
        self.streams: list[int] = []  # made and not destroyed

    def new_stream(self) -> int:
        self.streams.append(100 + len(self.streams))
        return self.streams[-1]

    def destroy_stream(self, handle: int) -> None:
        self.streams.remove(handle)

    def write(self, stream: int, address: int, number: int) -> None:
        self.writes.append((address, number))
        for lane in self.lanes:
            lane.flags[(address - 0x1000) // 4] = number


class Stream:
    """A stream of the driver's own (``MemOps.new_stream``), as torch wraps it."""

    def __init__(self, handle: int, device=None):
        self.cuda_stream = handle

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


@pytest.fixture
def parts(monkeypatch):
    lane = Lane()
    driver = Driver([lane])
    monkeypatch.setattr(cuda_ipc, "memops", lambda: driver)
    monkeypatch.setattr(cuda_ipc.torch.cuda, "ExternalStream", Stream)
    monkeypatch.setattr(cuda_ipc.torch.cuda, "current_stream", lambda device=None: Stream(0))
    monkeypatch.setattr(cuda_ipc.torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(cuda_ipc.torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(cuda_ipc, "LIVENESS_EVERY", 0.01)
    monkeypatch.setattr(cuda_ipc, "CLOSE_GRACE", 0.1)
    epoch = [0]
    watch = FlagWatch("cuda:0", lambda: epoch[0])
    watch.epoch = epoch  # the test's handle on the job's rollback epoch
    yield watch, lane, driver
    watch.close()


def _until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within 5 s"
        time.sleep(0.01)


def test_a_wait_the_server_answers_is_let_be(parts):
    watch, lane, driver = parts
    passed = Event(lane, {0: 1, 3: 1})
    watch.watch(lane, 0, {0: 1, 3: 1}, [passed])
    time.sleep(0.05)
    lane.flags.update({0: 1, 3: 1})  # the server's stream wrote them
    _until(lambda: not watch._pending)
    watch.check()
    assert driver.writes == []


def test_a_server_that_dies_first_has_its_missing_flags_written_and_its_death_raised_once(parts):
    watch, lane, driver = parts
    lane.flags[0] = 1  # block 0's values came, block 3's did not
    passed = Event(lane, {0: 1, 3: 1})
    watch.watch(lane, 2, {0: 1, 3: 1}, [passed])
    time.sleep(0.05)
    watch.check()  # nothing yet: the server lives
    lane.peer.alive = False
    _until(passed.query)
    assert driver.writes == [(lane.flag_address(3), 1)]
    with pytest.raises(ps.PeerLostError, match=r"server 2 \(pid 4242 on .*\) died while writing the values of "
                                               r"blocks \[3\]"):
        watch.check()
    watch.check()


def test_a_server_that_wrote_its_flags_and_then_exited_is_no_error(parts):
    """Its flags were written, but our stream had not passed its waits yet when the watch looked."""
    watch, lane, driver = parts
    passed = Event(lane, {0: 2})
    passed.query = lambda: False  # our stream is still busy with earlier work
    lane.flags[0] = 2
    lane.peer.alive = False
    watch.watch(lane, 0, {0: 2}, [passed])
    _until(lambda: not watch._pending)
    watch.check()
    assert driver.writes == []


def test_a_live_server_past_the_deadline_after_its_answer_is_a_timeout(parts, monkeypatch):
    """The deadline runs from the answer: before it, a sync step may wait for the slowest worker
    for as long as that one takes."""
    watch, lane, driver = parts
    monkeypatch.setattr(cuda_ipc, "PEER_EVENT_DEADLINE", 0.1)
    passed = [Event(lane, {1: 5})]
    watch.watch(lane, 0, {1: 5}, passed, answered=False)
    time.sleep(0.5)
    assert not passed[0].query() and driver.writes == []
    watch.check()
    watch.answered(passed)
    _until(passed[0].query)
    with pytest.raises(ps.PSTimeoutError, match="server 0 writing the values of blocks \\[1\\] into the device "
                                                "lane: not done in 0 s"):
        watch.check()


def test_closing_releases_what_is_still_pending_without_an_error(parts):
    watch, lane, driver = parts
    passed = Event(lane, {0: 1})
    watch.watch(lane, 0, {0: 1}, [passed])
    assert driver.streams == [100]  # the watch's own stream, none of torch's pool
    watch.close()
    assert passed.query() and driver.writes == [(lane.flag_address(0), 1)]
    watch.check()
    assert watch._thread is None and driver.streams == []


def test_a_lane_let_go_has_its_waits_released_and_passed_before_it_closes(parts):
    watch, lane, driver = parts
    other = Lane()
    driver.lanes.append(other)
    mine, theirs = Event(lane, {0: 1}), Event(other, {4: 9})
    watch.watch(lane, 0, {0: 1}, [mine])
    watch.watch(other, 1, {4: 9}, [theirs])
    other.flags[0] = 1  # the driver writes into every lane: keep the other lane's own flags apart
    watch.let_go(lane, 0)
    assert mine.query()
    assert all(wait.lane is other for wait in watch._pending)
    watch.check()


def test_a_restarted_servers_old_error_is_forgotten(parts):
    """The old process died with a flag pending: the watch released it and kept the death; the
    restart that follows (``let_go``) is the answer to it, and the next exchange must not fail."""
    watch, lane, driver = parts
    passed = Event(lane, {0: 1})
    watch.watch(lane, 3, {0: 1}, [passed])
    lane.peer.alive = False
    _until(passed.query)
    watch.let_go(lane, 3)
    watch.check()


def test_a_refused_request_has_its_flag_written_at_once(parts):
    watch, lane, driver = parts
    watch.release_now(lane, {2: 7})
    assert driver.writes == [(lane.flag_address(2), 7)] and lane.flags[2] == 7


def test_a_wait_the_watch_cannot_look_at_is_an_error_not_a_dead_thread(parts):
    """Reading a flag fails (the GPU is gone): the error is kept for the next request, and the
    watch goes on with the other waits."""
    watch, lane, driver = parts
    broken = Lane()
    broken.peer.alive = False

    def unreadable(block_id):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    broken.flag_value = unreadable
    driver.lanes.append(broken)
    watch.watch(broken, 1, {0: 1}, [Event(broken, {0: 1})])
    with pytest.raises(ps.PSError, match="server 1: could not watch the device lane's flags .*illegal memory access"):
        _until(lambda: watch.check() or False, seconds=5)
    assert (broken.flag_address(0), 1) in driver.writes  # the release is tried all the same
    passed = Event(lane, {0: 1})
    watch.watch(lane, 0, {0: 1}, [passed])
    lane.flags[0] = 1
    _until(lambda: not watch._pending)
    watch.check()


def test_a_dead_servers_error_is_void_once_the_job_went_back(parts):
    """A rollback follows a server's death (the scheduler raises the epoch before the restarted
    server's new address is out): the error kept before it must not fail the refresh after it."""
    watch, lane, driver = parts
    passed = Event(lane, {0: 1})
    watch.watch(lane, 3, {0: 1}, [passed])
    lane.peer.alive = False
    _until(passed.query)
    with pytest.raises(ps.PeerLostError):  # kept while the job has not gone back...
        watch.check()
    watch.watch(lane, 3, {1: 1}, [Event(lane, {1: 1})])
    _until(lambda: not watch._pending)  # ... and kept again
    watch.epoch[0] = 1
    watch.check()  # ... but not once it has
