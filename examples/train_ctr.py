"""A click-through-rate model (DLRM-style) whose embedding tables live on the parameter servers.

Run it under ps-launch (from the repository root):

    ps-launch -n 2 -s 2 --mode sync --server-device cpu -- python examples/train_ctr.py

Eight categorical features, each an embedding table of dimension 64 on the servers: four fixed
tables (``--fixed-rows`` ids each) and four hashed ones that take any int64 id (here ids spread
over 10^12) and grow as new ids arrive; no worker ever holds a whole table, only the rows of its
batch. 13 dense features go through a bottom MLP; the pairwise dot products of the 9 vectors and
the bottom MLP's output go through a top MLP. The servers apply Adam to the MLPs and SparseAdam to
the rows that each step touched.

The clicks are synthetic, from a planted model: ids drawn from a Zipf law (alpha 1.05, as in real
click logs), each id's true effect a hash of (feature, id), the label a coin flip with the true
probability. So the best AUC any model can reach on the held-out set is known, and printed.
``benchmarks/embeddings.py`` measures this model against single-process torch and DDP.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Mapping, Optional

import click
import numpy as np
import torch

import psframework as ps

ALPHA = 1.05            # Zipf exponent of the ids
ID_SPACE = 10**12       # hashed features: ids anywhere in [0, 10^12)
HASHED_VOCAB = 10**9    # ... from this many distinct values, scattered by a bijection
DENSE, DIM, TRUTH_DIM = 13, 64, 4
SHARDS = 4              # a batch is generated in this many pieces: workers take whole pieces


@dataclass(frozen=True)
class Feature:
    """One categorical feature: ``rows`` ids (None: hashed), ``bag`` ids per sample, pooled by ``mode``."""

    name: str
    rows: Optional[int]
    bag: int
    mode: str


def features(fixed_rows: int) -> tuple[Feature, ...]:
    return (Feature("c0", fixed_rows, 1, "sum"), Feature("c1", fixed_rows, 1, "sum"),
            Feature("c2", fixed_rows, 3, "mean"), Feature("c3", fixed_rows, 2, "mean"),
            Feature("h0", None, 1, "sum"), Feature("h1", None, 1, "sum"),
            Feature("h2", None, 2, "mean"), Feature("h3", None, 4, "sum"))


# -- the planted model ----------------------------------------------------------------------------

_M1, _M2 = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53)  # murmur3's finaliser


def _fmix(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(33))
    x = x * _M1
    x = x ^ (x >> np.uint64(33))
    x = x * _M2
    return x ^ (x >> np.uint64(33))


def _effects(feature: int, ids: np.ndarray, columns: int) -> np.ndarray:
    """[*ids.shape, columns] numbers of mean 0 and variance 1, a function of (feature, id) only."""
    seed = _fmix(ids.astype(np.uint64) ^ np.uint64(0x5BD1E995 * (feature + 1)))
    bits = _fmix(seed[..., None] + np.arange(1, columns + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return ((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53 - 0.5) * math.sqrt(12.0)


def zipf_ranks(rng: np.random.Generator, n: int, shape: tuple[int, ...]) -> np.ndarray:
    """Ranks in [1, n] with P(rank = k) proportional to about k^-ALPHA."""
    beta = ALPHA - 1.0
    t = 1.0 - (1.0 - (n + 1.0) ** -beta) * rng.random(shape)
    return np.minimum(np.floor(t ** (-1.0 / beta)), n).astype(np.int64)


@dataclass
class Batch:
    dense: torch.Tensor                 # [B, 13]
    ids: dict[str, torch.Tensor]        # feature -> [B, bag] int64
    labels: torch.Tensor                # [B] 0./1.
    truth: torch.Tensor                 # [B] the true click probability

    def to(self, device) -> "Batch":
        return Batch(self.dense.to(device), {k: v.to(device) for k, v in self.ids.items()},
                     self.labels.to(device), self.truth.to(device))

    @classmethod
    def cat(cls, parts: list["Batch"]) -> "Batch":
        return cls(torch.cat([p.dense for p in parts]), {k: torch.cat([p.ids[k] for p in parts]) for k in parts[0].ids},
                   torch.cat([p.labels for p in parts]), torch.cat([p.truth for p in parts]))


class ClickStream:
    """Batches of synthetic clicks: batch ``index`` of ``split`` is the same on every process (each of
    its ``SHARDS`` pieces has its own seed, so a worker can make just its pieces)."""

    def __init__(self, feats: tuple[Feature, ...], batch_size: int, seed: int = 0):
        if batch_size % SHARDS:
            raise ValueError(f"the batch size must be a multiple of {SHARDS}, got {batch_size}")
        self.features, self.batch_size, self.seed = feats, batch_size, seed
        g = np.random.default_rng([seed, 7])
        self.w_dense = g.normal(size=DENSE) * math.sqrt(0.3 / DENSE)
        self.p_dense = g.normal(size=(DENSE, TRUTH_DIM)) / math.sqrt(DENSE * TRUTH_DIM)
        pairs = len(feats) * (len(feats) - 1) // 2
        self.scale_bias = math.sqrt(2.0 / len(feats))
        self.scale_pairs = math.sqrt(1.0 / (pairs * TRUTH_DIM))

    def batch(self, index: int, split: str = "train", shards: range = range(SHARDS)) -> Batch:
        return Batch.cat([self._piece(index, split, s) for s in shards])

    def _piece(self, index: int, split: str, shard: int) -> Batch:
        rng = np.random.default_rng([self.seed, 0 if split == "train" else 1, index, shard])
        n = self.batch_size // SHARDS
        dense = rng.normal(size=(n, DENSE))
        logit = dense @ self.w_dense - 1.0
        ids, vectors = {}, []
        for k, f in enumerate(self.features):
            ranks = zipf_ranks(rng, f.rows or HASHED_VOCAB, (n, f.bag))
            # fixed: the rank is the id; hashed: scattered over 10^12 (3^18 is prime to 10^12, so no two collide)
            ids[f.name] = ranks - 1 if f.rows else (ranks * 387_420_489) % ID_SPACE
            effect = _effects(k, ids[f.name], 1 + TRUTH_DIM).mean(axis=1)  # pooled over the bag
            logit += self.scale_bias * effect[:, 0]
            vectors.append(effect[:, 1:])
        v = np.stack(vectors, axis=1)
        gram = np.einsum("bik,bjk->bij", v, v)
        upper = np.triu_indices(len(self.features), 1)
        logit += self.scale_pairs * gram[:, upper[0], upper[1]].sum(axis=1)
        logit += 0.5 * np.einsum("bk,bk->b", dense @ self.p_dense, v[:, 0])
        truth = 1.0 / (1.0 + np.exp(-logit))
        labels = (rng.random(n) < truth).astype(np.float32)
        return Batch(torch.from_numpy(dense.astype(np.float32)), {k: torch.from_numpy(v) for k, v in ids.items()},
                     torch.from_numpy(labels), torch.from_numpy(truth.astype(np.float32)))


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    scores, labels = scores.double().cpu(), labels.bool().cpu()
    values, inverse, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    below = torch.cumsum(counts, 0) - counts  # scores strictly lower than each distinct value
    ranks = (below + (counts + 1) / 2.0)[inverse]  # 1-based average ranks
    pos = int(labels.sum())
    neg = labels.numel() - pos
    if pos == 0 or neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


# -- the model ----------------------------------------------------------------------------------


def _mlp(*sizes: int, last_relu: bool) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if last_relu or i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


class DLRM(torch.nn.Module):
    """Bottom MLP for the dense features, one embedding bag per categorical feature, the pairwise
    dot products of all their vectors, top MLP. ``tables``: feature name -> an embedding bag
    module (``ps.nn.EmbeddingBag`` here; the benchmark passes torch's for its baseline)."""

    def __init__(self, tables: Mapping[str, torch.nn.Module], seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)  # the MLPs start alike whatever the tables are
        vectors = len(tables) + 1
        self.bottom = _mlp(DENSE, 128, DIM, last_relu=True)
        self.top = _mlp(DIM + vectors * (vectors - 1) // 2, 256, 64, 1, last_relu=False)
        self.tables = torch.nn.ModuleDict(tables)
        self.register_buffer("pairs", torch.triu_indices(vectors, vectors, 1), persistent=False)

    def forward(self, dense: torch.Tensor, ids: Mapping[str, torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense)
        v = torch.stack([x] + [table(ids[name]) for name, table in self.tables.items()], dim=1)
        dots = torch.bmm(v, v.transpose(1, 2))[:, self.pairs[0], self.pairs[1]]
        return self.top(torch.cat([x, dots], dim=1)).squeeze(1)


def ps_tables(feats: tuple[Feature, ...]) -> dict[str, ps.nn.EmbeddingBag]:
    """The tables on the servers: a fixed table for ids in [0, rows), a hashed one for any id."""
    return {f.name: ps.nn.EmbeddingBag(f.rows, DIM, mode=f.mode, name=f.name) for f in feats}


@torch.no_grad()
def evaluate(model: DLRM, batches: list[Batch], device) -> tuple[float, float]:
    """(AUC, log loss) on held-out batches. With a ps.nn model, eval() pulls rows without creating any."""
    was_training = model.training
    model.eval()
    scores = torch.cat([model(b.dense.to(device), {k: v.to(device) for k, v in b.ids.items()}).cpu() for b in batches])
    model.train(was_training)
    labels = torch.cat([b.labels for b in batches])
    return auc(scores, labels), torch.nn.functional.binary_cross_entropy_with_logits(scores, labels).item()


# -- the job ------------------------------------------------------------------------------------


@click.command()
@click.option("--samples", default=200_000, show_default=True, help="Training samples in all (all workers).")
@click.option("--batch-size", default=2048, show_default=True, help="Global batch, split among the workers.")
@click.option("--fixed-rows", default=1_000_000, show_default=True, help="Rows of each fixed table.")
@click.option("--eval-every", default=50_000, show_default=True, help="Samples between held-out evaluations.")
@click.option("--eval-samples", default=16_384, show_default=True)
@click.option("--lr", default=3e-3, show_default=True, help="Adam, for the MLPs.")
@click.option("--sparse-lr", default=0.03, show_default=True, help="SparseAdam, for the tables.")
@click.option("--device", default="cpu", show_default=True, help="Where the model and the rows of a batch live.")
def main(samples: int, batch_size: int, fixed_rows: int, eval_every: int, eval_samples: int, lr: float,
         sparse_lr: float, device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise click.ClickException(f"--device {device}: torch sees no CUDA device here")
    feats = features(fixed_rows)
    stream = ClickStream(feats, batch_size)
    held_out = [stream.batch(i, "test") for i in range(max(1, eval_samples // batch_size))]
    best = auc(torch.cat([b.truth for b in held_out]), torch.cat([b.labels for b in held_out]))
    model = DLRM(ps_tables(feats)).to(device)
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=lr), sparse_optimizer=ps.optim.SparseAdam(lr=sparse_lr)) as opt:
        rank, workers = opt.worker.rank, opt.worker.num_workers
        if SHARDS % workers:
            raise click.ClickException(f"{workers} workers cannot share a batch of {SHARDS} pieces")
        mine = range(rank * SHARDS // workers, (rank + 1) * SHARDS // workers)
        steps, every = samples // batch_size, max(1, eval_every // batch_size)
        if rank == 0:
            print(f"{workers} workers, mode {opt.worker.mode}, {steps} steps of {batch_size} samples; "
                  f"best possible held-out AUC (the planted model's): {best:.4f}", flush=True)
        start, losses = time.monotonic(), []
        batch = stream.batch(0, shards=mine).to(device)
        for step in range(steps):
            report = step + 1 == steps or ((step + 1) % every == 0 and steps - step - 1 >= every // 2)
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch.dense, batch.ids), batch.labels)
            following = stream.batch(step + 1, shards=mine).to(device) if step + 1 < steps else None
            if following is not None and not report:  # its rows come while this step runs
                opt.prefetch({model.tables[name]: ids for name, ids in following.ids.items()})
            loss.backward()
            opt.step()
            losses.append(loss.item())
            batch = following
            if report:
                opt.worker.barrier()  # every worker's step is applied: rank 0 sees the model they made
                if rank == 0:
                    held_auc, held_loss = evaluate(model, held_out, device)
                    rows = sum(t["rows"] for s in opt.worker.server_stats() for t in s["tables"].values())
                    print(f"{(step + 1) * batch_size:>9} samples  train loss {sum(losses) / len(losses):.4f}  "
                          f"held-out loss {held_loss:.4f}  AUC {held_auc:.4f} (best {best:.4f})  "
                          f"{rows} rows on the servers  {time.monotonic() - start:.1f} s", flush=True)
                losses = []
                opt.worker.barrier()

if __name__ == "__main__":
    main()
