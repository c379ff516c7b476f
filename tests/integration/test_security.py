"""Only members of a job get in; no frame, however malformed or large, stops a process serving."""

from __future__ import annotations

import os
import time

import msgpack
import pytest
import torch
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import psframework as ps
from psframework.security import JobSecret

OPS = ["hello", "heartbeat", "register", "setup_done", "barrier", "bye", "push", "pull", "push_pull",
       "init", "stats", "values", "error", "shutdown"]


def _client(address: str, secret: JobSecret = None, server_key: str = None) -> zmq.Socket:
    """A raw socket; with ``secret``, a member's, trusting the key in ``address`` (or ``server_key``)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint, _, key = address.partition("#")
    if secret is not None:
        secret.secure_client(sock, key if server_key is None else server_key)
    sock.connect(endpoint)
    return sock


def _joined_worker(cluster, **params):
    worker = ps.init(scheduler=cluster.scheduler, secret_file=cluster.config.secret_file)
    tensors = params or {"w": torch.zeros(1000), "b": torch.zeros(())}
    worker.register(tensors, optimizer=ps.optim.SGD(lr=0.5))
    return worker, tensors


def _still_serves(worker, tensors) -> None:
    """One exact SGD step (lr 0.5, the worker alone) and a barrier."""
    before = tensors["w"].clone()
    worker.push_pull({k: torch.ones_like(v) for k, v in tensors.items()}, into=tensors).wait(timeout=10)
    assert torch.equal(tensors["w"], before - 0.5)
    worker.barrier(timeout=10)


@pytest.mark.parametrize("auth", ["token", "curve"])
def test_members_work_and_strangers_are_refused_and_logged(make_cluster, auth):
    cluster = make_cluster(num_servers=1, num_workers=1, auth=auth)
    worker, tensors = _joined_worker(cluster)
    try:
        impostor = JobSecret.generate(auth)  # a secret of another job
        hello = msgpack.packb({"op": "hello", "role": "worker", "rank": None, "host": "evil", "pid": 1})
        for address in (cluster.scheduler, worker.membership.servers[0]):
            for secret in (None, impostor):
                sock = _client(address, secret)
                try:
                    try:
                        sock.send(hello, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        pass  # not even queued: the handshake never completed
                    assert sock.poll(500) == 0, f"a stranger got an answer from {address}"
                finally:
                    sock.close()
        _still_serves(worker, tensors)
    finally:
        worker.close()
    time.sleep(0.3)
    logs = cluster.output("scheduler", 200) + cluster.output("server-0", 200)
    assert "refused" in logs


def test_a_worker_without_the_secret_cannot_join(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, auth="token")
    with pytest.raises(ps.PSTimeoutError, match="no welcome"):
        ps.init(scheduler=cluster.scheduler, timeout=1.5)


def test_secret_file_readable_by_others_is_refused(tmp_path):
    path = JobSecret.generate("token").write(tmp_path / "secret.json")
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    os.chmod(path, 0o644)
    with pytest.raises(ps.ConfigError, match="chmod 600"):
        JobSecret.load(path)
    with pytest.raises(ps.ConfigError, match="cannot read"):
        JobSecret.load(tmp_path / "missing.json")


def test_sockets_bind_only_the_chosen_address(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1)
    worker, _ = _joined_worker(cluster)
    try:
        for address in (cluster.scheduler, worker.membership.servers[0]):
            assert address.startswith("tcp://127.0.0.1:"), address
            port = int(address.rsplit(":", 1)[1])
            listening = open("/proc/net/tcp").read().splitlines()[1:]
            local = [line.split()[1] for line in listening if line.split()[3] == "0A"]
            assert f"0100007F:{port:04X}" in local and f"00000000:{port:04X}" not in local
    finally:
        worker.close()


def test_oversized_frames_are_refused(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, max_message_bytes=1 << 20, chunk_bytes=64 << 10)
    worker, tensors = _joined_worker(cluster, w=torch.zeros(100_000), b=torch.zeros(()))  # 400 KB, chunked
    try:
        for address in (cluster.scheduler, worker.membership.servers[0]):
            sock = _client(address)
            try:
                sock.send_multipart([msgpack.packb({"op": "push", "req": 1, "block": 0, "rank": 0}),
                                     b"\0" * (2 << 20)])
                assert sock.poll(500) == 0  # disconnected, never parsed
            finally:
                sock.close()
        _still_serves(worker, tensors)
    finally:
        worker.close()


headers = st.fixed_dictionaries(
    {"op": st.sampled_from(OPS)},
    optional={
        "req": st.one_of(st.integers(-2, 2**40), st.text(max_size=3), st.none()),
        "block": st.one_of(st.integers(-1, 5), st.none(), st.text(max_size=2)),
        "rank": st.one_of(st.integers(-1, 3), st.none()),
        "role": st.sampled_from(["worker", "server", "x"]),
        "segs": st.one_of(st.none(), st.lists(st.integers(-1, 4), max_size=4), st.text(max_size=2)),
        "dtype": st.sampled_from(["float32", "float64", "int8", "bogus"]),
        "seq": st.one_of(st.integers(-1, 100), st.text(max_size=2)),
        "tensors": st.lists(st.dictionaries(st.text(max_size=3), st.integers(-2**31, 2**31), max_size=3), max_size=2),
    },
)
messages = st.one_of(
    st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    st.tuples(headers, st.lists(st.binary(max_size=5000), max_size=3)).map(
        lambda hf: [msgpack.packb(hf[0])] + hf[1]),
    st.tuples(headers, st.integers(1, 30)).map(lambda hn: [msgpack.packb(hn[0])[:hn[1]]]),
)


@pytest.fixture(scope="module")
def fuzz_target():
    from tests.conftest import FAST_TIMING

    with ps.LocalCluster(num_servers=2, num_workers=1, mode="async", timing=FAST_TIMING) as cluster:
        worker, tensors = _joined_worker(cluster)
        ports = [cluster.scheduler, *worker.membership.servers]
        socks = [_client(a) for a in ports]
        yield cluster, worker, tensors, socks
        for sock in socks:
            sock.close()
        worker.close()


def _one_exact_step(worker, tensors) -> None:
    """push_pull gradients of ones with SGD(lr=0.5): every value moves by exactly -0.5, so no
    fuzzed message changed a tensor, and the scheduler and servers still answer."""
    before = {k: v.clone() for k, v in tensors.items()}
    worker.push_pull({k: torch.ones_like(v) for k, v in tensors.items()}, into=tensors).wait(timeout=10)
    for key, value in before.items():
        torch.testing.assert_close(tensors[key], value - 0.5, rtol=0, atol=1e-5)
    worker.barrier(timeout=10)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(messages, min_size=1, max_size=5))
def test_fuzzed_frames_at_every_port_leave_the_cluster_answering(fuzz_target, batch):
    cluster, worker, tensors, socks = fuzz_target
    for sock in socks:
        for frames in batch:
            sock.send_multipart(frames)
        while sock.poll(0):
            sock.recv_multipart()  # error replies to the fuzzer are fine; answers are not required
    _one_exact_step(worker, tensors)
    assert all(p.poll() is None for p in cluster.processes().values())


# ---------------------------------------------------------------------------------------- ranks


def _member_socket(cluster, address: str):
    """A raw connection that holds the job secret, as any member of the job does."""
    return _client(address, JobSecret.load(cluster.config.secret_file))


def _answer(sock) -> dict:
    assert sock.poll(5000), "no answer"
    return msgpack.unpackb(sock.recv_multipart()[0])


def test_no_worker_rank_can_be_claimed_without_its_token(make_cluster):
    from psframework import protocol as P

    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", auth="token")

    def work(_):
        worker = ps.init(scheduler=cluster.scheduler, secret_file=cluster.config.secret_file)
        tensors = {"w": torch.zeros(1000), "b": torch.zeros(())}
        worker.register(tensors, optimizer=ps.optim.SGD(lr=0.5))
        return worker, tensors

    from tests.threads import run_in_threads

    joined = {w.rank: (w, t) for w, t in run_in_threads(2, work)}
    (worker0, tensors), (worker1, _) = joined[0], joined[1]
    try:
        push = lambda rank, req: [P.encode(P.Push(req=req, block=0, rank=rank)), torch.ones(1000).numpy().tobytes()]
        server = worker0.membership.servers[0]
        sock = _member_socket(cluster, server)  # never introduced
        sock.send_multipart(push(0, 1))
        assert "did not introduce itself" in _answer(sock)["message"]
        sock.close()
        sock = _member_socket(cluster, server)  # introduced with a token that is not worker 0's
        sock.send(P.encode(P.Introduce(rank=0, token="0" * 32)))
        sock.send_multipart(push(0, 2))
        assert "did not introduce itself" in _answer(sock)["message"]
        sock.close()
        sock = _member_socket(cluster, server)  # a member that is worker 0 speaks for worker 1
        sock.send(P.encode(P.Introduce(rank=0, token=worker0.membership.welcome.token)))
        sock.send_multipart(push(1, 3))
        assert "for worker 1 on a connection of worker 0" in _answer(sock)["message"]
        sock.send(P.encode(P.Attach(req=4, rank=1, path="/proc/1/fd/1", token=b"x" * 16)))
        assert "for worker 1 on a connection of worker 0" in _answer(sock)["message"]
        sock.close()
        fresh = {"w": torch.zeros(1000), "b": torch.zeros(())}
        worker0.pull(fresh).wait(timeout=10)
        assert torch.equal(fresh["w"], torch.zeros(1000)), "a refused push was applied"
        scheduler = _member_socket(cluster, cluster.scheduler)
        scheduler.send(P.encode(P.Heartbeat(role="worker", rank=1, token="f" * 32)))
        assert "without its token" in _answer(scheduler)["message"]
        scheduler.close()
        worker0.push_pull({k: torch.ones_like(v) for k, v in tensors.items()}, into=tensors).wait(timeout=10)
        assert torch.equal(tensors["w"], torch.full((1000,), -0.5))  # the real worker 0 still is
    finally:
        worker0.close()
        worker1.close()
    time.sleep(0.3)
    assert "did not introduce itself" in cluster.output("server-0", 200)
    assert "without its token" in cluster.output("scheduler", 200)


def test_under_curve_no_member_can_pose_as_the_scheduler(make_cluster):
    """Every listener has a key pair of its own, whose public key its address carries: a member,
    with all the job gave it, cannot complete a handshake with a node that expects the scheduler."""
    from psframework.transport import ZmqTransport

    cluster = make_cluster(num_servers=1, num_workers=1, auth="curve")
    assert "#" in cluster.scheduler
    impostor = ZmqTransport(secret=JobSecret.load(cluster.config.secret_file))
    fake = impostor.listen("127.0.0.1")
    try:
        endpoint, real_key = fake.address.partition("#")[0], cluster.scheduler.partition("#")[2]
        with pytest.raises(ps.PSTimeoutError, match="no welcome"):
            ps.init(scheduler=f"{endpoint}#{real_key}", secret_file=cluster.config.secret_file, timeout=1.5)
        assert not impostor.poll([fake], 0.3), "the impostor heard a hello"
    finally:
        fake.close()
        impostor.close()
    worker, tensors = _joined_worker(cluster)
    try:
        _still_serves(worker, tensors)
    finally:
        worker.close()


def test_a_member_cannot_take_the_rank_of_a_live_server(make_cluster, tmp_path):
    """With restarts on, a new process for a server's rank replaces that server at once only if it
    has gone silent (a launcher restarts a server as soon as it exits). A member of the job that
    says hello as server 0 while server 0 heartbeats is refused within the heartbeat timeout and
    logged; server 0 stays in the job."""
    from psframework import protocol as P

    cluster = make_cluster(num_servers=1, num_workers=1, auth="token", restart_servers=True,
                           checkpoint_dir=tmp_path / "ckpt")
    worker, tensors = _joined_worker(cluster)
    sock = _member_socket(cluster, cluster.scheduler)
    try:
        sock.send(P.encode(P.Hello(role="server", host="impostor", pid=os.getpid(), version=P.VERSION, rank=0,
                                   address="tcp://127.0.0.1:9")))
        assert sock.poll(10_000), "no answer to the hello"
        answer = P.decode(sock.recv_multipart()[0])
        assert isinstance(answer, P.Error), answer
        assert "server 0" in answer.message and "still heartbeats" in answer.message, answer
        log = cluster.output("scheduler", 50)
        assert "is dead" not in log and "refused a hello from impostor" in log, log
        _still_serves(worker, tensors)
    finally:
        sock.close()
        worker.close()


def test_a_reader_needs_the_secret_and_its_token_and_may_only_read(make_cluster):
    """A reader without the job secret gets no welcome; a member's connection that did not
    introduce itself as a reader, or with a forged token, may not read; a reader may not push."""
    from psframework import protocol as P

    cluster = make_cluster(num_servers=1, num_workers=1, auth="token")
    worker, tensors = _joined_worker(cluster)
    try:
        with pytest.raises(ps.PSTimeoutError, match="did not welcome it"):
            ps.Reader(scheduler=cluster.scheduler, timeout=1.5)
        reader = ps.Reader(scheduler=cluster.scheduler, secret_file=cluster.config.secret_file, timeout=10)
        try:
            server = worker.membership.servers[0]
            read = P.encode(P.Read(req=1, block=0))
            sock = _member_socket(cluster, server)  # never introduced
            sock.send(read)
            assert "did not introduce itself as this reader" in _answer(sock)["message"]
            sock.close()
            sock = _member_socket(cluster, server)
            sock.send(P.encode(P.IntroduceReader(reader=reader.reader, token="0" * 64)))
            sock.send(read)
            assert "did not introduce itself as this reader" in _answer(sock)["message"]
            sock.close()
            sock = _member_socket(cluster, server)
            sock.send(P.encode(P.IntroduceReader(reader=reader.reader, token=reader.links.token)))
            sock.send_multipart([P.encode(P.Push(req=2, block=0, rank=0)), torch.ones(1000).numpy().tobytes()])
            assert "a reader may only read" in _answer(sock)["message"]
            sock.send(read)
            assert _answer(sock)["op"] == "values"
            sock.close()
            _still_serves(worker, tensors)
            assert torch.equal(tensors["w"], torch.full((1000,), -0.5)), "a reader's push was applied"
        finally:
            reader.close()
    finally:
        worker.close()
