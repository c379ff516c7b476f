"""The wire format: a typed, versioned msgpack header frame, then raw tensor frames.

Every message is ``[header, frame, frame, ...]``. The header is one of the message classes below:
a ``msgspec.Struct`` encoded as a msgpack map whose ``op`` field names its kind. ``decode`` turns
a header frame back into its class and checks every field's type in the same pass; anything else
(garbage, an unknown kind, a missing or mistyped field) is a ``ProtocolError`` that says which kind
and which field. Tensor frames are the raw bytes of contiguous tensors, sent zero-copy and
received into preallocated memory. Nothing is ever pickled.

A node's ``Hello`` and the scheduler's ``Welcome`` carry ``VERSION``: a peer that speaks another
version is refused with an error that names both versions and both hosts.

>>> decode(encode(Pull(req=1, block=0, rank=0))) == Pull(req=1, block=0, rank=0)
True
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any, Optional, Union

import msgpack
import msgspec

from .errors import ProtocolError

VERSION = 14  # 14: a worker introduces its exports before any request names them (MapExports, ExportsMapped); 13: a server that cannot map a worker's export says so (Error kind unmapped); 12: the direct exchange: a lane request may name where its gradients and destination lie in the worker's memory (BlockRequest.direct, exports, gone; Attach/AttachDevice/Attached.direct); 11: a device lane request names the number the server writes into its block's flag (BlockRequest.flag); 10: a worker sends a device lane's push before its copy into the slot is done (AttachDevice.events); 9: a server answers a device lane with its events (Attached.events) and answers through it before its device work is done; 8: readers (ReaderWelcome, IntroduceReader, Read, ReadRows); 7: rows of tables through the lanes (row areas); 6: Registered names the initialising worker; 5: a server offers its values in shared memory (Attached, shared answers)
MAX_HEADER_BYTES = 1 << 20

# error kinds carried in Error messages, mapped back to exception classes by the receiver
BAD_REQUEST = "bad_request"
REGISTRATION = "registration"
PEER_LOST = "peer_lost"
TIMEOUT = "timeout"
PROTOCOL = "protocol"
CONFIG = "config"
CHECKPOINT_ERROR = "checkpoint"
ROLLED_BACK = "rolled_back"
UNMAPPED = "unmapped"  # a server cannot map memory a direct request named: send it through the lane


class Message(msgspec.Struct, tag_field="op", kw_only=True, omit_defaults=True, frozen=True):
    """Base of every message kind; ``op`` (the tag) is the kind's name on the wire."""


# ----------------------------------------------------------------------------- scheduler <-> nodes


class NodeInfo(msgspec.Struct, frozen=True):
    role: str
    rank: int
    host: str
    pid: int
    reason: str = ""


class TensorInfo(msgspec.Struct, frozen=True):
    name: str
    shape: list[int]
    dtype: str


class Hello(Message, tag="hello"):
    role: str
    host: str
    pid: int
    version: int = 0  # 0: a peer from before versions were sent
    rank: Optional[int] = None
    address: str = ""  # a server's data socket


class Welcome(Message, tag="welcome"):
    rank: int
    num_workers: int
    num_servers: int
    mode: str
    staleness: int
    servers: list[str]
    heartbeat_interval: float
    heartbeat_timeout: float
    chunk_bytes: int  # the job's usual block size; the placement's own is in the shard map (Registered)
    host: str  # the scheduler's
    version: int = 0
    server_device: Optional[str] = None
    elastic: bool = False
    token: str = ""  # this node's proof of who it is: heartbeats carry it, a worker introduces itself to servers with it
    max_message_bytes: int = 0  # the largest frame the job's processes accept (0: not said)
    worker_keys: dict[int, str] = {}  # servers: sha256 of each worker's token, to check introductions
    reader_key: str = ""  # servers: the key readers' tokens are made with (``reader_token``)


