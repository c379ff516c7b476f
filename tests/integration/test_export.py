"""``python -m psframework.export``: a checkpoint's shards assembled into one file that loads into the
model (issue 17, export)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import torch

import psframework as ps
from psframework.export import load
from tests.conftest import REPO
from tests.integration import models

STEPS = 4


def _export(checkpoint_dir, out, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psframework.export", str(checkpoint_dir), "--out", str(out), *more],
                          capture_output=True, text=True, timeout=60, cwd=REPO)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_the_exported_file_loads_into_the_torch_model_with_the_trained_values(make_cluster, tmp_path, suffix):
    """A ps.nn table and a dense head trained on two servers, checkpointed after the last step: the
    exported file loads, strictly, into the same model built with torch's own EmbeddingBag, and
    holds exactly what one process training that model would hold."""
    ckpt = tmp_path / "ckpt"
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=16)  # the head over 2 blocks
    model = models.EmbNet(ps.nn.EmbeddingBag.from_pretrained(models.emb_weight(), mode="sum"))
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler),
                                 sparse_optimizer=models.SPARSE_RULES["sparse_adam"], checkpoint_dir=str(ckpt),
                                 checkpoint_every=STEPS) as opt:
        for step in range(STEPS):
            ids, _, y = models.emb_batch(step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(ids), y).backward()
            opt.step()
        opt.worker.close()

    done = _export(ckpt, tmp_path / f"model{suffix}")
    assert done.returncode == 0, done.stderr
    assert f"model{suffix}: 2 tensors and 1 tables (30 rows)" in done.stdout and "(step 4)" in done.stdout
    exported = load(tmp_path / f"model{suffix}")
    plain = models.EmbNet(torch.nn.EmbeddingBag(models.EMB_ROWS, models.EMB_DIM, mode="sum"))
    plain.load_state_dict({name: exported[name] for name in plain.state_dict()}, strict=True)
    want = models.emb_reference("sparse_adam", "sum", False, STEPS)
    assert not torch.allclose(want["weight"], models.emb_weight()), "the reference must have moved the rows"
    torch.testing.assert_close(plain.bag.weight.detach(), want["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.head.weight.detach(), want["head.weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.head.bias.detach(), want["head.bias"], rtol=1e-5, atol=1e-6)
    assert torch.equal(exported["bag.ids"], torch.arange(models.EMB_ROWS))  # every row: from_pretrained
    assert torch.equal(exported["bag.rows"], exported["bag.weight"])


class _Hashed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.users = ps.nn.EmbeddingBag(None, 4, mode="sum")
        self.items = ps.nn.Embedding(1000, 3, admit_after=1)
        self.head = torch.nn.Linear(7, 64)

    def forward(self, users, items):
        return self.head(torch.cat([self.users(users), self.items(items).sum(1)], dim=1))


def test_hashed_and_bounded_tables_export_their_rows_and_the_optimizer_state(make_cluster, tmp_path):
    """A hashed table exports the rows it created (ids sorted) and only those; a bounded one also
    as a full weight whose untouched rows are what a lookup answers for them; --optimizer-state
    adds Adam's moments by tensor and the rows' state; a corrupt shard is refused by name."""
    ckpt = tmp_path / "ckpt"
    cluster = make_cluster(num_servers=3, num_workers=1, mode="sync", chunk_bytes=256)  # head.weight over blocks
    model = _Hashed()
    g = torch.Generator().manual_seed(11)
    seen_users, seen_items = [], []
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler),
                                 sparse_optimizer=ps.optim.Adagrad(lr=0.3), checkpoint_dir=str(ckpt),
                                 checkpoint_every=3) as opt:
        for _ in range(3):
            users, items = torch.randint(-2**62, 2**62, (5, 2), generator=g), torch.randint(0, 50, (5, 2), generator=g)
            seen_users.append(users.reshape(-1))
            seen_items.append(items.reshape(-1))
            opt.zero_grad()
            model(users, items).pow(2).mean().backward()
            opt.step()
        users_seen, items_seen = torch.cat(seen_users).unique(), torch.cat(seen_items).unique()
        want_users = opt.worker.pull_rows("users", users_seen, train=False).wait()
        want_items = opt.worker.pull_rows("items", torch.arange(1000), train=False).wait()
        head = {name: p.detach().clone() for name, p in model.head.named_parameters()}
        opt.worker.close()

    done = _export(ckpt, tmp_path / "model.safetensors", "--optimizer-state")
    assert done.returncode == 0, done.stderr
    exported = load(tmp_path / "model.safetensors")
    assert torch.equal(exported["users.ids"], users_seen)
    assert torch.equal(exported["users.rows"], want_users)
    assert "users.weight" not in exported  # any int64 id: there is no full weight
    assert torch.equal(exported["items.ids"], items_seen)
    assert torch.equal(exported["items.weight"], want_items)
    assert torch.equal(exported["head.weight"], head["weight"]) and torch.equal(exported["head.bias"], head["bias"])
    assert exported["optimizer.head.weight.exp_avg"].shape == (64, 7)
    assert exported["optimizer.head.weight.exp_avg"].abs().sum() > 0
    assert float(exported["optimizer.head.weight.step"]) == 3.0
    assert exported["users.state.sum"].shape == exported["users.rows"].shape

    shard = next(ckpt.glob("step-*/server-1.pt"))
    broken = tmp_path / "broken"
    shutil.copytree(shard.parent, broken)
    data = bytearray((broken / "server-1.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "server-1.pt").write_bytes(bytes(data))
    done = _export(broken, tmp_path / "broken.pt")
    assert done.returncode != 0 and "server-1.pt is corrupt" in done.stderr, done.stderr
    assert not (tmp_path / "broken.pt").exists()


def test_bad_arguments_are_clear_errors(tmp_path):
    done = _export(tmp_path, tmp_path / "model.pt")
    assert done.returncode != 0 and "no complete checkpoint in or under" in done.stderr, done.stderr
    (tmp_path / "step-00000001").mkdir()
    (tmp_path / "step-00000001" / "manifest.json").write_text("{}")
    done = _export(tmp_path / "step-00000001", tmp_path / "model.bin")
    assert done.returncode != 0 and "must end in .safetensors or .pt" in done.stderr, done.stderr
