"""CUDA IPC lanes: the data path between a GPU worker and a GPU server of the same host.

A shared-memory lane (``lane.py``) still crosses PCIe twice each way: the worker's gradients go
from its GPU into the lane and from the lane onto the server's GPU, and the values come back the
same way. A *device lane* has the same layout, a push slot and a pull slot for every block of the
server, but lives in the worker's GPU memory, and the server maps it by CUDA IPC: the worker copies
its gradients into the push slot device to device, the server copies them out onto its shards and
its new values into the pull slot, device to device (peer to peer where the two GPUs differ), and
the socket carries only headers.

Ordering is by CUDA events shared between the processes, one per block each way, made at attach
(an interprocess event recorded before the other process opened its handle is not seen there, so
each side opens the other's handles once and records only after that). The worker's events travel
with its offer (``AttachDevice.events``): it records a block's event on its copy stream after
queuing the copy of its gradients into the push slot and sends its header at once, so the header
travels while the copy runs; the server holds the request while that event is pending, serving
other workers (``server/held.py``), and checks it on the host (``wait_pushed``) before it reads
the slot. A direct request (``worker/direct.py``) whose gradient was done before it went records
no event: the event's last record, done too, lets the server go at once, and the GPU is spared a
switch to the worker's context. The server's events travel with its answer to the lane (``Attached.events``):
it records a block's event on its stream after queuing the copy of the values into the pull slot,
and answers at once; the worker waits on the host for it (``wait_written``) before it queues its
copy out of the pull slot. A device-ordered exchange (``push_pull(device_ordered=True)``) names a
number in each request instead, which the server's stream writes into the block's flag
(``memops.py``) after its copy; the worker's copy stream waits for it on the GPU
(``wait_flag``), and ``FlagWatch`` writes the number itself if the server dies first. Each host
wait checks that the other side's process still runs (a killed process's events read as complete, or never complete:
``peer_process.py``) and has a deadline. No side ever queues a wait for the other process's event
on its streams: a peer killed with work in flight leaves its events incomplete for ever, and a
stream of ours waiting for one could never be freed (``benchmarks/ipc_event_death.py`` shows it);
a flag is memory of ours, which we can write when its writer is gone.

A worker offers a device lane only to servers that took its shared-memory lane (which shows they
are on its host) and only where its tensors are on a GPU; the handle travels, with a random token
written at the start of the memory, over the job's authenticated channel to servers the scheduler
admitted. A server that cannot open it (its shards are on the host, the GPUs cannot reach each
other) refuses, and that server's blocks keep using the shared-memory lane. ``PS_CUDA_IPC=0`` turns
device lanes off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch

from .. import protocol as P
from ..errors import ConfigError, PeerLostError, PSError, PSTimeoutError
from .lane import TOKEN_BYTES, Slots, aligned, lane_layout
from .memops import memops
from .peer_process import PeerProcess, start_time

HEADER_BYTES = 512  # the token, then aligned areas
PEER_EVENT_DEADLINE = 60.0  # seconds one side waits for the other's device work on one block, while it lives
LIVENESS_EVERY = 0.05  # seconds between checks that the job's nodes live, while waiting for an event
SPIN = 0.002  # seconds of waiting for an event without pausing (device work takes microseconds)
CLOSE_GRACE = 5.0  # seconds a closing worker gives the servers' pending device work before releasing our waits

log = logging.getLogger("psframework.cuda_ipc")


class DeviceLane(Slots):
    """A worker's lane to one server in GPU memory: made by the worker, mapped by the server.
    After the header, one 32-bit flag per block (``memops.py``): the server's stream writes the
    number a request names into it once the request's values are in the pull slot, and the
    worker's stream waits for that number before its copy out of the slot."""

    on_device = True
    pinned = True

    def __init__(self, memory: torch.Tensor, offsets: dict[int, int], area_bytes: int):
        self._base = device_lane_base(len(offsets))
        super().__init__(memory, offsets, area_bytes)
        self._flag_of = {block_id: i for i, block_id in enumerate(sorted(offsets))}
        self.flags_sent: dict[int, int] = {}  # the worker's side: the last number each block's requests named
        # by block: the worker records it once its gradients are in the push slot
        self.pushed: dict[int, torch.cuda.Event] = {}
        # by block: the server records it once the block's values are in the pull slot
        self.written: dict[int, torch.cuda.Event] = {}
        self.peer: Optional[PeerProcess] = None  # the other side's process

    @classmethod
    def create(cls, device: torch.device, blocks: Iterable[tuple[int, int]]) -> "DeviceLane":
        """Allocate the lane on the worker's GPU, with its push events; ``torch.cuda.OutOfMemoryError``
        if it does not fit."""
        offsets, area = lane_layout(blocks)
        memory = torch.zeros(device_lane_base(len(offsets)) + 2 * area, dtype=torch.uint8, device=device)
        token = torch.frombuffer(bytearray(secrets.token_bytes(TOKEN_BYTES)), dtype=torch.uint8)
        memory[:TOKEN_BYTES].copy_(token)
        lane = cls(memory, offsets, area)
        lane.pushed = _new_events(memory.device, offsets)
        return lane

    def export(self, rank: int, req: int) -> P.AttachDevice:
        """What a server needs to map this lane and see our push events: the request that offers it."""
        (device, handle, size, offset, counter_handle, counter_offset, event_handle,
         event_sync) = self.memory.untyped_storage()._share_cuda_()
        return P.AttachDevice(req=req, rank=rank, token=self.token, device=int(device), handle=bytes(handle),
                              size=int(size), offset=int(offset), counter_handle=bytes(counter_handle),
                              counter_offset=int(counter_offset),
                              event_handle=bytes(event_handle or b""),
                              event_sync=bool(event_sync), nbytes=self.memory.numel(),
                              events=[bytes(event.ipc_handle()) for event in self.pushed.values()],
                              pid=os.getpid(), started=start_time(os.getpid()) or 0)

    @classmethod
    def attach(cls, message: P.AttachDevice, blocks: Iterable[tuple[int, int]],
               device: torch.device) -> "DeviceLane":
        """Map a worker's device lane on our ``device`` (the server's side), checking size and token,
        open its push events and watch its process; ConfigError, or OSError where its process is not
        visible from here."""
        offsets, area = lane_layout(blocks)
        expected = device_lane_base(len(offsets)) + 2 * area
        if message.nbytes != expected:
            raise ConfigError(f"device lane of worker {message.rank} has {message.nbytes} bytes, "
                              f"the shard map needs {expected}")
        storage = torch.UntypedStorage._new_shared_cuda(
            device.index if device.index is not None else torch.cuda.current_device(), message.handle,
            message.size, message.offset, message.counter_handle, message.counter_offset,
            message.event_handle, message.event_sync)
        whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        lane = cls(whole[:expected], offsets, area)
        if lane.token != message.token:
            raise ConfigError(f"device lane of worker {message.rank} holds another token")
        try:
            lane.pushed = lane._open(message.events, message.pid, message.started, f"worker {message.rank}")
        except BaseException:
            lane.close()
            raise
        return lane

    def next_flag(self, block_id: int) -> int:
        """The worker's side: the number a new request on ``block_id`` asks the server to write."""
        number = self.flags_sent[block_id] = self.flags_sent.get(block_id, 0) + 1
        return number

    def _flag_offset(self, block_id: int) -> int:
        return HEADER_BYTES + 4 * self._flag_of[block_id]

    def flag_address(self, block_id: int) -> int:
        """The device address of ``block_id``'s flag in this process."""
        return self.memory.data_ptr() + self._flag_offset(block_id)

    def write_flag(self, stream: "torch.cuda.Stream", block_id: int, number: int) -> None:
        """The server's side: ``stream`` writes ``number`` into ``block_id``'s flag after its work so far."""
        memops().write(stream.cuda_stream, self.flag_address(block_id), number)

    def wait_flag(self, stream: "torch.cuda.Stream", block_id: int, number: int) -> None:
        """The worker's side: ``stream``'s later work waits until ``block_id``'s flag reaches ``number``."""
        memops().wait(stream.cuda_stream, self.flag_address(block_id), number)

    def flag_value(self, block_id: int) -> int:
        """What ``block_id``'s flag holds now (a copy to the host: for the rare checks, not a step)."""
        start = self._flag_offset(block_id)
        return int(self.memory[start:start + 4].view(torch.int32).cpu()) & 0xFFFFFFFF

    def make_events(self, device: torch.device) -> list[bytes]:
        """The server's side: one interprocess event per block; their handles, by block id in
        ascending order, for the worker."""
        self.written = _new_events(device, self.offsets)
        return [bytes(event.ipc_handle()) for event in self.written.values()]

    def open_events(self, reply: P.Message, server: int) -> None:
        """The worker's side: open the server's events (``make_events``) and watch its process, once;
        ConfigError, or OSError where its process is not visible from here."""
        if not isinstance(reply, P.Attached):
            raise ConfigError(f"server {server} answered the device lane with {type(reply).__name__}")
        self.written = self._open(reply.events, reply.pid, reply.started, f"server {server}")

    @property
    def ready(self) -> bool:
        """The worker's side: the server's events are open (only then may requests go through)."""
        return bool(self.written) and self.peer is not None

    def _open(self, handles: list[bytes], pid: int, started: int, who: str) -> dict[int, torch.cuda.Event]:
        """The other side's events, by block, from their handles; its process is watched from now on."""
        if len(handles) != len(self.offsets):
            raise ConfigError(f"{who} sent {len(handles)} events for a device lane of {len(self.offsets)} blocks")
        if self.peer is not None:
            self.peer.close()
        self.peer = PeerProcess(pid, started)
        device = self.memory.device
        return {block_id: torch.cuda.Event.from_ipc_handle(device, handle)
                for block_id, handle in zip(sorted(self.offsets), handles)}

    def record_pushed(self, block_id: int, stream: "torch.cuda.Stream") -> None:
        """The worker's side: the copies of ``block_id``'s gradients into the push slot are queued
        before ``stream``'s work so far."""
        self.pushed[block_id].record(stream)

    def pushed_landed(self, block_id: int) -> None:
        """The worker's side: wait for our own copies into ``block_id``'s push slot (a request the
        server refused before it read the slot frees the slot only then)."""
        event = self.pushed.get(block_id)
        if event is not None:
            event.synchronize()

    def wait_pushed(self, block_id: int, worker: int) -> Optional[PSError]:
        """The server's side: wait until the worker's gradients of ``block_id`` are in the push slot;
        the error instead, if its process dies or the copy takes more than PEER_EVENT_DEADLINE."""
        return self._wait(self.pushed, block_id, "worker", worker,
                          f"copying the gradients of block {block_id} into the device lane", lambda: None)

    def wait_written(self, block_id: int, alive: Callable[[], None], server: int) -> Optional[PSError]:
        """Wait until the server's values of ``block_id`` are in the pull slot; the error instead, if
        the server has no event for it, or dies or takes more than PEER_EVENT_DEADLINE."""
        return self._wait(self.written, block_id, "server", server,
                          f"writing the values of block {block_id} into the device lane", alive)

    def _wait(self, events: dict[int, torch.cuda.Event], block_id: int, role: str, rank: int, doing: str,
              alive: Callable[[], None]) -> Optional[PSError]:
        """Wait for the other side's event of ``block_id``; ``alive()`` raises if the job lost a node."""
        event = events.get(block_id)
        peer = self.peer
        if event is None or peer is None:
            return PSError(f"device lane of {role} {rank}: no event for block {block_id} (the lane's attach "
                           "named none); restart the job")

        def lost() -> PeerLostError:
            return PeerLostError(f"{role} {rank} (pid {peer.pid} on {socket.gethostname()}) died while {doing}",
                                 role=role, rank=rank, host=socket.gethostname())

        def peer_alive() -> None:
            alive()
            if not peer.running():
                raise lost()
        try:
            wait_for_peer(event, peer_alive, f"{role} {rank} {doing}")
        except PSError as exc:
            return exc
        # a killed process's context went away with the work: its event says nothing
        return None if peer.running() else lost()

    @property
    def token(self) -> bytes:
        return bytes(self.memory[:TOKEN_BYTES].cpu().numpy())

    def mapped(self) -> None:
        """Nothing to let go once the server has mapped it (unlike a lane file's descriptor)."""

    def pin(self, device=None) -> bool:
        return True  # device memory

    def copy_push_area(self, other: "Slots") -> None:
        """Take over another lane's push area (a restarted server's fresh lane): the requests resent
        through it find their gradients there, with no push event recorded for them, so the copy
        is done before it is offered. The numbers its requests name go on from the other's."""
        super().copy_push_area(other)
        self.flags_sent = dict(getattr(other, "flags_sent", {}))
        torch.cuda.current_stream(self.memory.device).synchronize()

    def close(self) -> None:
        self.written, self.pushed = {}, {}
        if self.peer is not None:
            self.peer.close()
            self.peer = None
        self.forget_memory()


