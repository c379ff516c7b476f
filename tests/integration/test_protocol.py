"""Typed, versioned messages: what does not fit gets a clear error, and the node keeps serving."""

from __future__ import annotations

import socket
import threading

import msgpack
import pytest
import torch
import zmq

import psframework as ps
from psframework import protocol as P
from tests.integration.test_core import _raw_client


@pytest.fixture
def joined(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1)
    worker = ps.init(scheduler=cluster.scheduler)
    params = {"w": torch.zeros(100)}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    yield cluster, worker, params
    worker.close()


def _ask(address: str, frames: list[bytes], worker=None) -> P.Message:
    sock = _raw_client(address, worker)
    try:
        sock.send_multipart(frames)
        return P.decode(sock.recv_multipart()[0])
    finally:
        sock.close()


def _still_serves(worker, params) -> None:
    before = params["w"].clone()
    worker.push_pull({"w": torch.ones(100)}, into=params).wait(timeout=10)
    assert torch.equal(params["w"], before - 1)
    worker.barrier(timeout=10)


BAD = [
    ({"op": "nonsense", "req": 5}, ["'nonsense'", "op"]),
    ({"op": "pull", "req": "five", "block": 0, "rank": 0}, ["'pull'", "req", "int", "str"]),
    ({"op": "pull", "req": 5, "rank": 0}, ["'pull'", "missing", "block"]),
    ({"op": "push_pull", "req": 5, "block": 0, "rank": 0, "segs": "all"}, ["segs"]),
]


@pytest.mark.parametrize("bad,words", BAD)
def test_a_server_answers_a_message_that_does_not_fit_with_a_clear_error(joined, bad, words):
    cluster, worker, params = joined
    reply = _ask(worker.membership.servers[0], [msgpack.packb(bad)])
    assert isinstance(reply, P.Error) and reply.kind == P.PROTOCOL
    for word in words:
        assert word in reply.message, reply.message
    assert reply.req == (bad["req"] if isinstance(bad["req"], int) else None)
    _still_serves(worker, params)


@pytest.mark.parametrize("bad,words", BAD[:3])
def test_the_scheduler_answers_a_message_that_does_not_fit_with_a_clear_error(joined, bad, words):
    cluster, worker, params = joined
    reply = _ask(cluster.scheduler, [msgpack.packb(bad)])
    assert isinstance(reply, P.Error) and reply.kind == P.PROTOCOL
    for word in words:
        assert word in reply.message, reply.message
    _still_serves(worker, params)


def test_a_known_message_at_the_wrong_node_is_refused_by_name(joined):
    cluster, worker, params = joined
    reply = _ask(cluster.scheduler, [P.encode(P.Pull(req=3, block=0, rank=0))])
    assert isinstance(reply, P.Error) and "does not handle Pull" in reply.message
    reply = _ask(worker.membership.servers[0], [P.encode(P.Barrier(rank=0, seq=1))], worker)
    assert isinstance(reply, P.Error) and "does not handle Barrier" in reply.message
    _still_serves(worker, params)


@pytest.mark.parametrize("version", [1, 0, P.VERSION + 1])
def test_a_node_of_another_protocol_version_is_refused_naming_both(make_cluster, version):
    cluster = make_cluster(num_servers=1, num_workers=1)
    hello = {"op": "hello", "role": "worker", "host": "oldbox", "pid": 7, "rank": None}
    if version:
        hello["version"] = version
    reply = _ask(cluster.scheduler, [msgpack.packb(hello)])
    assert isinstance(reply, P.Error) and reply.kind == P.PROTOCOL
    spoken = f"version {version}" if version else "a version from before 2"
    assert f"the worker on oldbox speaks psframework protocol {spoken}" in reply.message
    assert f"the scheduler on {socket.gethostname()} speaks version {P.VERSION}" in reply.message
    with ps.init(scheduler=cluster.scheduler) as worker:  # the refused hello took no place in the job
        params = {"w": torch.zeros(100)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        _still_serves(worker, params)


def test_a_worker_refuses_a_scheduler_of_another_version():
    """The other direction: a node that gets a welcome of another version says so and stops."""
    listener = zmq.Context.instance().socket(zmq.ROUTER)
    listener.setsockopt(zmq.LINGER, 0)
    listener.bind("tcp://127.0.0.1:*")
    try:
        address = listener.getsockopt_string(zmq.LAST_ENDPOINT)

        def old_scheduler():
            peer, _ = listener.recv_multipart()
            welcome = {"op": "welcome", "rank": 0, "num_workers": 1, "num_servers": 1, "mode": "sync",
                       "staleness": 0, "servers": [], "heartbeat_interval": 0.5, "heartbeat_timeout": 4.0,
                       "chunk_bytes": 4096, "host": "oldsched", "version": 1}
            listener.send_multipart([peer, msgpack.packb(welcome)])

        thread = threading.Thread(target=old_scheduler, daemon=True)
        thread.start()
        with pytest.raises(ps.ProtocolError, match="the scheduler on oldsched speaks psframework protocol version 1"):
            ps.init(scheduler=address, timeout=10)
        thread.join(5)
    finally:
        listener.close()

