"""The core behaviour, with a real scheduler and servers (processes) and real ZeroMQ on loopback."""

from __future__ import annotations

import json
import os
import signal
import time

import msgpack
import pytest
import torch
import zmq

import psframework as ps
from psframework import protocol as P
from tests.integration import models
from tests.threads import run_in_threads

CHUNK = 4096  # small chunks so the test model's big tensor is split across servers


def assert_params_equal(got: dict, want: dict, **tol) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=lambda m: f"{key}: {m}", **tol)


# ---------------------------------------------------------------------------------------- sync


@pytest.mark.parametrize("optimizer,servers,workers", [
    ("sgd", 1, 2), ("sgd", 2, 2), ("sgd", 3, 3),
    ("adam", 1, 3), ("adam", 2, 2), ("adam", 3, 2),
])
def test_sync_equals_single_process_training(make_cluster, worker_procs, optimizer, servers, workers):
    steps = 5
    cluster = make_cluster(num_servers=servers, num_workers=workers, mode="sync", chunk_bytes=CHUNK)
    results = worker_procs(cluster, "sync_train", workers, optimizer=optimizer, steps=steps).join()
    want = models.reference(optimizer, steps)
    for rank, got in enumerate(results):
        assert_params_equal(got, want, rtol=1e-5, atol=1e-6)
    # the run really moved the parameters: equality is not trivial
    assert not torch.allclose(want["W"], models.make_params(0)["W"])


def test_the_big_tensor_is_split_across_all_servers(make_cluster):
    cluster = make_cluster(num_servers=3, num_workers=1, chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register(models.make_params(0), optimizer=ps.optim.SGD(lr=0.1))
        servers_of_w = {block.server for block, _ in worker.shard_map.segments_of("W")}
        assert servers_of_w == {0, 1, 2}
        sizes = worker.shard_map.server_bytes()
        assert max(sizes) <= 1.05 * sum(sizes) / len(sizes)


def test_distributed_optimizer_on_a_module(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync")
    results = worker_procs(cluster, "train_with_optimizer", 2, steps=4).join()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    for got in results:
        assert_params_equal(got, {k: v.detach() for k, v in model.state_dict().items()}, rtol=1e-5, atol=1e-6)


def test_cluster_exits_by_itself_when_workers_close(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"x": torch.zeros(3)}, optimizer=ps.optim.SGD(lr=1.0))
    assert cluster.wait(timeout=15) == {"scheduler": 0, "server-0": 0, "server-1": 0}


# ---------------------------------------------------------------------------------------- async


def assert_one_step_of_ones(worker, params: dict, lr: float) -> None:
    """push_pull a gradient of ones into ``params`` (SGD, one worker): every value moves by -lr."""
    before = {k: v.clone() for k, v in params.items()}
    worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=30)
    for k in params:
        torch.testing.assert_close(params[k], before[k] - lr)


def pull_after_pushes(worker, futures: list, params: dict) -> list[dict]:
    """Wait for ``futures``, then (between barriers, so every worker's pushes are in) pull
    ``params``; returns the servers' stats."""
    for future in futures:
        future.wait(timeout=30)
    worker.barrier()
    worker.pull(params).wait(timeout=30)
    stats = worker.server_stats()
    worker.barrier()
    return stats


def test_async_applies_every_push_exactly_once(make_cluster):
    workers, pushes = 3, 20
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="async", chunk_bytes=CHUNK)

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"big": torch.zeros(3000), "small": torch.zeros(())}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            futures = []
            for k in range(pushes):
                value = float(worker.rank * 100 + k + 1)  # integers: float32 sums stay exact
                futures.append(worker.push({n: torch.full_like(t, value) for n, t in params.items()}))
            return params, pull_after_pushes(worker, futures, params)

    results = run_in_threads(workers, work)
    expected = -sum(r * 100 + k + 1 for r in range(workers) for k in range(pushes))
    for params, stats in results:
        assert torch.equal(params["big"], torch.full((3000,), float(expected)))
        assert params["small"].item() == expected
        assert sum(s["pushes"] for s in stats) == sum(s["applied"] for s in stats)
        blocks = sum(s["blocks"] for s in stats)
        assert sum(s["applied"] for s in stats) == workers * pushes * blocks


