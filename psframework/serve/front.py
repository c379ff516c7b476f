"""``ps-serve --replicas N``: N model processes behind one front.

The front routes each request to the replica with the fewest requests in flight (or round-robin,
``--routing``), so a slow replica gets less work instead of a queue. A replica whose connection
fails is taken out at once and the request goes to another one (a prediction may be asked
twice); a replica that exits is restarted and receives nothing until its ``/healthz`` answers.
Each replica's process has ``PS_SERVE_REPLICA`` set to its index (for a factory that places
replicas on different GPUs, say).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..config import ServeConfig
from ..errors import PSTimeoutError
from ..procs import exit_description, python_module, spawn, stop_all
from .http import BadRequest, read_body

log = logging.getLogger("psframework.serve")

_WATCH = 0.1  # seconds between looks at the replicas' processes
_MAX_BACKOFF = 30.0  # the longest wait before restarting a replica that died before it served


@dataclass
class ReplicaProc:
    index: int
    proc: Optional[subprocess.Popen] = None
    port: int = 0
    up: bool = False
    in_flight: int = 0
    restarts: int = 0
    generation: int = 0
    next_start: float = 0.0  # a replica that keeps dying is restarted less and less often

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Front:
    def __init__(self, config: ServeConfig):
        self.config = config
        self._dir = Path(tempfile.mkdtemp(prefix="ps-serve-"))
        self._child = json.dumps({**asdict(replace(config, port=0, replicas=1, bind_host="127.0.0.1"))})
        self.replicas = [ReplicaProc(i) for i in range(config.replicas)]
        self._turn = itertools.count()
        self._session = None  # an aiohttp.ClientSession, made in the app's event loop
        self._monitor: Optional[asyncio.Task] = None
        self._metrics = _FrontMetrics(self)
        try:
            for replica in self.replicas:
                self._spawn(replica)
            deadline = time.monotonic() + config.timeout + 60  # building the model, then reading its weights
            for replica in self.replicas:
                self._await_up_blocking(replica, deadline)
        except BaseException:
            self.close()
            raise
        self.app = Starlette(routes=[Route("/predict", self.predict, methods=["POST"]),
                                     Route("/healthz", self.healthz), Route("/metrics", self.scrape)],
                             lifespan=self._lifespan)

    # -- replica processes ---------------------------------------------------------------

    def _port_file(self, replica: ReplicaProc) -> Path:
        return self._dir / f"replica-{replica.index}-{replica.generation}.port"

    def _spawn(self, replica: ReplicaProc) -> None:
        replica.generation += 1
        replica.up, replica.port = False, 0
        argv = python_module("psframework.serve", "--replica", self._child, "--index", str(replica.index),
                             "--port-file", str(self._port_file(replica)))
        env = {"PYTHONPATH": ":".join(p for p in sys.path if p), "PS_SERVE_REPLICA": str(replica.index)}
        replica.proc = spawn(argv, env, stdout=sys.stderr, stderr=sys.stderr)

    def _poll_up(self, replica: ReplicaProc) -> bool:
        """Whether the replica listens and has weights (once: it is up from then on)."""
        path = self._port_file(replica)
        if not replica.port and path.exists():
            replica.port = int(path.read_text())
        if not replica.port:
            return False
        try:
            with urllib.request.urlopen(f"{replica.url}/healthz", timeout=1.0) as answer:
                replica.up = answer.status == 200
        except OSError:  # refused, reset, timed out, or a 503 (HTTPError) while it loads
            return False
        return replica.up

    def _await_up_blocking(self, replica: ReplicaProc, deadline: float) -> None:
        while not self._poll_up(replica):
            code = replica.proc.poll()
            if code is not None:
                raise PSTimeoutError(f"replica {replica.index} exited ({exit_description(code)}) before it served; "
                                     "its output is above")
            if time.monotonic() > deadline:
                raise PSTimeoutError(f"replica {replica.index} did not serve within {self.config.timeout + 60:g} s")
            time.sleep(0.05)
        log.info("replica %d serves on port %d", replica.index, replica.port)

    async def _watch(self) -> None:
        """Restart replicas that exited; take them in once they serve."""
        while True:
            await asyncio.sleep(_WATCH)
            for replica in self.replicas:
                code = replica.proc.poll()
                if code is not None and time.monotonic() >= replica.next_start:
                    delay = min(_MAX_BACKOFF, _WATCH * 2 ** min(replica.restarts, 10)) if not replica.up else 0.0
                    log.warning("replica %d exited (%s); restarting it", replica.index, exit_description(code))
                    replica.up = False
                    replica.restarts += 1
                    replica.next_start = time.monotonic() + delay + _WATCH
                    self._spawn(replica)
                elif code is None and not replica.up and await asyncio.to_thread(self._poll_up, replica):
                    replica.next_start = 0.0

    # -- requests ------------------------------------------------------------------------

    def _choose(self) -> Optional[ReplicaProc]:
        up = [r for r in self.replicas if r.up]
        if not up:
            return None
        if self.config.routing == "least-in-flight":
            fewest = min(r.in_flight for r in up)
            up = [r for r in up if r.in_flight == fewest]
        return up[next(self._turn) % len(up)]  # ties taken in turn

    async def predict(self, request: Request) -> Response:
        import aiohttp

        try:  # the front holds a body only up to the replicas' limit
            body = await read_body(request, self.config.max_body_bytes)
        except BadRequest as exc:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)
        headers = {"content-type": request.headers.get("content-type", "application/json")}
        for _ in range(len(self.replicas) + 1):
            replica = self._choose()
            if replica is None:
                break
            replica.in_flight += 1
            try:
                async with self._session.post(f"{replica.url}/predict", data=body, headers=headers) as answer:
                    content = await answer.read()
            except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as exc:
                log.warning("replica %d failed a request (%s); taking it out until it serves again", replica.index,
                            type(exc).__name__)
                replica.up = False
                continue
            finally:
                replica.in_flight -= 1
            self._metrics.routed(replica)
            return Response(content, status_code=answer.status, media_type=answer.headers.get("content-type"),
                            headers={"X-Model-Version": answer.headers.get("x-model-version", ""),
                                     "X-Replica": str(replica.index)})
        return JSONResponse({"error": "no replica is up (they are restarting); try again shortly"}, status_code=503)

    async def healthz(self, request: Request) -> Response:
        states = [{"replica": r.index, "up": r.up, "in_flight": r.in_flight, "restarts": r.restarts}
                  for r in self.replicas]
        ok = any(r.up for r in self.replicas)
        return JSONResponse({"status": "ok" if ok else "down", "replicas": states}, status_code=200 if ok else 503)

    async def scrape(self, request: Request) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        text = await asyncio.to_thread(generate_latest, self._metrics.registry)  # it reads the replicas'
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    # -- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, app):
        import aiohttp

        # aiohttp: httpx's connection pool cost the front more than the forwarding itself
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        self._monitor = asyncio.get_running_loop().create_task(self._watch())
        try:
            yield
        finally:
            self._monitor.cancel()
            await self._session.close()
            self.close()

    def close(self) -> None:
        stop_all([r.proc for r in self.replicas if r.proc is not None])
        shutil.rmtree(self._dir, ignore_errors=True)


class _FrontMetrics:
    def __init__(self, front: Front):
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry(auto_describe=True)
        self._routed = Counter("psframework_serve_routed", "requests answered, by replica", ["replica"],
                               registry=self.registry)
        gauges = {"in_flight": ("psframework_serve_replica_in_flight", "requests a replica is answering now"),
                  "up": ("psframework_serve_replica_up", "1 while a replica takes requests"),
                  "restarts": ("psframework_serve_replica_restarts", "times a replica was restarted")}
        for field_name, (name, help_text) in gauges.items():
            gauge = Gauge(name, help_text, ["replica"], registry=self.registry)
            for replica in front.replicas:
                gauge.labels(str(replica.index)).set_function(
                    lambda r=replica, f=field_name: float(getattr(r, f)))

        self.registry.register(_ReplicaMetrics(front.replicas))

    def routed(self, replica: ReplicaProc) -> None:
        self._routed.labels(str(replica.index)).inc()


class _ReplicaMetrics:
    """Every replica's own metrics (latency, batch sizes, version, refresh lag), read from it at each
    scrape and given a ``replica`` label: one scrape of the front sees the whole service."""

    def __init__(self, replicas: list[ReplicaProc]):
        self._replicas = replicas

    def describe(self) -> list:
        return []  # unknown until scraped: registering must not scrape the replicas

    def collect(self):
        from prometheus_client.metrics_core import Metric
        from prometheus_client.parser import text_string_to_metric_families

        families: dict[str, Metric] = {}
        for replica in [r for r in self._replicas if r.up]:
            try:
                with urllib.request.urlopen(f"{replica.url}/metrics", timeout=1.0) as answer:
                    text = answer.read().decode()
            except OSError:
                continue  # restarting: its series are absent from this scrape
            for family in text_string_to_metric_families(text):
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
                merged.samples += [sample._replace(labels={**sample.labels, "replica": str(replica.index)})
                                   for sample in family.samples]
        return list(families.values())


__all__ = ["Front", "ReplicaProc"]
