from __future__ import annotations

import msgpack
import pytest
import torch

import psframework as ps
from psframework import protocol as P
from psframework.buffers import byte_view
from psframework.config import (NodeConfig, SchedulerConfig, Timing, config_to_env, node_config_from_env,
                                scheduler_config_from_env)
from psframework.transport import MemoryTransport


def test_public_surface_is_sorted_and_complete():
    assert ps.__all__ == sorted(ps.__all__)
    for name in ps.__all__:
        assert getattr(ps, name) is not None
    assert issubclass(ps.PeerLostError, ps.PSError) and issubclass(ps.RegistrationError, ps.ConfigError)


def test_header_round_trip():
    message = P.Pull(req=1, block=3, rank=0, segs=[1, 2])
    assert P.decode(P.encode(message)) == message
    assert msgpack.unpackb(P.encode(message)) == {"op": "pull", "req": 1, "block": 3, "rank": 0, "segs": [1, 2]}


@pytest.mark.parametrize("frame", [b"", b"\xc1", msgpack.packb([1]), msgpack.packb({"op": 3}),
                                   msgpack.packb({1: "x"}), b"\x00" * (P.MAX_HEADER_BYTES + 1)])
def test_bad_headers_are_protocol_errors(frame):
    with pytest.raises(ps.ProtocolError):
        P.decode(frame)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16])
def test_byte_view_is_zero_copy_and_writable(dtype):
    t = torch.zeros(3, 2, dtype=dtype)
    view = byte_view(t)
    assert len(view) == t.numel() * t.element_size()
    view[:] = bytes(torch.ones(3, 2, dtype=dtype).view(torch.uint8).reshape(-1).tolist())
    assert torch.equal(t, torch.ones(3, 2, dtype=dtype))
    assert len(byte_view(torch.zeros(()))) == 4


def test_memory_transport_streams_frames():
    t = MemoryTransport()
    server = t.listen("x")
    client = t.connect(server.address)
    client.send([b"head", b"abcd", b"ef"])
    assert t.poll([server], 1.0) == [server]
    peer, head = server.recv_header()
    buf = bytearray(4)
    assert head == b"head" and server.recv_into(buf) == 4 and bytes(buf) == b"abcd"
    assert server.more() and server.skip_rest() == 1 and not server.more()
    server.send([b"reply"], peer=peer)
    assert client.recv_header() == (None, b"reply")


@pytest.mark.parametrize("kwargs,words", [
    (dict(num_workers=0, num_servers=1), "worker"),
    (dict(num_workers=1, num_servers=0), "server"),
    (dict(num_workers=1, num_servers=1, mode="fast"), "mode"),
    (dict(num_workers=1, num_servers=1, staleness=-1), "staleness"),
    (dict(num_workers=1, num_servers=1, server_device="gpu"), "device"),
])
def test_scheduler_config_validates(kwargs, words):
    with pytest.raises(ps.ConfigError, match=words):
        SchedulerConfig(**kwargs)


def test_timing_validates():
    with pytest.raises(ps.ConfigError, match="twice"):
        Timing(heartbeat_interval=1.0, heartbeat_timeout=1.5)


def test_env_config():
    env = {"PS_SCHEDULER": "tcp://h:1", "PS_RANK": "3", "PS_NUM_WORKERS": "4", "PS_MODE": "ssp",
           "PS_STALENESS": "1", "PS_HEARTBEAT_TIMEOUT": "9"}
    node = node_config_from_env(env)
    assert (node.scheduler, node.rank) == ("tcp://h:1", 3)
    sched = scheduler_config_from_env(env, num_servers=2)
    assert (sched.num_workers, sched.num_servers, sched.mode, sched.staleness) == (4, 2, "ssp", 1)
    assert sched.timing.heartbeat_timeout == 9
    with pytest.raises(ps.ConfigError, match="PS_RANK"):
        node_config_from_env({**env, "PS_RANK": "x"})
    with pytest.raises(ps.ConfigError, match="scheduler"):
        node_config_from_env({})
    with pytest.raises(ps.ConfigError, match="tcp://HOST:PORT"):
        NodeConfig(scheduler="h:1")


