"""One worker of ``chaos.py``: trains an MLP on scikit-learn's digits and records every push.

    python benchmarks/_chaos_worker.py --out W.jsonl --slot 3 --slots 64 --stop-file STOP ...

Started by ``chaos.py`` with a LocalCluster's ``PS_*`` variables (``PS_RANK`` for the first
workers; a replacement has none and takes the rank of a dead worker). Besides the model it
registers ``counts`` (one entry per worker process of the run, its *slot*): every push adds 1 to
``counts[slot]`` on the servers (SGD with lr 1 on a gradient of -1), so the servers' value is the
number of this process's pushes that were applied and not rolled back. The model's gradients are
pushed multiplied by ``--lr`` (the same servers' SGD, lr 1: plain SGD with lr ``--lr``).

Every event is one JSON line, written with a single ``write`` so that a SIGKILL leaves whole lines:

- ``s`` (push ``i`` about to be sent), ``p`` (its outcome: ``ok``; ``err`` the error's type and
  ``msg``; ``ep`` the rollback epoch it was sent in; ``c`` the servers' ``counts[slot]`` pulled
  with it; ``loss`` of the batch),
- ``rb`` (the worker heard that the job went back to the checkpoint of ``step``, rollback epoch ``ep``),
- ``ck0``/``ck`` (a checkpoint begins / is done: its ``path`` and ``c``, or ``err``),
- ``start``, ``joined`` (its rank), ``registered``, ``departed``, ``fatal``, ``final`` (the servers'
  ``counts`` at the end), ``end``.

Checkpoints are taken at the multiples of ``--ckpt-every`` seconds of wall-clock time, so all
workers reach each one at about the same moment. The run ends after such a checkpoint, once
``--stop-file`` appeared (see ``Trainer.stopping``): then every survivor meets the others at a
barrier, pulls ``counts`` and the model, writes ``final`` (with the held-out accuracy) and closes.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path
from typing import Optional

import click
import torch
import torch.nn.functional as F

import psframework as ps

EXIT_DEPARTED = 3  # the job declared this worker dead: it is out of it
EXIT_FAILING = 4  # nothing but failures for too long
EXIT_ERROR = 2  # an error it could not go on after (joining, registering): recorded as "fatal"
STOP_MARGIN = 0.5  # seconds


class EventLog:
    """JSON lines, each written with one ``os.write`` to a file opened for appending."""

    def __init__(self, path: str, t0: float):
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._t0 = t0

    def __call__(self, kind: str, **fields) -> None:
        record = {"k": kind, "t": round(time.time() - self._t0, 4), **fields}
        os.write(self._fd, (json.dumps(record) + "\n").encode())


def digits() -> tuple[torch.Tensor, ...]:
    """Scikit-learn's 1797 8x8 digits, scaled to [0, 1]; 1437 to train on, 360 held out."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:1437], y[:1437], x[1437:], y[1437:]


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)  # the same start everywhere (register() gives everyone rank 0's anyway)
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))