class ReaderWelcome(Message, tag="reader_welcome"):
    """The scheduler's answer to a reader's hello, once the job's tensors are registered."""
    reader: int
    token: str  # ``reader_token`` of the job's reader key: servers check it without being told
    servers: list[str]
    shard_map: dict[str, Any]
    mode: str
    host: str  # the scheduler's
    version: int = 0
    heartbeat_timeout: float = 10.0
    max_message_bytes: int = 0


class Heartbeat(Message, tag="heartbeat"):
    role: str
    rank: int
    token: str = ""
    stats: dict[str, Union[int, float]] = {}


class HeartbeatAck(Message, tag="hb_ack"):
    epoch: int
    servers: list[str]
    dead: list[NodeInfo] = []  # nodes whose death ends the job
    left: list[int] = []  # workers that closed
    departed: list[int] = []  # workers an elastic job goes on without
    shutdown: bool = False
    rollback: int = 0  # how many times the job went back to a checkpoint (scheduler/rollback.py)
    rollback_step: int = 0  # the step it last went back to


class Register(Message, tag="register"):
    rank: int
    tensors: list[TensorInfo]
    optimizer: dict[str, Any]
    tables: list[dict[str, Any]] = []  # TableSpec.to_wire() of each embedding table
    device_lanes: bool = False  # its tensors are on a GPU, to go by CUDA IPC where a server shares its host


class Registered(Message, tag="registered"):
    shard_map: dict[str, Any]
    joined: bool = False  # a late worker of an elastic job: skip the start-up
    initialiser: int = 0  # the worker whose values initialise the servers (the lowest rank registered)
    barrier_seq: int = 0


class Setup(Message, tag="setup"):
    shard_map: dict[str, Any]
    optimizer: dict[str, Any]


class SetupDone(Message, tag="setup_done"):
    blocks: int


class Barrier(Message, tag="barrier"):
    rank: int
    seq: int


class BarrierDone(Message, tag="barrier_done"):
    seq: int


class Bye(Message, tag="bye"):
    rank: int
    steps: int = -1  # the steps it completed, for the job's summary (-1: not said)


class ByeAck(Message, tag="bye_ack"):
    pass


class Checkpoint(Message, tag="checkpoint"):
    """A worker's part of a collective checkpoint."""
    rank: int
    directory: str
    step: int
    rollback: int = 0  # the rollback epoch its step counts in: a part from before a rollback is refused


class CheckpointDone(Message, tag="checkpoint_done"):
    step: int
    path: str


class Restore(Message, tag="restore"):
    """A worker's part of a collective restore."""
    rank: int
    directory: str


class RestoreDone(Message, tag="restore_done"):
    step: Optional[int] = None  # None: there was no checkpoint yet
    path: str = ""


class Save(Message, tag="save"):
    path: str


class Saved(Message, tag="saved"):
    path: str
    sha256: str
    bytes: int


class Load(Message, tag="load"):
    path: str
    sha256: str
    rollback: int = 0  # the job's rollback epoch once loaded (a restarted server sends everyone back)
    step: int = 0  # the checkpoint's step


class Loaded(Message, tag="loaded"):
    path: str


class Activate(Message, tag="activate"):
    """A worker that joined an elastic job late takes part from each block's next step."""
    worker: int
    epoch: int
    key: str = ""  # sha256 of its token


class Activated(Message, tag="activated"):
    worker: int


# ----------------------------------------------------------------------------- workers <-> servers