def test_gpu_tensors_go_direct_by_default_and_ps_direct_gpu_0_turns_it_off():
    env = {"PS_SCHEDULER": "tcp://h:1", "PS_RANK": "0"}
    assert node_config_from_env(env).direct_paths == (True, True)
    assert node_config_from_env({**env, "PS_DIRECT_GPU": "0"}).direct_paths == (True, False)


def test_readme_lists_every_environment_variable():
    from pathlib import Path

    from psframework.config import ENV_VARS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [name for name in ENV_VARS if name not in readme]
    assert not missing, f"README.md does not document {missing}"


def test_closing_a_transport_with_a_socket_left_open_does_not_hang(caplog):
    import time

    from psframework.transport import ZmqTransport

    transport = ZmqTransport()
    server = transport.listen("127.0.0.1")
    left_open = transport.connect(server.address)  # never closed, as by a thread left behind
    server.close()
    start = time.monotonic()
    transport.close(timeout=0.5)
    assert time.monotonic() - start < 3
    assert "still open" in caplog.text
    left_open.close()


class _Tracker:
    def __init__(self):
        self.done = False


def test_reply_credits_hold_back_what_exceeds_a_peers_budget_and_release_it_in_order():
    from psframework.server.credits import ReplyCredits

    credits = ReplyCredits(peer_budget=100, max_deferred=2)
    assert credits.room(b"a", 500), "a peer with nothing in flight always gets one reply"
    first = _Tracker()
    credits.sent(b"a", 500, first)
    assert not credits.room(b"a", 10) and credits.room(b"b", 10)
    assert credits.defer(b"a", "x") and credits.defer(b"a", "y") and not credits.defer(b"a", "z")
    assert credits.waiting and credits.release() == []
    first.done = True
    assert credits.release() == ["x", "y"] and not credits.waiting
    credits.sent(b"b", 50, None)  # copied: nothing in flight
    assert credits.room(b"b", 100)


def test_blocks_are_larger_by_default_where_the_shards_are_on_gpus():
    from psframework.sharding import DEFAULT_CHUNK_BYTES, GPU_CHUNK_BYTES

    assert SchedulerConfig(num_workers=1, num_servers=1).block_bytes() == DEFAULT_CHUNK_BYTES
    assert SchedulerConfig(num_workers=1, num_servers=1, server_device="cpu").block_bytes(True) == DEFAULT_CHUNK_BYTES
    assert SchedulerConfig(num_workers=1, num_servers=1, server_device="cuda:1").block_bytes() == GPU_CHUNK_BYTES
    assert SchedulerConfig(num_workers=1, num_servers=1, server_device="cuda", chunk_bytes=4096).block_bytes(True) == 4096
    env = {"PS_SERVER_DEVICE": "cuda"}
    assert scheduler_config_from_env(env).block_bytes() == GPU_CHUNK_BYTES
    assert scheduler_config_from_env({**env, "PS_CHUNK_BYTES": "8192"}).block_bytes() == 8192


def test_one_gpu_server_reached_by_device_lanes_only_gets_whole_blocks_up_to_the_message_size():
    """Blocks of one GPU server that every worker reaches by CUDA IPC pipeline nothing: the default
    packs up to 1 GiB into one, never more than a message may carry; several servers keep 64 MiB."""
    from psframework.sharding import DEVICE_LANE_CHUNK_BYTES, GPU_CHUNK_BYTES

    one = SchedulerConfig(num_workers=2, num_servers=1, server_device="cuda")
    assert one.block_bytes(device_lanes_only=True) == DEVICE_LANE_CHUNK_BYTES
    assert one.block_bytes(device_lanes_only=False) == GPU_CHUNK_BYTES
    assert SchedulerConfig(num_workers=2, num_servers=2, server_device="cuda").block_bytes(True) == GPU_CHUNK_BYTES
    assert SchedulerConfig(num_workers=2, num_servers=1, server_device="cuda",
                           max_message_bytes=128 << 20).block_bytes(True) == 128 << 20
    assert "PS_CHUNK_BYTES" not in config_to_env(one)  # the scheduler picks it at registration
    assert config_to_env(SchedulerConfig(num_workers=1, num_servers=1, chunk_bytes=4096))["PS_CHUNK_BYTES"] == "4096"