@dataclass
class _Wait:
    """Waits of our streams for ``numbers`` (block id: number) in ``lane``'s flags; ``passed``: our
    events recorded after them. ``answered``: when the server's answers came (None: not yet, and
    a server may take its time before it answers, a sync step waits for the slowest worker)."""
    lane: "DeviceLane"
    server: int
    numbers: dict[int, int]
    passed: list
    answered: Optional[float] = None


class FlagWatch:
    """The worker's side: streams of ours that wait for servers' flags (``DeviceLane.wait_flag``),
    watched from a thread of our own until they pass. A server that dies before writing a flag
    (or whose device work takes more than PEER_EVENT_DEADLINE after its answer) would leave our
    stream, and every stream ordered after it, waiting for good: the watch then writes the number
    into the flag itself, from a stream of its own, and keeps the error for the worker's next
    exchange (``check``), unless the server is restarted first (``let_go``)."""

    def __init__(self, device: torch.device, epoch: Callable[[], int] = lambda: 0):
        self._device = device
        self._epoch = epoch  # the job's rollback epoch as the worker knows it: a rollback voids older errors
        self._stream: Optional[torch.cuda.Stream] = None
        self._pending: list[_Wait] = []
        self._lock = threading.Lock()  # guards _pending and _failures
        self._sweeping = threading.Lock()  # one look at the waits at a time: none is taken out unseen
        self._wake = threading.Event()
        self._closed = False
        self._failures: dict[int, tuple[PSError, int]] = {}  # by server: the error, and the epoch it was in
        self._thread: Optional[threading.Thread] = None

    def _own_stream(self) -> "torch.cuda.Stream":
        """Our stream for writing and reading flags, made once, outside torch's pool of streams (any
        of those may be one a wait is queued on, or one ordered after such a wait)."""
        with self._lock:
            if self._stream is None:
                torch.cuda.current_stream(self._device).query()  # the device's context is current here
                with torch.cuda.device(self._device):
                    self._stream = torch.cuda.ExternalStream(memops().new_stream(), device=self._device)
            return self._stream

    def watch(self, lane: "DeviceLane", server: int, numbers: dict[int, int], passed: list,
              answered: bool = True) -> None:
        """The events ``passed`` are recorded after the waits for ``numbers`` of ``lane``; ``answered``:
        the server's answers are in (else ``answered()`` says when they are)."""
        self._own_stream()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="psframework-flag-watch", daemon=True)
                self._thread.start()
            self._pending.append(_Wait(lane, server, numbers, passed, time.monotonic() if answered else None))
        self._wake.set()

    def answered(self, passed: list) -> None:
        """The answers of the waits whose events are ``passed`` are in: their deadline runs from now."""
        with self._lock:
            for wait in self._pending:
                if wait.passed is passed and wait.answered is None:
                    wait.answered = time.monotonic()

    def check(self) -> None:
        """Raise (once) the error of a wait the watch had to release, unless the job went back to a
        checkpoint since (the rollback is what follows a server's death)."""
        epoch = self._epoch()
        with self._lock:
            failures = [error for error, when in self._failures.values() if when == epoch]
            self._failures.clear()
        if failures:
            raise failures[0]

    def _run(self) -> None:
        while not self._closed:
            if not self._sweep(final=False):
                self._wake.wait()
                self._wake.clear()
            else:
                time.sleep(LIVENESS_EVERY)

    def _sweep(self, final: bool) -> bool:
        """Look at every pending wait once; whether some are still pending. ``final``: release
        those whose server still works too (the worker is closing)."""
        with self._sweeping:
            with self._lock:
                pending, self._pending = self._pending, []
            left = [wait for wait in pending if not self._settled_or_failed(wait, final)]
            with self._lock:
                self._pending[:0] = left
                return bool(self._pending)

    def _settled_or_failed(self, wait: _Wait, final: bool) -> bool:
        try:
            return self._settled(wait, final)
        except Exception as exc:  # noqa: BLE001 -- a watch that died would leave every later wait unwatched
            self._fail(wait.server, PSError(f"server {wait.server}: could not watch the device lane's flags "
                                            f"({exc}); the GPU may be unusable (see nvidia-smi), or set "
                                            "PS_CUDA_IPC=0"))
            with contextlib.suppress(Exception):  # our stream should not wait for good: try the release
                self.release_now(wait.lane, wait.numbers)
            return True

    def _settled(self, wait: _Wait, final: bool) -> bool:
        lane = wait.lane
        if not lane.memory.numel() or all(event.query() for event in wait.passed):
            return True  # passed (or the lane is closed, its waits released by ``let_go``)
        peer = lane.peer
        alive = peer is not None and peer.running()
        late = wait.answered is not None and time.monotonic() - wait.answered > PEER_EVENT_DEADLINE
        if alive and not late and not final:
            return False
        stream = self._own_stream()
        with torch.cuda.stream(stream):
            missing = {block_id: number for block_id, number in wait.numbers.items()
                       if not _reached(lane.flag_value(block_id), number)}
        if missing and not final:  # kept before the release: once released, our streams go on
            self._fail(wait.server, _never_written(wait.server, peer, alive, sorted(missing)))
        self.release_now(lane, missing)
        return True

    def _fail(self, server: int, error: PSError) -> None:
        log.error("worker: %s", error)
        epoch = self._epoch()
        with self._lock:
            self._failures.setdefault(server, (error, epoch))

    def release_now(self, lane: "DeviceLane", numbers: dict[int, int]) -> None:
        """Write these numbers (block id: number) into ``lane``'s flags ourselves: their server
        refused the requests or is gone, and a copy of ours queued behind the flags must go on."""
        stream = self._own_stream()
        for block_id, number in numbers.items():
            memops().write(stream.cuda_stream, lane.flag_address(block_id), number)
        stream.synchronize()

    def let_go(self, lane: "DeviceLane", server: int) -> None:
        """``lane`` is about to be closed (its server restarted): release our waits on its flags now,
        before its memory can go back to the allocator, and forget the old process's errors (the
        restart is what follows them). The copies behind the waits are waited for outside the
        sweep, so that the thread may release another server's flags they queue behind."""
        with self._sweeping:
            with self._lock:
                mine = [wait for wait in self._pending if wait.lane is lane]
                self._pending = [wait for wait in self._pending if wait.lane is not lane]
            for wait in mine:
                self._settled_or_failed(wait, final=True)
        deadline = time.monotonic() + PEER_EVENT_DEADLINE
        while not all(event.query() for wait in mine for event in wait.passed):
            if time.monotonic() > deadline:
                log.error("worker: copies out of the old device lane of server %d still queued after %.0f s",
                          server, PEER_EVENT_DEADLINE)
                break
            time.sleep(LIVENESS_EVERY)
        with self._lock:
            self._failures.pop(server, None)

    def close(self) -> None:
        """Stop the thread; waits still pending get a few seconds, then are released."""
        deadline = time.monotonic() + CLOSE_GRACE
        while self._pending and time.monotonic() < deadline and self._sweep(final=False):
            time.sleep(LIVENESS_EVERY)
        self._closed = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            if self._thread.is_alive():  # stuck on the device: leave it (a daemon), with its stream
                log.error("worker: the thread watching device lane flags did not stop within 5 s")
                return
            self._thread = None
        self._sweep(final=True)
        if self._stream is not None:
            memops().destroy_stream(self._stream.cuda_stream)
            self._stream = None