class BlockRequest(Message):
    """A request about one block: ``segs`` None means all its segments. ``more``: more pushes of the
    same exchange to this server follow. ``shm``: the tensors are in the worker's shared-memory lane;
    ``ipc``: in its device lane (``datapath/cuda_ipc.py``).
    ``step``: which of the worker's pushing steps a push belongs to (-1: not counted). ``absent``:
    segments (of ``segs``) pushed without a gradient; no frame or lane data carries them. ``codecs``:
    the codec of each pushed segment's frame (``ps.compress``; "" raw; empty: all raw);
    ``pull_codecs``: of each segment of ``segs`` in the answer (socket requests only). ``shared``:
    a lane request whose answer may leave the values in the server's shared values
    (``datapath/values.py``) instead of the lane's pull slot. ``flag``: a device-lane request's
    number, which the server's stream writes into the block's flag in the lane once the values
    are in the pull slot (0: the worker waits for the server's event instead). ``direct``: a lane
    ``PushPull`` of a whole block whose gradients and destination each lie in one region of worker
    memory that the server maps (``datapath/exports.py``): [gradient's export, byte offset,
    destination's export, byte offset], the lane's slots not used; or the gradient's two alone,
    the values answered as any lane request's. ``exports``: (id, handle,
    bytes) of the exports it names (each opened once), ``gone``: ids the server is to unmap."""
    req: int
    block: int
    rank: int
    dtype: str = ""
    segs: Optional[list[int]] = None
    more: bool = False
    shm: bool = False
    ipc: bool = False
    step: int = -1
    absent: list[int] = []
    rollback: int = 0  # the rollback epoch the worker knows of: requests of an earlier one are refused
    codecs: list[str] = []
    pull_codecs: list[str] = []
    shared: bool = False
    flag: int = 0
    direct: list[int] = []
    exports: list[tuple[int, bytes, int]] = []
    gone: list[int] = []


class Push(BlockRequest, tag="push"):
    pass


class Pull(BlockRequest, tag="pull"):
    pass


class PushPull(BlockRequest, tag="push_pull"):
    pass


class Init(BlockRequest, tag="init"):
    """Rank 0's initial values of a block."""


class Introduce(Message, tag="introduce"):
    """A worker's first message on a connection to a server: it speaks for worker ``rank``, and
    proves it with the token the scheduler gave it (no answer)."""
    rank: int
    token: str


class IntroduceReader(Message, tag="introduce_reader"):
    """A reader's first message on a connection to a server (no answer): it may read, nothing else."""
    reader: int
    token: str


class Read(Message, tag="read"):
    """A reader's pull of a block's segments (``segs`` None: all), answered with ``Values`` once the
    block's version is at least ``at_least``: never counted in any step."""
    req: int
    block: int
    segs: Optional[list[int]] = None
    at_least: int = 0


class Mark(Message, tag="mark"):
    """A sync worker's step pushes nothing to this server (no answer): a step of the worker's that
    a server sees without a block it waits for shows that the workers push different tensors."""
    rank: int
    step: int


class RowRequest(Message):
    """A request about the rows of embedding tables on one server. For each of ``tables`` (indices
    into the shard map's tables) ``counts`` ids follow as an int64 frame, and for a push as many rows
    of gradients as a float32 frame; ids are distinct per table. ``shm``: they are in the worker's
    lane instead (``datapath/lane.py``, its row areas), and so are the rows answered."""
    req: int
    rank: int
    tables: list[int] = []
    counts: list[int] = []
    step: int = -1
    rollback: int = 0
    shm: bool = False


class PullRows(RowRequest, tag="pull_rows"):
    """``train``: rows may be created (and admitted); ``after``: answer only once this many more of
    the worker's row pushes are applied (a prefetch for the next step)."""
    train: bool = True
    after: int = 0


class PushRows(RowRequest, tag="push_rows"):
    pass


class ReadRows(RowRequest, tag="read_rows"):
    """A reader's lookup of rows (``rank``: the reader): answered with the current rows; never
    creates a row, never counted in any step."""


class InitRows(RowRequest, tag="init_rows"):
    """Rank 0's pretrained rows (ids, then values)."""


class RowValues(Message, tag="row_values"):
    """The rows asked for, one float32 frame per table of the request (``shm``: in the lane's row area)."""
    req: int
    version: int
    shm: bool = False