# ---------------------------------------------------------------------------------------- ssp


def _ssp_run(cluster, steps: int, slow_delay: float):
    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"w": torch.zeros(100)}
            worker.register(params, optimizer=ps.optim.SGD(lr=0.01))
            sent, done = [], []
            for _ in range(steps):
                if worker.rank == 0:
                    time.sleep(slow_delay)
                sent.append(time.monotonic())
                worker.push_pull({"w": torch.ones(100)}, into=params).wait(timeout=30)
                done.append(time.monotonic())
            worker.barrier()
            return worker.rank, sent, done

    return {rank: (sent, done) for rank, sent, done in run_in_threads(3, work)}


@pytest.mark.parametrize("staleness", [0, 2])
def test_ssp_no_worker_gets_more_than_k_steps_ahead(make_cluster, staleness):
    steps = 8
    cluster = make_cluster(num_servers=1, num_workers=3, mode="ssp", staleness=staleness)
    runs = _ssp_run(cluster, steps, slow_delay=0.1)
    slow_sent = runs[0][0]
    for rank in (1, 2):
        _, done = runs[rank]
        for i in range(staleness, steps):
            # finishing step i (clock i+1) needs the slow worker at clock >= i+1-k: its push i-k was sent
            assert slow_sent[i - staleness] < done[i], f"worker {rank} ran ahead at step {i}"


def test_async_lets_fast_workers_run_ahead(make_cluster):
    """The contrast that shows the ssp test can fail: without the bound, fast workers finish early."""
    cluster = make_cluster(num_servers=1, num_workers=3, mode="async")
    runs = _ssp_run(cluster, 8, slow_delay=0.1)
    assert runs[1][1][-1] < runs[0][0][3]


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture
def one_worker(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, chunk_bytes=CHUNK)
    worker = ps.init(scheduler=cluster.scheduler)
    params = models.make_params(0)
    worker.register(params, optimizer=ps.optim.SGD(lr=0.1))
    yield cluster, worker, params
    worker.close()


def _grads(params):
    return {k: torch.ones_like(v) for k, v in params.items()}


@pytest.mark.parametrize("bad,words", [
    ({"nope": torch.ones(3)}, ["'nope'", "unknown key"]),
    ({"b": torch.ones(41)}, ["'b'", "(41,)", "(40,)"]),
    ({"b": torch.ones(40, dtype=torch.float64)}, ["'b'", "float64", "float32"]),
])
def test_bad_push_names_key_and_both_shapes_or_dtypes(one_worker, bad, words):
    cluster, worker, params = one_worker
    with pytest.raises(ps.BadRequestError) as info:
        worker.push(bad)
    for word in words:
        assert word in str(info.value)
    worker.push_pull(_grads(params), into=params).wait(timeout=10)  # still serving


