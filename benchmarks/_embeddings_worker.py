"""One training process of benchmarks/embeddings.py: single-process torch, a DDP rank, or a
psframework worker (under ps-launch), all training examples/train_ctr.py's DLRM on its click stream.

    python benchmarks/_embeddings_worker.py torch --out DIR [options]
    python benchmarks/_embeddings_worker.py ddp --rank R --world 2 --port P --out DIR [options]
    ps-launch ... -- python benchmarks/_embeddings_worker.py ps --out DIR [options]

Every variant starts from the same values: the MLPs from one seed, and every table row from the
value psframework gives a new row (a function of table, id and seed: ``rowhash.initial_rows``), so
at equal samples sync training differs from single-process torch only by rounding. The torch
variants hold whole tables: a fixed feature's ``rows`` rows, and for a hashed feature one row per id
the run will meet (a dictionary built by a first pass over the stream: what a single process would
have to build; the servers need none). Only the rows that the run touches get psframework's
initial value (the others are never read).

Each process writes JSON lines to ``OUT/<variant>-<rank>.jsonl``: ``step`` records (for the
progress bar), ``eval`` records (rank 0: held-out AUC and log loss after so many samples, and the
training seconds so far) and one ``final`` record (training seconds, peak RSS, rows moved per
server). Training seconds exclude making the synthetic batches and the evaluations.
"""

from __future__ import annotations

import importlib.util
import json
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_ctr", ROOT / "examples" / "train_ctr.py")
ctr = importlib.util.module_from_spec(_spec)
sys.modules["train_ctr"] = ctr  # dataclasses look their module up there
_spec.loader.exec_module(ctr)

CHUNK_ROWS = 1 << 16  # initial rows are computed in pieces of this many (float64 temporaries)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def pick_device(device: str, rank: int) -> torch.device:
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise click.ClickException("--device cuda: torch sees no CUDA device on this machine "
                                   f"(torch {torch.__version__}); run with --device cpu")
    return torch.device("cuda", rank % torch.cuda.device_count())