def _never_written(server: int, peer: Optional[PeerProcess], alive: bool, blocks: list[int]) -> PSError:
    what = f"writing the values of blocks {blocks} into the device lane"
    if alive:
        return PSTimeoutError(f"server {server} {what}: not done in {PEER_EVENT_DEADLINE:.0f} s; the GPU may be "
                              "hung (see nvidia-smi)")
    return PeerLostError(f"server {server} (pid {peer.pid if peer else '?'} on {socket.gethostname()}) died while "
                         f"{what}", role="server", rank=server, host=socket.gethostname())


def _reached(value: int, number: int) -> bool:
    """Whether a flag holding ``value`` has reached ``number`` (as the stream's wait compares them)."""
    return ((value - number) & 0xFFFFFFFF) < 0x80000000


def device_lane_base(blocks: int) -> int:
    """Where a device lane's slots start: after the header and the flags of its ``blocks`` blocks."""
    return HEADER_BYTES + aligned(4 * blocks)


def _new_events(device: torch.device, offsets: dict[int, int]) -> dict[int, torch.cuda.Event]:
    """One interprocess event per block on ``device``, by block id in ascending order. torch makes
    an event at its first record or export, on the current device then: so each is exported here."""
    with torch.cuda.device(device):
        events = {block_id: torch.cuda.Event(interprocess=True) for block_id in sorted(offsets)}
        for event in events.values():
            event.ipc_handle()
    return events