class Trainer:
    """The training loop of one worker process and what it records."""

    def __init__(self, worker: ps.Worker, log: EventLog, model: torch.nn.Module, slot: int, slots: int,
                 options: dict):
        self.worker, self.log, self.model, self.slot, self.o = worker, log, model, slot, options
        self.params = dict(model.named_parameters())
        self.counts = torch.zeros(slots)
        self.values = {**{n: p.detach() for n, p in self.params.items()}, "counts": self.counts}
        self.count_grad = torch.zeros(slots)
        self.count_grad[slot] = -1.0
        self.heard: list[tuple[int, int]] = []  # rollbacks heard during a push: (epoch, step)

    def register(self) -> None:
        try:
            self.worker.register(self.values, optimizer=ps.optim.SGD(lr=1.0))
        except ps.RolledBackError as exc:
            # a joiner's register() ends with a pull; a rollback in between fails it, after the
            # registration itself was done (a second register() is refused): take the values again
            if self.worker.shard_map is None:
                raise
            self.log("register_rolled_back", step=exc.step)
            self.pull()
        chained = self.worker.client.on_rolled_back  # keeps the worker's own step count right

        def heard(step: int) -> None:
            self.heard.append((self.worker.client.rollback, step))
            chained(step)

        self.worker.client.on_rolled_back = heard
        self.log("registered", rank=self.worker.rank, ep=self.worker.client.rollback, c=self.mine())

    def mine(self) -> int:
        return int(self.counts[self.slot].item())

    def push(self, i: int, loss: float) -> bool:
        """One push_pull of the gradients and the count; records its outcome. True if acknowledged."""
        grads = {n: p.grad.mul_(self.o["lr"]) for n, p in self.params.items()}
        grads["counts"] = self.count_grad
        before = self.worker.client.rollback
        self.log("s", i=i)
        sent, error = before, None
        try:
            future = self.worker.push_pull(grads, into=self.values)
            sent = self.worker.client.rollback
            future.wait(timeout=self.o["push_timeout"])
        except ps.PSError as exc:
            error = exc
        for epoch, step in [h for h in self.heard if h[0] <= sent]:  # heard before the push was stamped
            self.log("rb", ep=epoch, step=step)
        record = {"i": i, "ok": error is None, "ep": sent, "loss": round(loss, 5)}
        if sent != before:
            record["straddle"] = before  # a rollback arrived while its blocks went out
        if error is None:
            record["c"] = self.mine()
        else:
            record.update(err=type(error).__name__, msg=str(error)[:300])
        self.log("p", **record)
        for epoch, step in [h for h in self.heard if h[0] > sent]:  # heard while it was answered
            self.log("rb", ep=epoch, step=step)
        self.heard = []
        return error is None

    def pull(self, attempts: int = 5) -> None:
        """The servers' current values. Each RolledBackError teaches the worker a later rollback epoch
        (one that joins during a rollback may hear of an older one first), so the pull is retried."""
        for attempt in range(attempts):
            try:
                self.worker.pull(self.values).wait(timeout=self.o["push_timeout"])
                return
            except ps.RolledBackError as exc:
                if attempt == attempts - 1:
                    raise
                self.log("pull_rolled_back", step=exc.step)

    def refresh(self) -> None:
        """After a failed push: the servers' current values (after a rollback: the checkpoint's)."""
        try:
            self.pull()
        except ps.PSError as exc:
            self.log("pull_err", err=type(exc).__name__, msg=str(exc)[:300])
        for epoch, step in self.heard:
            self.log("rb", ep=epoch, step=step)
        self.heard = []

    def checkpoint(self) -> Optional[float]:
        """Collective; a watchdog interrupts it if it hangs, so that the hang is recorded, not endured.
        Returns when the checkpoint was written (its manifest's ``created``), or None if it failed."""
        self.log("ck0")
        membership = self.worker.membership
        watchdog = threading.Timer(self.o["ckpt_timeout"], membership.interrupt)
        watchdog.start()
        try:
            path = self.worker.save_checkpoint(self.o["ckpt_dir"])
            self.log("ck", path=Path(path).name, c=self.mine())
            return json.loads((Path(path) / "manifest.json").read_text())["created"]
        except (ps.PSError, OSError, ValueError, KeyError) as exc:
            self.log("ck", err=type(exc).__name__, msg=str(exc)[:300])
            return None
        finally:
            watchdog.cancel()
            membership.resume()

    def stopping(self, created: Optional[float]) -> bool:
        """Every worker that took part in a checkpoint decides the same after it: the stop file holds
        the time it was written, and counts from the first checkpoint written at least STOP_MARGIN
        seconds later (by then it exists for everyone). So none is left waiting in a checkpoint
        while the others wait at the final barrier, not even one that joined in the middle. If the
        checkpoint failed (the scheduler refuses them all once one is stuck), the file alone counts:
        a refused checkpoint holds nobody back."""
        try:
            written = float(Path(self.o["stop_file"]).read_text())
        except (OSError, ValueError):
            return False
        return created is None or written + STOP_MARGIN <= created

    def departed(self) -> bool:
        return self.worker.rank in self.worker.membership.departed_workers

    def run(self, x: torch.Tensor, y: torch.Tensor) -> None:
        gen = torch.Generator().manual_seed(1000 + self.slot)
        period = self.o["ckpt_every"]
        boundary = (math.floor(time.time() / period) + 1) * period
        last_ok, i = time.monotonic(), 0
        while True:
            if time.time() >= boundary:
                if self.stopping(self.checkpoint()):
                    return
                boundary = (math.floor(time.time() / period) + 1) * period
            batch = torch.randint(len(x), (self.o["batch"],), generator=gen)
            self.model.zero_grad()
            loss = F.cross_entropy(self.model(x[batch]), y[batch])
            loss.backward()
            ok = self.push(i, loss.item())
            i += 1
            if ok:
                last_ok = time.monotonic()
            else:
                self.refresh()
            if self.departed():
                self.log("departed", rank=self.worker.rank)
                os._exit(EXIT_DEPARTED)  # its rank may be someone else's now: no close(), no Bye
            if time.monotonic() - last_ok > self.o["give_up"]:
                self.log("give_up", seconds=round(time.monotonic() - last_ok, 1))
                os._exit(EXIT_FAILING)

    def finish(self, x_test: torch.Tensor, y_test: torch.Tensor) -> None:
        """Every survivor meets the others, then reads what the servers hold."""
        record: dict = {}
        try:
            self.worker.barrier(timeout=self.o["push_timeout"])
            self.pull()
            with torch.no_grad():
                logits = self.model(x_test)
            record = {"counts": [int(c) for c in self.counts.tolist()],
                      "test_loss": F.cross_entropy(logits, y_test).item(),
                      "test_acc": (logits.argmax(1) == y_test).float().mean().item()}
            self.worker.barrier(timeout=self.o["push_timeout"])  # nobody closes before all have read
        except ps.PSError as exc:
            record["err"], record["msg"] = type(exc).__name__, str(exc)[:300]
        self.log("final", rank=self.worker.rank, **record)