class Record:
    """The JSON-lines file of one process."""

    def __init__(self, out: Path, variant: str, rank: int):
        out.mkdir(parents=True, exist_ok=True)
        self._f = open(out / f"{variant}-{rank}.jsonl", "w")
        self.rank = rank

    def write(self, kind: str, **fields) -> None:
        self._f.write(json.dumps({"kind": kind, "rank": self.rank, **fields}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


# -- torch tables with psframework's initial rows ---------------------------------------------


def _initial_rows(feature, ids: torch.Tensor) -> torch.Tensor:
    from psframework.rowhash import initial_rows
    from psframework.tables import TableSpec

    spec = TableSpec(feature.name, feature.rows, ctr.DIM)
    return torch.cat([initial_rows(spec, ids[i:i + CHUNK_ROWS]) for i in range(0, ids.numel(), CHUNK_ROWS)])


def torch_bag(feature, rows: int, touched: torch.Tensor, slots: torch.Tensor) -> torch.nn.EmbeddingBag:
    """torch's EmbeddingBag of ``rows`` rows, in which the row of each id in ``touched`` (at slot
    ``slots``) starts as psframework's. Rows no id of the run reaches keep torch's init: never read."""
    bag = torch.nn.EmbeddingBag(rows, ctr.DIM, mode=feature.mode, sparse=True)
    with torch.no_grad():
        bag.weight[slots] = _initial_rows(feature, touched)
    return bag


class DictionaryBag(torch.nn.Module):
    """torch's EmbeddingBag behind a dictionary: a hashed feature's ids -> rows 0..len-1."""

    def __init__(self, feature, vocabulary: torch.Tensor):
        super().__init__()
        self.register_buffer("vocabulary", vocabulary)  # sorted distinct ids
        self.bag = torch_bag(feature, vocabulary.numel(), vocabulary, torch.arange(vocabulary.numel()))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bag(torch.searchsorted(self.vocabulary, ids))


def torch_tables(feats, touched: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    return {f.name: DictionaryBag(f, touched[f.name]) if f.rows is None else torch_bag(f, f.rows, touched[f.name],
                                                                                        touched[f.name])
            for f in feats}


def touched_ids(stream, steps: int, held_out: list) -> dict[str, torch.Tensor]:
    """Every id of each feature that training and evaluation will meet, sorted (for a hashed
    feature: the dictionary a single process must build; the servers need none)."""
    seen: dict[str, list[torch.Tensor]] = {f.name: [] for f in stream.features}
    for batch in [stream.batch(i) for i in range(steps)] + held_out:
        for name in seen:
            seen[name].append(torch.unique(batch.ids[name]))
    return {name: torch.unique(torch.cat(parts)) for name, parts in seen.items()}


# -- the training loop, the same for every variant --------------------------------------------


class Loop:
    """Train ``steps`` batches (this process's ``shards`` of each), evaluating on rank 0 every
    ``eval_every`` steps; ``sync`` is a barrier of all the processes of the run."""

    def __init__(self, run: "Run", rank: int, workers: int, device: torch.device, sync: Callable[[], None]):
        if ctr.SHARDS % workers:
            raise click.ClickException(f"{workers} processes cannot share a batch of {ctr.SHARDS} pieces")
        self.run_, self.rank, self.device, self.sync = run, rank, device, sync
        self.shards = range(rank * ctr.SHARDS // workers, (rank + 1) * ctr.SHARDS // workers)
        self.record = Record(run.out, run.variant, rank)
        self.train_s = 0.0
        self.setup_rss = peak_rss_mib()

    def run(self, model, step_fn: Callable, count_rows: Optional[Callable] = None) -> None:
        """``step_fn(batch, next_batch_or_None)`` trains one batch (``next_batch``: for a prefetch)."""
        stream, steps = self.run_.stream, self.run_.steps
        batch = stream.batch(0, shards=self.shards).to(self.device)
        for step in range(steps):
            evaluate_now = (step + 1) % self.run_.eval_every == 0 or step + 1 == steps
            ahead = stream.batch(step + 1, shards=self.shards).to(self.device) if step + 1 < steps else None
            if count_rows is not None:
                count_rows(batch)
            start = time.perf_counter()
            loss = step_fn(batch, None if evaluate_now else ahead)  # no prefetch across an evaluation
            self.train_s += time.perf_counter() - start
            self.record.write("step", step=step + 1, loss=loss)
            if evaluate_now:
                self.evaluate(model, step + 1, final=step + 1 == steps)
            batch = ahead

    def evaluate(self, model, step: int, final: bool) -> None:
        """Rank 0: AUC on the small held-out set (the curve), at the end also on the large one."""
        self.sync()  # every process's step is applied before rank 0 looks
        if self.rank == 0:
            for batches, last in [(self.run_.held_out, False)] + ([(self.run_.final_held_out, True)] if final else []):
                held_auc, held_loss = ctr.evaluate(model, batches, self.device)
                self.record.write("eval", samples=step * self.run_.stream.batch_size, train_s=self.train_s,
                                  auc=held_auc, loss=held_loss, final=last, n=sum(b.labels.numel() for b in batches))
        self.sync()

    def finish(self, **extra) -> None:
        steps = self.run_.steps
        self.record.write("final", train_s=self.train_s, steps=steps,
                          samples=steps * self.run_.stream.batch_size * len(self.shards) // ctr.SHARDS,
                          peak_rss_mib=peak_rss_mib(), setup_rss_mib=self.setup_rss,
                          cuda_peak_mib=(torch.cuda.max_memory_allocated(self.device) / 2**20
                                         if self.device.type == "cuda" else None), **extra)
        self.record.close()


class RowCounter:
    """Rows pulled + pushed per step, per server (``servers``: the server of each bucket; None: one
    process holding its own tables, which reads and writes the same rows). Each step reads the
    distinct ids of each table and writes a gradient for each of them."""

    def __init__(self, servers: Optional[torch.Tensor] = None, num_servers: int = 1):
        self.servers = servers
        self.moved = torch.zeros(num_servers, dtype=torch.int64)

    def count(self, batch) -> None:
        from psframework.rowhash import bucket_of

        for ids in batch.ids.values():
            distinct = torch.unique(ids.cpu())
            if self.servers is None:
                self.moved[0] += 2 * distinct.numel()
            else:
                self.moved += 2 * torch.bincount(self.servers[bucket_of(distinct)], minlength=len(self.moved))


def bce(model, batch) -> torch.Tensor:
    return torch.nn.functional.binary_cross_entropy_with_logits(model(batch.dense, batch.ids), batch.labels)


# -- the three variants -----------------------------------------------------------------------


def run_torch(run: "Run", rank: int, world: int, port: int) -> None:
    """Single-process torch (world 1), or one rank of DDP over gloo with the tables replicated."""
    ddp = world > 1
    if ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        vocab = touched_ids(run.stream, run.steps, run.final_held_out)
        device = pick_device(run.device, rank)
        model = ctr.DLRM(torch_tables(run.features, vocab)).to(device)
        dense = [p for n, p in model.named_parameters() if not n.startswith("tables.")]
        rows = [p for n, p in model.named_parameters() if n.startswith("tables.")]
        trained = model
        if ddp:  # the dictionaries are buffers, the same everywhere: not broadcast every step
            trained = torch.nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False)
        opt_dense, opt_rows = torch.optim.Adam(dense, lr=run.lr), torch.optim.SparseAdam(rows, lr=run.sparse_lr)

        def step(batch, _ahead) -> float:
            opt_dense.zero_grad()
            opt_rows.zero_grad()
            loss = bce(trained, batch)
            loss.backward()
            opt_dense.step()
            opt_rows.step()
            return loss.item()

        loop = Loop(run, rank, world, device, dist.barrier if ddp else (lambda: None))
        rows = RowCounter()  # what one process reads and writes of its own tables
        loop.run(model, step, rows.count)
        loop.finish(rows_moved=rows.moved.tolist(),
                    table_rows={f.name: f.rows or int(vocab[f.name].numel()) for f in run.features})
    finally:
        if ddp:
            dist.destroy_process_group()


def run_ps(run: "Run", prefetch: bool) -> None:
    """A psframework worker (rank, mode and servers from ps-launch's PS_* variables)."""
    import psframework as ps

    with ps.init() as worker:  # first: the worker's rank says which GPU its model goes to
        device = pick_device(run.device, worker.rank)
        model = ctr.DLRM(ctr.ps_tables(run.features)).to(device)
        with ps.DistributedOptimizer(model, ps.optim.Adam(lr=run.lr), worker,
                                     sparse_optimizer=ps.optim.SparseAdam(lr=run.sparse_lr)) as opt:
            _train_ps(run, worker, opt, model, device, prefetch)


def _train_ps(run: "Run", worker, opt, model, device: torch.device, prefetch: bool) -> None:
    rows = RowCounter(torch.tensor(worker.shard_map.buckets, dtype=torch.int64), worker.num_servers)

    def step(batch, ahead) -> float:
        opt.zero_grad()
        loss = bce(model, batch)
        if prefetch and ahead is not None:
            opt.prefetch({model.tables[name]: ids for name, ids in ahead.ids.items()})
        loss.backward()
        opt.step()
        return loss.item()

    loop = Loop(run, worker.rank, worker.num_workers, device, worker.barrier)
    worker.barrier()  # every worker registered: the clocks start together
    loop.run(model, step, rows.count)
    worker.barrier()
    stats = worker.server_stats() if worker.rank == 0 else None
    worker.barrier()
    loop.finish(rows_moved=rows.moved.tolist(), server_stats=stats, mode=worker.mode, workers=worker.num_workers,
                servers=worker.num_servers)


class Run:
    """What every process of one run shares: the stream, the held-out sets, the settings."""

    def __init__(self, variant: str, out: Path, samples: int, batch_size: int, fixed_rows: int, evals: int,
                 eval_samples: int, final_eval_samples: int, lr: float, sparse_lr: float, device: str):
        self.variant, self.out, self.device, self.lr, self.sparse_lr = variant, out, device, lr, sparse_lr
        self.features = ctr.features(fixed_rows)
        self.stream = ctr.ClickStream(self.features, batch_size)
        self.steps = max(1, samples // batch_size)
        self.eval_every = max(1, self.steps // max(1, evals))
        per_eval = max(1, eval_samples // batch_size)
        self.final_held_out = [self.stream.batch(i, "test")
                               for i in range(max(per_eval, final_eval_samples // batch_size))]
        self.held_out = self.final_held_out[:per_eval]


@click.command()
@click.argument("variant", type=click.Choice(["torch", "ddp", "ps"]))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--rank", type=int, default=0, help="ddp: this process's rank")
@click.option("--world", type=int, default=2, help="ddp: the number of processes")
@click.option("--port", type=int, default=0, help="ddp: rank 0's TCP port for the process group")
@click.option("--samples", type=int, required=True)
@click.option("--batch-size", type=int, default=2048)
@click.option("--fixed-rows", type=int, default=1_000_000)
@click.option("--evals", type=int, default=8, help="Held-out evaluations during training (the last one larger).")
@click.option("--eval-samples", type=int, default=8192)
@click.option("--final-eval-samples", type=int, default=65536)
@click.option("--lr", type=float, default=3e-3)
@click.option("--sparse-lr", type=float, default=0.03)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu")
@click.option("--no-prefetch", is_flag=True)
@click.option("--threads", type=int, default=0, help="torch's intra-op threads; 0: torch's default (all cores)")
def main(variant: str, out: Path, rank: int, world: int, port: int, samples: int, batch_size: int, fixed_rows: int,
         evals: int, eval_samples: int, final_eval_samples: int, lr: float, sparse_lr: float, device: str,
         no_prefetch: bool, threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)
    run = Run(variant, out, samples, batch_size, fixed_rows, evals, eval_samples, final_eval_samples, lr, sparse_lr,
              device)
    if variant == "ps":
        run_ps(run, prefetch=not no_prefetch)
    else:
        run_torch(run, rank if variant == "ddp" else 0, world if variant == "ddp" else 1, port)


if __name__ == "__main__":
    main()