def wait_for_peer(event: torch.cuda.Event, alive: Callable[[], None], what: str,
                  deadline: float = PEER_EVENT_DEADLINE) -> None:
    """Wait on the host until ``event``, recorded by another process, has completed: spinning at
    first, then pausing between looks; ``alive()`` raises if the peer is gone (checked every
    ``LIVENESS_EVERY``); PSTimeoutError once ``deadline`` seconds have passed."""
    started = time.monotonic()
    next_check = started + LIVENESS_EVERY
    while not _completed(event, what):
        now = time.monotonic()
        if now < started + SPIN:
            continue
        if now >= next_check:
            alive()
            next_check = now + LIVENESS_EVERY
            if now - started > deadline:
                raise PSTimeoutError(f"{what}: the device work has not finished in {deadline:.0f} s; the GPU "
                                     "may be hung (see nvidia-smi)")
        time.sleep(20e-6)


def _completed(event: torch.cuda.Event, what: str) -> bool:
    try:
        return event.query()
    except RuntimeError as exc:  # the CUDA error of a context that went away
        raise PSError(f"{what}: its event failed ({exc})") from None


__all__ = ["HEADER_BYTES", "LIVENESS_EVERY", "FlagWatch", "device_lane_base", "PEER_EVENT_DEADLINE", "SPIN", "DeviceLane", "wait_for_peer"]
