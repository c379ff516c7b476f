"""The wire format: one msgpack header frame, then raw tensor frames.

Every message is ``[header, frame, frame, ...]``. The header is a msgpack map with at least
``op`` (a string); tensor frames are the raw bytes of contiguous tensors, sent zero-copy and
received into preallocated memory. Nothing is ever pickled.

>>> header = unpack_header(pack_header({"op": "pull", "req": 1, "block": 0}))
>>> header["op"]
'pull'
"""

from __future__ import annotations

from typing import Any

import msgpack

from .errors import ProtocolError

# scheduler <-> nodes
HELLO = "hello"
WELCOME = "welcome"
HEARTBEAT = "heartbeat"
HEARTBEAT_ACK = "hb_ack"
REGISTER = "register"
REGISTERED = "registered"
SETUP = "setup"
SETUP_DONE = "setup_done"
BARRIER = "barrier"
BARRIER_DONE = "barrier_done"
BYE = "bye"
BYE_ACK = "bye_ack"
SHUTDOWN = "shutdown"
CHECKPOINT = "checkpoint"        # worker -> scheduler, collective
CHECKPOINT_DONE = "checkpoint_done"
RESTORE = "restore"              # worker -> scheduler, collective
RESTORE_DONE = "restore_done"
SAVE = "save"                    # scheduler -> server
SAVED = "saved"
LOAD = "load"                    # scheduler -> server
LOADED = "loaded"
ACTIVATE = "activate"            # scheduler -> server: a worker that joined late takes part from now
ACTIVATED = "activated"
# workers <-> servers
PUSH = "push"
PULL = "pull"
PUSH_PULL = "push_pull"
INIT = "init"
ATTACH = "attach"                # worker -> server: map my shared-memory lane (same host)
ACK = "ack"
VALUES = "values"
STATS = "stats"
# either direction
ERROR = "error"

# error kinds carried in ERROR replies, mapped back to exception classes by the receiver
BAD_REQUEST = "bad_request"
REGISTRATION = "registration"
PEER_LOST = "peer_lost"
TIMEOUT = "timeout"
PROTOCOL = "protocol"
CHECKPOINT_ERROR = "checkpoint"

MAX_HEADER_BYTES = 1 << 20


def pack_header(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def unpack_header(frame: bytes | memoryview) -> dict[str, Any]:
    """Decode a header frame, raising ProtocolError for anything that is not a valid header."""
    if len(frame) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header frame of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable header frame ({len(frame)} bytes): {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("op"), str):
        raise ProtocolError(f"header is not a map with a string 'op': {str(header)[:80]!r}")
    return header


def error_header(kind: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"op": ERROR, "kind": kind, "message": message, **extra}