@click.command()
@click.option("--out", required=True, help="JSON-lines file of this worker's events")
@click.option("--slot", type=int, required=True, help="this process's entry of the counts tensor")
@click.option("--slots", type=int, required=True, help="size of the counts tensor")
@click.option("--stop-file", required=True, help="finish once this file exists (it holds time.time())")
@click.option("--ckpt-dir", required=True)
@click.option("--ckpt-every", type=float, default=3.0, help="seconds of wall-clock time between checkpoints")
@click.option("--ckpt-timeout", type=float, default=30.0, help="a checkpoint taking longer is interrupted")
@click.option("--push-timeout", type=float, default=60.0)
@click.option("--give-up", type=float, default=60.0, help="exit after this many seconds without a successful push")
@click.option("--t0", type=float, required=True, help="the run's start (time.time()) for the events' t")
@click.option("--lr", type=float, default=0.003)
@click.option("--batch", type=int, default=32)
def main(out: str, slot: int, slots: int, t0: float, **options) -> None:
    log = EventLog(out, t0)
    log("start", pid=os.getpid(), slot=slot)
    torch.set_num_threads(1)  # many processes on few cores
    x, y, x_test, y_test = digits()
    model = make_model()
    try:
        worker = ps.init()
    except ps.PSError as exc:  # e.g. no free rank yet: the scheduler has not declared the dead one dead
        log("fatal", where="init", err=type(exc).__name__, msg=str(exc)[:300])
        os._exit(EXIT_ERROR)
    log("joined", rank=worker.rank)
    try:
        trainer = Trainer(worker, log, model, slot, slots, options)
        trainer.register()
        trainer.run(x, y)
        trainer.finish(x_test, y_test)
    except ps.PSError as exc:
        log("fatal", where="train", err=type(exc).__name__, msg=str(exc)[:300])
        os._exit(EXIT_ERROR)  # no close(): its Bye would free its rank as if it had finished
    worker.close()
    log("end")


if __name__ == "__main__":
    main()
