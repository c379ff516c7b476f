"""``ps-serve``: a model served from an exported file or a live job, with replicas (issue 17)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from safetensors.torch import save_file

import psframework as ps
from psframework.procs import spawn, stop_all
from tests.conftest import REPO
from tests.integration import serve_models

MODELS = "tests.integration.serve_models"


@contextmanager
def serving(tmp_path: Path, *args: str, timeout: float = 60.0):
    """``ps-serve`` with ``args`` on a free port: yields its address, stopped at the end."""
    log = tmp_path / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = spawn([sys.executable, "-m", "psframework.serve.cli", *args, "--port", "0"],
                     {"PYTHONPATH": str(REPO)}, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        deadline = time.monotonic() + timeout
        while "PS_SERVE_ADDRESS=" not in log.read_text():
            assert proc.poll() is None, f"ps-serve exited ({proc.returncode}):\n{log.read_text()}"
            assert time.monotonic() < deadline, f"ps-serve did not serve within {timeout} s:\n{log.read_text()}"
            time.sleep(0.05)
        address = log.read_text().split("PS_SERVE_ADDRESS=", 1)[1].split()[0]
        yield address, proc, log
    finally:
        stop_all([proc])


def _file(tmp_path: Path, model: torch.nn.Module, step: int = 7) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"step": str(step)})
    return path


def _predict(address: str, inputs, **kwargs) -> httpx.Response:
    return httpx.post(f"{address}/predict", json={"inputs": inputs}, timeout=30, **kwargs)


def test_answers_equal_the_models_own_outputs_in_json_and_safetensors(tmp_path):
    model = serve_models.mlp()
    with torch.no_grad():
        model[0].weight.mul_(3)  # the file's weights, not the factory's
    x = torch.randn(5, 4)
    with serving(tmp_path, f"{MODELS}:mlp", "--from-file", str(_file(tmp_path, model))) as (address, _, _):
        want = model(x).detach()
        one = _predict(address, x[0].tolist())
        assert one.status_code == 200 and one.headers["x-model-version"] == "7" and one.json()["version"] == 7
        torch.testing.assert_close(torch.tensor(one.json()["outputs"]), want[0])
        batch = _predict(address, x.tolist()).json()["outputs"]
        torch.testing.assert_close(torch.tensor(batch), want)
        binary = httpx.post(f"{address}/predict", content=save_safetensors({"inputs": x}), timeout=30,
                            headers={"content-type": "application/x-safetensors"})
        assert binary.status_code == 200 and binary.headers["x-model-version"] == "7"
        assert torch.equal(load_safetensors(binary.content)["outputs"], want)
        health = httpx.get(f"{address}/healthz", timeout=10)
        assert health.status_code == 200 and health.json() == {"status": "ok", "version": 7}


def test_bad_requests_get_a_4xx_that_says_why_and_the_service_goes_on(tmp_path):
    model = serve_models.mlp()
    path = _file(tmp_path, model)
    with serving(tmp_path, f"{MODELS}:mlp", "--from-file", str(path), "--max-batch", "8",
                 "--max-body-bytes", "4096") as (address, _, _):
        post = lambda **kw: httpx.post(f"{address}/predict", timeout=30, **kw)
        bad = {
            "malformed JSON": (post(content=b'{"inputs": [1, 2'), 400),
            'with "inputs"': (post(json={"x": [1, 2, 3, 4]}), 400),
            "of one shape": (post(json={"inputs": [[1, 2, 3, 4], [1, 2]]}), 400),
            "list of numbers": (post(json={"inputs": ["a", "b", "c", "d"]}), 400),
            "inputs of shape (3,): the model takes one example of shape (4,) or a batch (N, 4)":
                (post(json={"inputs": [1, 2, 3]}), 400),
            "9 examples in one request; at most 8 (--max-batch)": (post(json={"inputs": [[0] * 4] * 9}), 413),
            "at most 4096 (--max-body-bytes)": (post(json={"inputs": [[0.5] * 4] * 500}), 413),
            # chunked, without a Content-Length: refused at the chunk that goes over, not held whole
            "a body of more than 4096 bytes": (post(content=(b" " * 1024 for _ in range(1 << 16))), 413),
            "inputs of dtype float64; the model takes float32": (post(
                content=save_safetensors({"inputs": torch.zeros(2, 4, dtype=torch.float64)}),
                headers={"content-type": "application/x-safetensors"}), 400),
            "malformed safetensors body": (post(content=b"garbage", headers={"content-type":
                                                                              "application/x-safetensors"}), 400),
        }
        for message, (response, status) in bad.items():
            assert response.status_code == status and message in response.json()["error"], (message, response.text)
        good = _predict(address, [1, 2, 3, 4])
        assert good.status_code == 200
        metrics = httpx.get(f"{address}/metrics", timeout=10).text
        assert 'psframework_serve_requests_total{code="400"} 7.0' in metrics
        assert 'psframework_serve_requests_total{code="413"} 3.0' in metrics


def test_concurrent_requests_are_answered_in_batches(tmp_path):
    model = serve_models.mlp()
    with serving(tmp_path, f"{MODELS}:mlp", "--from-file", str(_file(tmp_path, model)), "--max-batch", "64",
                 "--max-delay-ms", "50") as (address, _, _):
        xs = torch.randn(32, 4)
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda x: _predict(address, x.tolist()).json()["outputs"], xs))
        torch.testing.assert_close(torch.tensor(answers), model(xs).detach())
        metrics = httpx.get(f"{address}/metrics", timeout=10).text
        batches = float(metrics.split("psframework_serve_batch_size_count ")[1].split()[0])
        assert batches < 32, "every request ran alone"


def test_bad_commands_and_models_fail_at_once_and_say_why(tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "psframework.serve.cli", *args, "--port", "0"],
                                       capture_output=True, text=True, timeout=60, cwd=REPO,
                                       env={**os.environ, "PYTHONPATH": str(REPO)})
    path = str(_file(tmp_path, serve_models.mlp()))
    cases = {
        "give exactly one of --from-job and --from-file": run(f"{MODELS}:mlp"),
        "MODULE:FACTORY": run("nocolon", "--from-file", path),
        "cannot import 'no_such_module'": run("no_such_module:f", "--from-file", path),
        "has no callable 'nothing'": run(f"{MODELS}:nothing", "--from-file", path),
        "has no first.weight, second.weight of the model": run(f"{MODELS}:square", "--from-file", path),
        "the shape of one example is unknown": run("torch.nn:Identity", "--from-file", path),
    }
    for message, done in cases.items():
        assert done.returncode != 0 and message in done.stderr, (message, done.stderr[-2000:])
    with serving(tmp_path, f"{MODELS}:broken", "--from-file", path) as (address, _, _):
        response = _predict(address, [1, 2, 3, 4])
        assert response.status_code == 500 and "one row per example" in response.json()["error"]


def test_a_killed_replica_is_replaced_and_no_request_fails(tmp_path):
    """Two replicas: one is SIGKILLed during a stream of requests; every request is answered (by the
    other meanwhile), and the front restarts the dead one, which then takes requests again."""
    model = serve_models.mlp()
    with serving(tmp_path, f"{MODELS}:mlp", "--from-file", str(_file(tmp_path, model)),
                 "--replicas", "2") as (address, _, _):
        health = httpx.get(f"{address}/healthz", timeout=10).json()
        assert [r["up"] for r in health["replicas"]] == [True, True]
        replicas = _replica_pids()
        assert len(replicas) == 2
        seen = set()
        for i in range(60):
            if i == 20:
                os.kill(replicas[0], signal.SIGKILL)
            response = _predict(address, [1, 2, 3, 4])
            assert response.status_code == 200, response.text
            seen.add(response.headers["x-replica"])
            time.sleep(0.02)
        deadline = time.monotonic() + 60
        while not all(r["up"] for r in httpx.get(f"{address}/healthz", timeout=10).json()["replicas"]):
            assert time.monotonic() < deadline, "the killed replica was not restarted"
            time.sleep(0.1)
        assert sum(r["restarts"] for r in httpx.get(f"{address}/healthz", timeout=10).json()["replicas"]) == 1
        assert len(_replica_pids()) == 2 and replicas[0] not in _replica_pids()
        after = {_predict(address, [1, 2, 3, 4]).headers["x-replica"] for _ in range(10)}
        assert seen == after == {"0", "1"}
        metrics = httpx.get(f"{address}/metrics", timeout=10).text
        assert 'psframework_serve_replica_restarts{replica="0"} 1.0' in metrics
        assert 'psframework_serve_model_version{replica="1"} 7.0' in metrics  # a replica's own, through the front
        assert 'psframework_serve_request_seconds_count{replica="0"}' in metrics


def _replica_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if b"psframework.serve" in cmdline and b"--replica" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def test_a_live_job_is_served_and_a_refresh_never_mixes_versions(make_cluster, tmp_path):
    """Every weight of a Square model goes up by one per sync step, so an answer of 16 v^2 is
    version v whole; a burst of requests while the worker steps gets answers that are each one
    whole version, the version they name, and the versions move on with the training."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=16)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {name: torch.zeros_like(p) for name, p in serve_models.square().state_dict().items()}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        with serving(tmp_path, f"{MODELS}:square", "--from-job", cluster.scheduler, "--refresh-every", "0.02",
                     "--max-delay-ms", "2") as (address, _, _):
            assert _predict(address, [1, 1, 1, 1]).json() == {"outputs": [0.0], "version": 0}
            with ThreadPoolExecutor(8) as pool:
                burst = [pool.submit(_burst, address, 40) for _ in range(6)]
                for _ in range(30):
                    worker.push_pull({k: -torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=30)
                    time.sleep(0.01)
                answers = [answer for future in burst for answer in future.result()]
            for output, version in answers:
                assert output == 16.0 * version * version, (output, version)
            assert len({version for _, version in answers}) > 3
            deadline = time.monotonic() + 10
            while _predict(address, [1, 1, 1, 1]).json()["version"] != 30:
                assert time.monotonic() < deadline, "the last step was never served"
                time.sleep(0.05)
            metrics = httpx.get(f"{address}/metrics", timeout=10).text
            assert "psframework_serve_model_version 30.0" in metrics


def _burst(address: str, n: int) -> list[tuple[float, int]]:
    with httpx.Client(timeout=30) as client:
        out = []
        for _ in range(n):
            body = client.post(f"{address}/predict", json={"inputs": [1, 1, 1, 1]}).json()
            out.append((body["outputs"][0], body["version"]))
        return out


def test_the_job_ending_leaves_the_last_version_served(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {name: torch.zeros_like(p) for name, p in serve_models.square().state_dict().items()}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        worker.push_pull({k: -torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=30)
        with serving(tmp_path, f"{MODELS}:square", "--from-job", cluster.scheduler, "--refresh-every", "0.05",
                     "--timeout", "2") as (address, _, log):
            worker.close()
            cluster.wait(timeout=20)
            deadline = time.monotonic() + 20
            while "cannot refresh from the job (serving version 1 meanwhile)" not in log.read_text():
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert _predict(address, [1, 1, 1, 1]).json() == {"outputs": [16.0], "version": 1}


USERS = torch.tensor([7, 10**12 + 3, 42, 99999, 5])


def _table_ids(step: int) -> torch.Tensor:
    """8 examples of the ``tables`` model: two users of a few, two items of 0..39."""
    g = torch.Generator().manual_seed(500 + step)
    return torch.cat([USERS[torch.randint(0, len(USERS), (8, 2), generator=g)],
                      torch.randint(0, 40, (8, 2), generator=g)], dim=1)


def _tables_model_by_hand(scheduler: str, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """What the ``tables`` model gives for ``x`` with the job's current rows and weights, read with
    a ``ps.Reader`` and computed without the model, and the version read."""
    with ps.Reader(scheduler=scheduler) as reader:
        head = {"head.weight": torch.empty(2, 7), "head.bias": torch.empty(2)}
        version = reader.snapshot(head)
        features = torch.cat([reader.lookup("users", x[:, :2]).sum(1), reader.lookup("items", x[:, 2:]).sum(1)], 1)
        return features @ head["head.weight"].T + head["head.bias"], int(version)


def test_a_model_with_ps_nn_tables_is_served_from_the_job_and_from_its_export(make_cluster, tmp_path):
    """A model with ps.nn tables (a hashed bag, a bounded table) under a dense head, trained for
    three sync steps: served from the live job and from the export of its checkpoint, it answers
    what the job's rows and weights give, also for ids the training never touched (their
    initial rows, which the file does not hold). Once the job has ended, its rows cannot be read:
    a request is a 500 that says so, within seconds."""
    ckpt, out = tmp_path / "ckpt", tmp_path / "model.safetensors"
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=16)
    model = serve_models.tables()
    asked = torch.cat([_table_ids(0), torch.tensor([[123456789, 7, 45, 3]])])
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler),
                                 sparse_optimizer=ps.optim.SGD(lr=0.3), checkpoint_dir=str(ckpt),
                                 checkpoint_every=3) as opt:
        for step in range(3):
            opt.zero_grad()
            model(_table_ids(step)).square().mean().backward()
            opt.step()
        want, version = _tables_model_by_hand(cluster.scheduler, asked)
        assert version == 3
        with serving(tmp_path, f"{MODELS}:tables", "--from-job", cluster.scheduler, "--input-dtype", "int64",
                     "--timeout", "2") as (address, _, _):
            live = _predict(address, asked.tolist()).json()
            opt.worker.close()
            cluster.wait(timeout=20)
            started = time.monotonic()
            ended = _predict(address, asked.tolist())
            assert ended.status_code == 500 and "the job is over" in ended.json()["error"], ended.text
            assert time.monotonic() - started < 15, "the rows of an ended job were waited for too long"
    assert live["version"] == 3
    torch.testing.assert_close(torch.tensor(live["outputs"]), want)
    done = subprocess.run([sys.executable, "-m", "psframework.export", str(ckpt), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    with serving(tmp_path, f"{MODELS}:tables", "--from-file", str(out), "--input-dtype", "int64") as (address, _, _):
        exported = _predict(address, asked.tolist()).json()
    assert exported["version"] == 3
    torch.testing.assert_close(torch.tensor(exported["outputs"]), want)


def test_the_digits_job_under_ps_launch_is_served_live(tmp_path):
    """The README's example: examples/train_digits.py under ps-launch with --secret-file, served
    live by ps-serve with that secret: answers come from versions that move on with the training."""
    from tests.integration.launch_helpers import Launch, assert_no_leftovers
    from tests.ports import free_port

    port, secret = free_port(), tmp_path / "job.secret"
    job = Launch(["-n", "2", "-s", "2", "--server-device", "cpu", "--scheduler", f"127.0.0.1:{port}",
                  "--secret-file", str(secret), "--", sys.executable, "examples/train_digits.py", "--epochs", "5000"],
                 tmp_path)
    try:
        job.wait_for_output("epoch 1/5000", 120)
        address = f"tcp://127.0.0.1:{port}"
        with serving(tmp_path, "examples.train_digits:make_model", "--from-job", address, "--secret-file",
                     str(secret), "--refresh-every", "0.1", timeout=120) as (url, _, _):
            x = torch.rand(3, 64)
            versions = set()
            deadline = time.monotonic() + 60
            while len(versions) < 3:
                assert time.monotonic() < deadline, f"the served version did not move on: {versions}"
                versions.add(_predict(url, x.tolist()).json()["version"])
                time.sleep(0.2)
            assert min(versions) > 0
        assert secret.exists() and oct(secret.stat().st_mode & 0o777) == "0o600"
    finally:
        job.cleanup()
    assert_no_leftovers(job.job_id)


def test_a_replica_whose_first_read_fails_closes_its_readers(make_cluster, monkeypatch):
    """The job holds the model's entries with other shapes: building the replica fails at its first
    read and says why, and the reader it opened for the job is closed, not left connected."""
    from psframework.config import ServeConfig
    from psframework.reader import Reader
    from psframework.serve.replica import Replica

    opened, closed = [], []
    real_init, real_close = Reader.__init__, Reader.close
    monkeypatch.setattr(Reader, "__init__", lambda self, *a, **k: (opened.append(self), real_init(self, *a, **k))[1])
    monkeypatch.setattr(Reader, "close", lambda self: (closed.append(self), real_close(self))[1])
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"first.weight": torch.zeros(2, 8), "second.weight": torch.zeros(1, 4)},
                        optimizer=ps.optim.SGD(lr=1.0))
        try:
            Replica(ServeConfig(factory=f"{MODELS}:square", from_job=cluster.scheduler, timeout=10))
        except ps.PSError as exc:
            assert "first.weight" in str(exc), exc
        else:
            raise AssertionError("a job whose shapes differ from the model's was served")
    assert opened and set(map(id, opened)) <= set(map(id, closed)), (len(opened), len(closed))
