"""ps-serve's parts in one process: payloads, the batcher, the two copies of the model, sockets."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import types

import pytest
import torch

from psframework.serve.batching import Batcher, ModelError
from psframework.serve.http import bind, read_body
from psframework.serve.model import JobWeights, ServedModel
from psframework.serve.payload import BadRequest, InputSpec, parse

SPEC = InputSpec.of((3,), "float32", max_rows=4, max_bytes=1000)


def _json(inputs) -> bytes:
    return json.dumps({"inputs": inputs}).encode()


def test_one_example_or_a_batch_is_taken_and_anything_else_is_refused_with_why():
    one = parse(_json([1, 2, 3]), "application/json", SPEC)
    assert one.single and one.inputs.shape == (1, 3) and one.inputs.dtype == torch.float32
    batch = parse(_json([[1, 2, 3], [4, 5, 6]]), "application/json; charset=utf-8", SPEC)
    assert not batch.single and torch.equal(batch.inputs, torch.tensor([[1.0, 2, 3], [4, 5, 6]]))
    cases = {
        b"[1, 2": (400, "malformed JSON"),
        _json([[1, 2, 3]] * 5): (413, "5 examples in one request; at most 4"),
        _json([[1, 2], [3, 4]]): (400, "inputs of shape (2, 2): the model takes one example of shape (3,)"),
        _json([]): (400, "inputs of shape (0,)"),
        _json([True, False, True]): (400, "holds bool values"),
        b'{"inputs": [1, 2, 3]' + b" " * 1000 + b"}": (413, "at most 1000 (--max-body-bytes)"),
    }
    for body, (status, message) in cases.items():
        with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")) as caught:
            parse(body, "application/json", SPEC)
        assert caught.value.status == status
    deep = b'{"inputs": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(BadRequest, match="malformed JSON: RecursionError"):
        parse(deep, "application/json", InputSpec.of((3,), "float32", 4, 1 << 20))
    ids = InputSpec.of((2,), "int64", 4, 1000)
    assert parse(_json([1, 2]), "application/json", ids).inputs.dtype == torch.int64
    with pytest.raises(BadRequest, match="holds float32 values; the model takes int64"):
        parse(_json([1.5, 2]), "application/json", ids)


class _Streamed:
    """What read_body needs of a starlette Request: its headers, and its body in chunks."""

    def __init__(self, chunks: list[bytes], headers: dict):
        self.chunks, self.headers, self.read = chunks, headers, 0

    async def stream(self):
        for chunk in self.chunks:
            self.read += 1
            yield chunk


def test_a_body_is_read_only_up_to_the_limit_with_or_without_a_content_length():
    fits = _Streamed([b"a" * 400, b"b" * 600], {})
    assert asyncio.run(read_body(fits, 1000)) == b"a" * 400 + b"b" * 600
    chunked = _Streamed([b"x" * 600] * 100, {"transfer-encoding": "chunked"})
    with pytest.raises(BadRequest, match=r"more than 1000 bytes; at most 1000 \(--max-body-bytes\)") as caught:
        asyncio.run(read_body(chunked, 1000))
    assert caught.value.status == 413 and chunked.read == 2  # stopped at the chunk that went over, not at the end
    declared = _Streamed([b"x"], {"content-length": "5000"})
    with pytest.raises(BadRequest, match=r"a body of 5000 bytes; at most 1000") as caught:
        asyncio.run(read_body(declared, 1000))
    assert declared.read == 0


class _Doubler(torch.nn.Module):
    def __init__(self, seen: list):
        super().__init__()
        self.seen = seen
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        self.seen.append(x.shape[0])
        return x * 2 * self.scale


def _served(seen: list) -> ServedModel:
    served = ServedModel(lambda: _Doubler(seen), "cpu")
    served.load(lambda module: 5)
    return served


def test_concurrent_requests_share_a_batch_within_its_size_and_each_gets_its_own_rows():
    seen = []

    async def main():
        batcher = Batcher(_served(seen), "cpu", max_rows=4, max_delay=0.2)
        batcher.start()
        try:
            rows = [torch.full((n, 1), float(i)) for i, n in enumerate([1, 2, 3, 1])]
            return await asyncio.gather(*(batcher.run(x) for x in rows))
        finally:
            await batcher.stop()

    answers = asyncio.run(main())
    for i, (outputs, version) in enumerate(answers):
        assert version == 5 and torch.equal(outputs, torch.full((outputs.shape[0], 1), 2.0 * i))
    assert [a[0].shape[0] for a in answers] == [1, 2, 3, 1]
    assert seen == [3, 4], "the 3 rows that did not fit waited for the next batch"


class _Flaky(_Doubler):
    fail = True

    def forward(self, x):
        if _Flaky.fail:
            raise RuntimeError("boom")
        return super().forward(x)


def test_a_failing_model_fails_its_batch_with_why_and_the_next_batch_runs():
    served = ServedModel(lambda: _Flaky([]), "cpu")
    served.load(lambda module: 1)

    async def main():
        batcher = Batcher(served, "cpu", max_rows=8, max_delay=0.0)
        batcher.start()
        try:
            with pytest.raises(ModelError, match="RuntimeError: boom"):
                await batcher.run(torch.ones(1, 1))
            _Flaky.fail = False
            return await batcher.run(torch.ones(2, 1))
        finally:
            await batcher.stop()

    outputs, _ = asyncio.run(main())
    assert torch.equal(outputs, torch.full((2, 1), 2.0))


def test_a_refresh_fills_the_copy_no_batch_uses_and_waits_for_the_batches_on_it():
    served = _served([])
    with served.live() as (first, version):
        assert version == 5
        assert served.load(lambda module: module.scale.fill_(3.0) and 6) == 6  # the other copy: no wait
        with served.live() as (second, newer):
            assert newer == 6 and second is not first and float(first.scale) == 1.0
        done = threading.Event()
        refresh = threading.Thread(target=lambda: (served.load(lambda module: 7), done.set()))
        refresh.start()
        time.sleep(0.2)
        assert not done.is_set(), "a refresh wrote into the copy a batch still uses"
    refresh.join(timeout=10)
    assert done.is_set() and served.version == 7


def test_every_connection_to_the_service_has_tcp_nodelay():
    """Without it a kept-alive connection's next response waits behind the client's delayed ACK."""
    listener = bind("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname())
    try:
        accepted, _ = listener.accept()
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        accepted.close()
    finally:
        client.close()
        listener.close()


def _post(body: bytes):
    """A starlette request of ``POST /predict`` with a JSON ``body``, as the server would hand it over."""
    from starlette.requests import Request

    chunks = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return chunks.pop(0) if chunks else {"type": "http.disconnect"}

    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/predict", "headers": headers}, receive)


@pytest.mark.parametrize("slow", ["parse", "render"])
def test_a_big_request_is_parsed_and_rendered_off_the_event_loop(tmp_path, monkeypatch, slow):
    """A JSON body of megabytes takes a good part of a second to parse: on the event loop it would
    hold up every other request. Here the parse (or render) of a big request waits until the test,
    running on the event loop, lets it go: it can only do so if the loop is free meanwhile."""
    from safetensors.torch import save_file

    from psframework.config import ServeConfig
    from psframework.serve import replica as replica_module
    from tests.integration import serve_models

    model = serve_models.mlp()
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={"step": "3"})
    replica = replica_module.Replica(ServeConfig(factory="tests.integration.serve_models:mlp", from_file=str(path),
                                                 max_batch=4096))
    started, release, waited = threading.Event(), threading.Event(), []
    real = getattr(replica_module, slow)

    def held(*args):
        started.set()
        waited.append(release.wait(timeout=2))  # False: the loop was blocked, so nobody let it go
        return real(*args)

    monkeypatch.setattr(replica_module, slow, held)
    x = torch.randn(4096, 4)

    async def scenario():
        replica.batcher.start()
        try:
            answer = asyncio.ensure_future(replica._predict(_post(json.dumps({"inputs": x.tolist()}).encode())))
            while not started.is_set():
                await asyncio.sleep(0.001)
            health = await replica.healthz(None)
            release.set()
            return health, await asyncio.wait_for(answer, timeout=30)
        finally:
            await replica.batcher.stop()

    health, answer = asyncio.run(scenario())
    assert waited == [True], f"the {slow} of a big request ran on the event loop"
    assert health.status_code == 200 and answer.status_code == 200
    torch.testing.assert_close(torch.tensor(json.loads(answer.body)["outputs"]), model(x).detach())


def test_a_file_without_the_rows_of_the_models_tables_is_refused_with_what_it_lacks():
    from psframework.errors import ConfigError
    from psframework.serve.tables import bind_file_rows
    from tests.integration import serve_models

    model = serve_models.tables()
    with pytest.raises(ConfigError, match=r"model.safetensors has no rows of the model's embedding table 'users' "
                                          r"\(users.ids and users.rows"):
        bind_file_rows(model, {}, "model.safetensors")
    tensors = {"users.ids": torch.tensor([1, 2]), "users.rows": torch.zeros(2, 4),
               "items.ids": torch.tensor([0]), "items.rows": torch.zeros(1, 5)}
    with pytest.raises(ConfigError, match=r"table 'items' has \(1,\) ids and rows of shape \(1, 5\); the model's "
                                          r"table has rows of 3"):
        bind_file_rows(model, tensors, "model.safetensors")


def test_a_refresh_thread_that_cannot_start_leaves_the_readers_closable(monkeypatch):
    """``start`` failing (no thread to be had) must not leave a thread that ``close`` then joins:
    joining a thread never started raises, and the reader stayed open."""
    closed = []
    weights = JobWeights.__new__(JobWeights)
    weights.reader, weights._rows_reader = types.SimpleNamespace(close=lambda: closed.append("reader")), None
    weights._stop, weights._thread, weights.config = threading.Event(), None, types.SimpleNamespace(timeout=1.0)

    def no_thread(self):
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        weights.start()
    weights.close()
    assert closed == ["reader"]
