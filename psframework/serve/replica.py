"""One model process of ``ps-serve``: the HTTP service in front of a ``ServedModel``.

Routes: ``POST /predict`` (``payload.py``), ``GET /healthz`` (200 once weights are loaded, with
their version; 503 before), ``GET /metrics`` (Prometheus text: request latency, batch sizes, the
model's version, the refresh lag and when the last refresh was).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import ServeConfig
from ..errors import ConfigError
from .batching import Batcher, ModelError
from .model import JobWeights, ServedModel, build_factory, file_weights, fill_from
from .http import read_body
from .payload import BadRequest, InputSpec, parse, render

log = logging.getLogger("psframework.serve")

# Bodies and outputs up to these sizes are parsed and rendered on the event loop (a thread hop
# costs about 0.1 ms); larger ones on a thread, so that one big request never holds up the others
# (a JSON body of 15 MiB took 0.5 s to parse).
INLINE_BODY_BYTES = 32 << 10
INLINE_OUTPUT_BYTES = 8 << 10


async def off_the_loop(nbytes: int, inline_bytes: int, work, *args):
    """``work(*args)``: on a thread when ``nbytes`` is above ``inline_bytes``, else right here."""
    if nbytes <= inline_bytes:
        return work(*args)
    return await asyncio.to_thread(work, *args)


class ServeMetrics:
    def __init__(self, max_batch: int):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("psframework_serve_requests", "requests answered, by HTTP status", ["code"],
                                registry=self.registry)
        self.latency = Histogram("psframework_serve_request_seconds", "time from a request's arrival to its answer",
                                 registry=self.registry)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch})
        self.batch = Histogram("psframework_serve_batch_size", "examples per forward pass", buckets=buckets,
                               registry=self.registry)
        self.version = Gauge("psframework_serve_model_version", "the version of the weights answering",
                             registry=self.registry)
        self.refresh = Histogram("psframework_serve_refresh_lag_seconds",
                                 "from noticing new weights at the job to answering with them",
                                 registry=self.registry)
        self.refreshed = Gauge("psframework_serve_last_refresh_timestamp_seconds", "when the weights last changed",
                               registry=self.registry)

    def on_refresh(self, version: int, seconds: float) -> None:
        self.version.set(version)
        self.refresh.observe(seconds)
        self.refreshed.set(time.time())


def input_spec(config: ServeConfig, served: ServedModel) -> InputSpec:
    shape = config.input_shape or getattr(served.module, "input_shape", None)
    if shape is None:
        raise ConfigError("the shape of one example is unknown: give --input-shape (e.g. 64 or 3,224,224), or give "
                          "the factory's module an input_shape attribute")
    return InputSpec.of(tuple(shape), config.input_dtype, config.max_batch, config.max_body_bytes)


class Replica:
    """The model, its weights' source and batcher, and the app that serves them."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.served = ServedModel(build_factory(config.factory), config.device)
        self.spec = input_spec(config, self.served)
        self.metrics = ServeMetrics(config.max_batch)
        self.batcher = Batcher(self.served, config.device, config.max_batch, config.max_delay_ms / 1000,
                               self.metrics.batch.observe)
        self.job: Optional[JobWeights] = None
        if config.from_file is not None:
            tensors, step = file_weights(config.from_file)
            self.metrics.on_refresh(self.served.load(fill_from(tensors, step, config.from_file)), 0.0)
        else:
            self.job = JobWeights(config, self.served, self.metrics.on_refresh)
            try:
                self.job.refresh()
            except BaseException:
                self.job.close()  # its readers are connected to the job
                raise
        self.app = Starlette(routes=[Route("/predict", self.predict, methods=["POST"]),
                                     Route("/healthz", self.healthz), Route("/metrics", self.scrape)],
                             lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app):
        self.batcher.start()
        try:
            if self.job is not None:
                self.job.start()
            yield
        finally:
            await self.batcher.stop()
            if self.job is not None:
                self.job.close()

    async def predict(self, request: Request) -> Response:
        started = time.monotonic()
        response = await self._predict(request)
        self.metrics.latency.observe(time.monotonic() - started)
        self.metrics.requests.labels(str(response.status_code)).inc()
        return response

    async def _predict(self, request: Request) -> Response:
        try:
            body = await read_body(request, self.spec.max_bytes)
            parsed = await off_the_loop(len(body), INLINE_BODY_BYTES, parse, body,
                                        request.headers.get("content-type", ""), self.spec)
            outputs, version = await self.batcher.run(parsed.inputs)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        except ModelError as exc:
            log.error("%s", exc)
            return JSONResponse({"error": str(exc)}, status_code=500)
        body, kind = await off_the_loop(outputs.numel() * outputs.element_size(), INLINE_OUTPUT_BYTES, render,
                                        outputs, version, parsed)
        return Response(body, media_type=kind, headers={"X-Model-Version": str(version)})

    async def healthz(self, request: Request) -> Response:
        version = self.served.version
        return JSONResponse({"status": "ok" if version >= 0 else "loading", "version": version},
                            status_code=200 if version >= 0 else 503)

    async def scrape(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


__all__ = ["Replica", "ServeMetrics", "input_spec"]