class Attach(Message, tag="attach"):
    """Map my shared-memory lane (a worker on the server's host); ``row_bytes``: of each of its
    row areas, after the blocks' slots (0: none); ``direct``: the worker may name regions of its
    shared host memory in its requests (``BlockRequest.direct``)."""
    req: int
    rank: int
    path: str
    token: bytes
    row_bytes: int = 0
    direct: bool = False


class AttachDevice(Message, tag="attach_device"):
    """Map my device lane by CUDA IPC (a worker whose lane the server took, tensors on a GPU): the
    fields of torch's sharing of a CUDA storage, the lane's size and the token at its start;
    ``events``: the handles of the interprocess events the worker records once a block's gradients
    are in its push slot, by block id in ascending order (``datapath/cuda_ipc.py``), and the
    worker's ``pid`` and its ``started`` time (``datapath/peer_process.py``). ``direct``: the worker
    may name regions of its GPU memory in its requests (``BlockRequest.direct``); ``probe``: the
    handle, size and offset of a small allocation of its with ``token`` at that offset, for the
    server to check that it can map the worker's memory."""
    req: int
    rank: int
    token: bytes
    device: int
    handle: bytes
    size: int
    offset: int
    counter_handle: bytes
    counter_offset: int
    event_handle: bytes
    event_sync: bool
    nbytes: int
    events: list[bytes] = []
    pid: int = 0
    started: int = 0
    direct: bool = False
    probe: tuple[bytes, int, int] = (b"", 0, 0)


class MapExports(Message, tag="map_exports"):
    """Map these exports of my memory (``device``: GPU, else host), each (id, handle, size), before
    any request names them: a worker sends what the server cannot map through its lane instead;
    ``gone``: let go of these (as ``BlockRequest.gone``)."""
    req: int
    rank: int
    device: bool
    exports: list[tuple[int, bytes, int]]
    gone: list[int] = []


class ExportsMapped(Message, tag="exports_mapped"):
    """The exports of a ``MapExports`` that the server could not map (``reason``: why the first
    of them could not); it maps the others."""
    req: int
    refused: list[int] = []
    reason: str = ""


class Ack(Message, tag="ack"):
    req: int


class Attached(Message, tag="attached"):
    """A server mapped a worker's lane; ``values``, if not empty: where the worker may map the
    server's block values (``datapath/values.py``), with the token at their start. For a device
    lane, ``events``: the handles of the interprocess events the server records once a block's
    values are in its pull slot, by block id in ascending order (``datapath/cuda_ipc.py``), and
    the server's ``pid`` and its ``started`` time (``datapath/peer_process.py``). ``direct``: the
    server maps the worker's memory that requests name (``BlockRequest.direct``)."""
    req: int
    values: str = ""
    token: bytes = b""
    events: list[bytes] = []
    pid: int = 0
    started: int = 0
    direct: bool = False


class Values(Message, tag="values"):
    req: int
    version: int
    min_clock: int
    shm: bool = False
    shared: bool = False  # the values are in the server's shared values, not in the lane's pull slot
    rollback: int = 0  # the job's rollback epoch as the server knows it (a reader's snapshot spans one)


class Stats(Message, tag="stats"):
    req: int


class StatsReply(Message, tag="stats_reply"):
    req: int
    counters: dict[str, Any]


# ----------------------------------------------------------------------------- either direction


class Error(Message, tag="error"):
    kind: str
    message: str
    req: Optional[int] = None
    rollback: int = 0  # kind rolled_back: the job's rollback epoch
    step: int = 0  # kind rolled_back: the step the job went back to


ALL = (Hello, Welcome, Heartbeat, HeartbeatAck, Register, Registered, Setup, SetupDone, Barrier, BarrierDone,
       Bye, ByeAck, Checkpoint, CheckpointDone, Restore, RestoreDone, Save, Saved, Load, Loaded, Activate,
       Activated, Push, Pull, PushPull, Init, PullRows, PushRows, InitRows, RowValues, Introduce, Mark,
       ReaderWelcome, IntroduceReader, Read, ReadRows, Attach, AttachDevice, MapExports, ExportsMapped, Ack, Attached, Values, Stats, StatsReply, Error)