def _raw_client(address: str, worker=None) -> zmq.Socket:
    """A bare socket; with ``worker``, introduced to the server as that worker (with its token)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(address)
    if worker is not None:
        sock.send(P.encode(P.Introduce(rank=worker.rank, token=worker.membership.welcome.token)))
    return sock


def test_server_rejects_bad_frames_and_keeps_serving(one_worker):
    cluster, worker, params = one_worker
    block = worker.shard_map.blocks_of_server(0)[0]
    sock = _raw_client(worker.membership.servers[0], worker)
    try:
        header = {"op": "push", "req": 7, "block": block.block_id, "rank": 0, "dtype": block.dtype,
                  "segs": None}
        frames = [b"\0" * 3 for _ in block.segments]  # wrong sizes
        sock.send_multipart([msgpack.packb(header)] + frames)
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        assert reply["op"] == "error" and reply["kind"] == "bad_request" and "expected" in reply["message"]
        sock.send_multipart([msgpack.packb({**header, "dtype": "float64"})] + frames)
        reply = msgpack.unpackb(sock.recv_multipart()[0])
        assert "float64" in reply["message"] and "float32" in reply["message"]
        sock.send_multipart([msgpack.packb({**header, "block": 10**6})])
        assert "not held" in msgpack.unpackb(sock.recv_multipart()[0])["message"]
    finally:
        sock.close()
    worker.push_pull(_grads(params), into=params).wait(timeout=10)


GARBAGE = [
    [b""], [b"\xff\xfe garbage"], [msgpack.packb([1, 2, 3])], [msgpack.packb({"op": 5})],
    [msgpack.packb({"op": "push"})], [msgpack.packb({"op": "push", "req": 1, "block": 0, "rank": 0})],
    [msgpack.packb({"op": "hello", "role": "alien"})], [msgpack.packb({"op": "heartbeat", "role": "worker", "rank": 99})],
    [msgpack.packb({"op": "barrier"})], [msgpack.packb({"op": "pull", "req": 1, "block": 0, "rank": 0})[:5]],
    [os.urandom(64), os.urandom(1 << 16)], [msgpack.packb({"op": "nonsense"}), b"x" * 100],
]


def test_garbage_to_every_port_is_dropped_and_the_job_keeps_working(one_worker):
    cluster, worker, params = one_worker
    before = {k: v.clone() for k, v in params.items()}
    addresses = [cluster.scheduler, *worker.membership.servers]
    for address in addresses:
        sock = _raw_client(address)
        try:
            for frames in GARBAGE:
                sock.send_multipart(frames)
        finally:
            sock.close()
    time.sleep(0.3)
    worker.push_pull(_grads(params), into=params).wait(timeout=10)
    for key, value in before.items():  # exactly one step of SGD(lr=0.1) on gradients of ones: no garbage got in
        torch.testing.assert_close(params[key], value - 0.1, rtol=0, atol=1e-6)
    worker.barrier(timeout=10)
    assert all(p.poll() is None for p in cluster.processes().values())


def test_mismatched_registration_fails_on_every_worker(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=2)

    def work(i):
        with ps.init(scheduler=cluster.scheduler) as worker:
            shape = (4,) if worker.rank == 0 else (5,)
            try:
                worker.register({"a": torch.zeros(2), "emb": torch.zeros(shape)}, optimizer=ps.optim.SGD(lr=1))
            except ps.RegistrationError as exc:
                return str(exc)
            return None

    messages = run_in_threads(2, work)
    for message in messages:
        assert message is not None and "'emb'" in message and "(5,)" in message and "(4,)" in message


def test_register_gives_every_worker_rank_0_values(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=2, chunk_bytes=CHUNK)

    def work(i):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = models.make_params(100 + worker.rank)
            worker.register(params, optimizer=ps.optim.SGD(lr=1))
            return worker.rank, params

    results = dict(run_in_threads(2, work))
    assert_params_equal(results[1], models.make_params(100), rtol=0, atol=0)
    assert_params_equal(results[0], models.make_params(100), rtol=0, atol=0)


def test_register_rejects_bad_input(one_worker):
    cluster, worker, params = one_worker
    with pytest.raises(ps.RegistrationError, match="once"):
        worker.register(params, optimizer=ps.optim.SGD(lr=0.1))


# ---------------------------------------------------------------------------------------- liveness


def test_dead_server_becomes_an_error_naming_it(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=0.1))
        worker.push_pull(_grads(params), into=params).wait(timeout=10)
        os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ps.PeerLostError) as info:
            for _ in range(10000):
                worker.push_pull(_grads(params), into=params).wait()
        assert time.monotonic() - start < 10
        assert info.value.role == "server" and info.value.rank == 1
        assert "server 1" in str(info.value)


def test_dead_worker_becomes_an_error_naming_it(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=1, num_workers=3, mode="sync")
    results = worker_procs(cluster, "die_after", 3, steps=3, victim=2).join(expect_ok=False)
    for rank in (0, 1):
        result = results[rank]
        assert result is not None and result["error"] is not None, f"worker {rank} saw no error"
        assert "worker 2" in result["error"], result["error"]
        assert result["seconds"] < 10


def test_dead_scheduler_becomes_an_error(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"x": torch.zeros(3)}, optimizer=ps.optim.SGD(lr=1.0))
        os.kill(cluster.processes()["scheduler"].pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(ps.PeerLostError, match="scheduler"):
            worker.barrier()
        assert time.monotonic() - start < 10


def test_no_scheduler_is_a_clear_timeout():
    start = time.monotonic()
    with pytest.raises(ps.PSTimeoutError, match="no welcome"):
        ps.init(scheduler="tcp://127.0.0.1:9", timeout=1.0)
    assert time.monotonic() - start < 5


def test_pushes_say_whether_more_of_their_exchange_follow(make_cluster):
    """Every push but the last of an exchange to a server says that more follow, so that a GPU
    server can wait for them and apply them together; pulls never say so."""
    cluster = make_cluster(num_servers=2, num_workers=1, chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=0.1))
        sent: dict[int, list] = {server: [] for server in range(worker.num_servers)}
        for server, sock in enumerate(worker.client.servers):
            def spy(frames, *args, _server=server, _send=sock.send, **kwargs):
                sent[_server].append(P.decode(frames[0]))
                return _send(frames, *args, **kwargs)
            sock.send = spy
        for _ in range(2):
            worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=10)
            worker.pull(params).wait(timeout=10)
        blocks = {server: len(worker.shard_map.blocks_of_server(server)) for server in sent}
    for server, headers in sent.items():
        pushes = [h for h in headers if isinstance(h, P.PushPull)]
        assert blocks[server] >= 2 and len(pushes) == 2 * blocks[server]
        follow = [True] * (blocks[server] - 1) + [False]
        assert [h.more for h in pushes] == follow * 2
        assert not any(h.more for h in headers if isinstance(h, P.Pull))


def test_a_local_cluster_traces_every_process(make_cluster, monkeypatch, tmp_path):
    """``LocalCluster(trace_dir=...)``: its scheduler and servers, and a worker started with
    ``cluster.env()``, record their events there; ``trace.merge`` joins them."""
    from psframework.trace import merge

    cluster = make_cluster(num_servers=1, num_workers=1, trace_dir=tmp_path / "traces")
    for key, val in cluster.env().items():
        monkeypatch.setenv(key, val)
    with ps.init() as worker:
        params = {"w": torch.zeros(8)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        worker.push_pull({"w": torch.ones(8)}, into=params).wait(timeout=10)
    assert set(cluster.wait(timeout=20).values()) == {0}
    path, processes = merge(str(tmp_path / "traces"))
    events = json.loads(path.read_text())["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert processes == 3 and sorted(tracks.values()) == ["scheduler 0", "server 0", "worker 0"]
    assert {tracks[e["pid"]] for e in events if e["ph"] == "X"} >= {"server 0", "worker 0"}


def test_awaiting_one_reply_reads_its_servers_answer_and_gives_up_at_the_deadline(make_cluster):
    """``Client.await_reply`` (a restarted server's device lane is answered before anything is
    resent to it): True once the request is answered; False at its deadline while the server is
    stopped, without waiting longer."""
    from psframework.worker.requests import Future, Request

    cluster = make_cluster(num_servers=1, num_workers=1)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": torch.zeros(4)}, optimizer=ps.optim.SGD(lr=1.0))
        client = worker.client

        def stats_request() -> Request:
            req = client.next_id()
            request = Request(Future(client), 0, frames=[P.encode(P.Stats(req=req))])
            client.submit(request, req)
            return request

        answered = stats_request()
        assert client.await_reply(answered, timeout=10) and isinstance(answered.reply, P.StatsReply)
        server = cluster.processes()["server-0"]
        os.kill(server.pid, signal.SIGSTOP)
        try:
            unanswered = stats_request()
            started = time.monotonic()
            assert not client.await_reply(unanswered, timeout=0.3)
            assert time.monotonic() - started < 2
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert client.await_reply(unanswered, timeout=10)