_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Union[ALL])  # type: ignore[valid-type]


class Rejected(Exception):
    """A message that is answered with an ``Error`` of ``kind`` and otherwise ignored."""

    def __init__(self, kind: str, message: str, **extra: int):
        super().__init__(message)
        self.kind = kind
        self.extra = extra  # more fields of the Error (rollback, step)

    def reply(self, req: Optional[int] = None) -> Error:
        return Error(kind=self.kind, message=str(self), req=req, **self.extra)


def encode(message: Message) -> bytes:
    return _ENCODER.encode(message)


def decode(frame: Union[bytes, memoryview]) -> Message:
    """The message in a header frame; ``ProtocolError`` for anything that is not one."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        return _DECODER.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"malformed {_kind(frame)} message ({len(frame)} bytes): {exc}") from None


def request_id(frame: Union[bytes, memoryview]) -> Optional[int]:
    """The ``req`` of a header frame that did not decode, if it has one, for the error reply."""
    header = _loose(frame)
    req = header.get("req") if isinstance(header, dict) else None
    return req if isinstance(req, int) and not isinstance(req, bool) and 0 <= req < 2**63 else None


def _kind(frame) -> str:
    header = _loose(frame)
    op = header.get("op") if isinstance(header, dict) else None
    return repr(op[:40]) if isinstance(op, str) else "unknown"


def _loose(frame) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception:  # msgpack raises several unrelated types for garbage
        return None


def token_key(token: str) -> str:
    """What a server keeps of a worker's token to check its introduction: the token's sha256, so
    that a server cannot speak for a worker to the scheduler."""
    return hashlib.sha256(token.encode()).hexdigest()


def reader_token(key: str, reader: int) -> str:
    """Reader ``reader``'s token: an HMAC of the job's reader key, so that servers check a reader's
    introduction with the key they were given at their welcome, whenever the reader came."""
    return hmac.new(bytes.fromhex(key), f"reader {reader}".encode(), hashlib.sha256).hexdigest()


def check_version(peer_version: int, peer: str, me: str) -> None:
    """Refuse a peer that speaks another protocol version."""
    if peer_version != VERSION:
        spoken = f"version {peer_version}" if peer_version else "a version from before 2"
        raise ProtocolError(f"{peer} speaks psframework protocol {spoken}, {me} speaks version {VERSION}: "
                            "install the same psframework on every host of the job")


__all__ = [
    "ALL", "Ack", "Activate", "Activated", "Attach", "AttachDevice", "Attached", "BAD_REQUEST", "Barrier", "BarrierDone", "BlockRequest", "Bye",
    "ByeAck", "CHECKPOINT_ERROR", "CONFIG", "Checkpoint", "CheckpointDone", "Error", "ExportsMapped", "Heartbeat", "HeartbeatAck",
    "Hello", "Init", "InitRows", "Introduce", "IntroduceReader", "Read", "ReadRows", "ReaderWelcome", "Load", "Loaded", "MAX_HEADER_BYTES", "MapExports", "Mark", "Message", "NodeInfo", "PEER_LOST", "PROTOCOL", "Pull", "PullRows", "PushRows", "RowRequest", "RowValues",
    "Push", "PushPull", "REGISTRATION", "ROLLED_BACK", "Register", "Registered", "Rejected", "Restore", "RestoreDone", "Save",
    "Saved", "Setup", "SetupDone", "Stats", "StatsReply", "TIMEOUT", "TensorInfo", "UNMAPPED", "VERSION", "Values", "Welcome",
    "check_version", "decode", "encode", "reader_token", "request_id", "token_key",
]
