"""Worker programs for multi-process tests: ``python -m tests.integration.worker_tasks TASK OUT JSON``.

Each runs under the PS_* variables of a LocalCluster and saves its result to OUT with torch.save.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

import psframework as ps
from tests.integration import models


def sync_train(out: str, optimizer: str, steps: int, seed: int = 0, device: str = "cpu") -> None:
    """``device``: where the worker's parameters and gradients live (cuda: pulled straight into them)."""
    with ps.init() as worker:
        # every worker starts from different values: register must replace them with rank 0's
        params = {k: v.to(device) for k, v in models.make_params(seed + 17 * worker.rank).items()}
        worker.register(params, optimizer=models.optimizer_spec(optimizer))
        per = models.BATCH // worker.num_workers
        for step in range(steps):
            x, y = (t.to(device) for t in models.batch(step))
            mine = slice(worker.rank * per, (worker.rank + 1) * per)
            leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            models.loss_fn(leaves, x[mine], y[mine]).backward()
            worker.push_pull({k: v.grad for k, v in leaves.items()}, into=params).wait(timeout=30)
        torch.save({k: v.cpu() for k, v in params.items()}, out)


def overlap_train(out: str, steps: int, overlap: bool, device: str = "cpu", slow_backward: float = 0.0) -> None:
    """DistributedOptimizer with or without overlap on models.OverlapNet; saves the parameters and
    how many blocks of the last step went out before step()."""
    torch.manual_seed(0)
    model = models.OverlapNet(slow_backward).to(device)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.05, momentum=0.9), overlap=overlap) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        for step in range(steps):
            x, y = (t.to(device) for t in models.overlap_batch(step))
            mine = slice(rank * len(x) // n, (rank + 1) * len(x) // n)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save({"params": state, "early_blocks": opt.early_blocks}, out)


def train_with_optimizer(out: str, steps: int) -> None:
    """DistributedOptimizer on an nn.Module, the API most users take."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1)) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        g = torch.Generator().manual_seed(5)
        x, y = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
        mine = slice(rank * 8 // n, (rank + 1) * 8 // n)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
            opt.step()
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)


def die_after(out: str, steps: int, victim: int) -> None:
    """The victim exits abruptly after some steps; the others record the error they get and when."""
    worker = ps.init()
    params = {"w": torch.zeros(1000)}
    worker.register(params, optimizer=ps.optim.SGD(lr=0.1))
    for _ in range(steps):
        worker.push_pull({"w": torch.ones(1000)}, into=params).wait(timeout=30)
    if worker.rank == victim:
        os._exit(17)
    start = time.monotonic()
    try:
        for _ in range(1000):
            worker.push_pull({"w": torch.ones(1000)}, into=params).wait()
        result = {"error": None}
    except ps.PSError as exc:
        result = {"error": f"{type(exc).__name__}: {exc}", "rank": getattr(exc, "rank", None),
                  "role": getattr(exc, "role", None)}
    result["seconds"] = time.monotonic() - start
    torch.save(result, out)
    os._exit(0)


def checkpointed_train(out: str, optimizer: str, total_steps: int, stop_after: int = 0) -> None:
    """DistributedOptimizer with PS_CHECKPOINT_* from the environment; optionally stops early."""
    model = torch.nn.Module()
    for name, value in models.make_params(0).items():
        model.register_parameter(name, torch.nn.Parameter(value))
    with ps.DistributedOptimizer(model, models.optimizer_spec(optimizer)) as opt:
        per = models.BATCH // opt.worker.num_workers
        mine = slice(opt.worker.rank * per, (opt.worker.rank + 1) * per)
        params = dict(model.named_parameters())
        for step in range(opt.start_step, stop_after or total_steps):
            x, y = models.batch(step)
            opt.zero_grad()
            models.loss_fn(params, x[mine], y[mine]).backward()
            opt.step()
        torch.save({"start_step": opt.start_step, "params": {k: v.detach() for k, v in params.items()}}, out)


def elastic_train(out: str, flag_dir: str, victim: int = -1, die_at: int = 0, first: int = 10, second: int = 5) -> None:
    """Gradients of rank+1 with SGD(lr=1): every step moves w by minus the mean over contributors.

    Originals run ``first`` steps (the victim dies after ``die_at``), say so in flag_dir, wait for a
    joiner to announce itself, then all run ``second`` steps. A joiner registers, announces
    itself, and runs the ``second`` steps."""
    from pathlib import Path

    flags = Path(flag_dir)
    worker = ps.init()
    params = {"w": torch.zeros(1000)}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    joined_at = params["w"][0].item()
    grads = {"w": torch.full((1000,), float(worker.rank + 1))}
    joiner = (flags / "originals-done").exists()
    if not joiner:
        for step in range(first):
            if worker.rank == victim and step == die_at:
                os._exit(17)
            worker.push_pull(grads, into=params).wait(timeout=30)
        (flags / f"done-{worker.rank}").touch()
        deadline = time.monotonic() + 60
        while not (flags / "joined").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    else:
        (flags / "joined").touch()
    after_first = params["w"][0].item()
    for _ in range(second):
        worker.push_pull(grads, into=params).wait(timeout=30)
    torch.save({"rank": worker.rank, "joined_at": joined_at, "after_first": after_first,
                "final": params["w"].clone()}, out)
    worker.close()


def count_steps(out: str, steps: int) -> None:
    """DistributedOptimizer with overlap: the step counts it, the worker and its heartbeats report.
    The slow backward lets the last layers' blocks be answered before the first layers' are sent."""
    torch.manual_seed(0)
    model = models.OverlapNet(slow_backward=0.3)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.05), overlap=True) as opt:
        for step in range(steps):
            x, y = models.overlap_batch(step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        torch.save({"step_count": opt.step_count, "worker_steps": opt.worker.steps,
                    "heartbeat_steps": opt.worker.membership.stats.get("steps")}, out)


def routed_train(out: str, optimizer: str, overlap: bool) -> None:
    """DistributedOptimizer on models.Routed, the batch split between the workers."""
    torch.manual_seed(0)
    model = models.Routed()
    with ps.DistributedOptimizer(model, models.ROUTED_OPTIMIZERS[optimizer], overlap=overlap) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        for step in range(len(models.ROUTED_FLAGS)):
            x, y, flags = models.routed_batch(step)
            mine = slice(rank * len(x) // n, (rank + 1) * len(x) // n)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x[mine], flags[mine]), y[mine]).backward()
            opt.step()
        torch.save({k: v.detach() for k, v in model.state_dict().items()}, out)


def stop_while_pulling(out: str, victim: int, steps: int, mib: int) -> None:
    """Sync: the victim pushes its first step, asks for the result (a pull of a block too large
    for the socket buffers, answered once the others have pushed too) and stops itself (SIGSTOP)
    without ever reading it. The others train on: their first step answers the victim's pull, their
    second waits until the victim is declared gone, the rest must not wait for the unread reply."""
    import signal

    worker = ps.init()
    params = {"big": torch.zeros(mib << 18)}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    worker.barrier()
    grads = {"big": torch.ones_like(params["big"])}
    if worker.rank == victim:
        worker.push(grads).wait(timeout=30)
        worker.pull(params)  # never read
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGSTOP)
        return
    time.sleep(1.0)  # the victim is stopped by now
    times = []
    for _ in range(steps):
        worker.push_pull(grads, into=params).wait(timeout=60)
        times.append(time.monotonic())
    # the servers may hear of the departure a heartbeat before this worker does
    deadline = time.monotonic() + 10
    while victim not in worker.membership.departed_workers and time.monotonic() < deadline:
        time.sleep(0.05)
    torch.save({"after_gone": times[-1] - times[1], "gone": victim in worker.membership.departed_workers}, out)
    worker.close()


def stop_myself(out: str, flag_dir: str) -> None:
    """A chaos victim (test_chaos_bugs.py): registers {"w": zeros(2)}, pushes -1 to w[1] without
    waiting for the answer and stops itself (SIGSTOP) until the test continues it; then records what
    a liveness check, the wait for that push and one more push do."""
    import signal
    from pathlib import Path

    worker = ps.init()
    params = {"w": torch.zeros(2)}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    first = worker.push({"w": torch.tensor([0.0, 1.0])})
    time.sleep(0.3)  # the answer is in by now
    (Path(flag_dir) / "stopping").touch()
    os.kill(os.getpid(), signal.SIGSTOP)
    result = {}
    for name, call in (("check", worker.membership.check), ("first", first.wait),
                       ("second", lambda: worker.push({"w": torch.tensor([0.0, 1.0])}).wait(timeout=10))):
        try:
            call()
            result[name] = None
        except ps.PSError as exc:
            result[name] = f"{type(exc).__name__}: {exc}"
    result["departed"] = worker.rank in worker.membership.departed_workers
    torch.save(result, out)
    os._exit(0)  # no close(): it is out of the job


def gradient_behind_device_work(numel: int, seconds: float) -> torch.Tensor:
    """2.0 everywhere on the GPU, ready only once one kernel queued on the current stream has spun
    for about ``seconds`` (``torch.cuda._sleep`` counts GPU clock cycles, about 2e9 a second on an
    H200). In a fresh process, warm up first: the first launch of a kernel loads its module, which
    waits for all work on the device (CUDA's lazy loading; RESULTS_GPU.md, fifteenth round)."""
    torch.cuda._sleep(int(seconds * 2e9))
    return torch.full((numel,), 2.0, device="cuda")


def held_then_killed(out: str, flag_dir: str, numel: int) -> None:
    """A GPU victim (test_cuda_ipc.py): registers {"w": zeros(numel)} on the GPU and pushes through
    its device lane a gradient still computed behind about ten seconds of device work on a stream of
    its own, says so, and waits to be killed."""
    from pathlib import Path

    worker = ps.init()
    params = {"w": torch.zeros(numel, device="cuda")}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    # the kernels the push launches are loaded now, not behind the device work (CUDA lazy loading)
    worker.push({"w": torch.zeros(numel, device="cuda")}).wait(timeout=30)
    stream = torch.cuda.Stream()
    started = time.monotonic()
    with torch.cuda.stream(stream):
        gradient = gradient_behind_device_work(numel, seconds=10.0)
        queued = time.monotonic()
        worker.push({"w": gradient})
    told = Path(flag_dir) / "sent.part"
    told.write_text(f"gradient queued after {queued - started:.3f} s, "
                    f"push() returned after {time.monotonic() - started:.3f} s")
    told.rename(told.with_suffix(""))
    time.sleep(600)


def checkpoint_part(out: str, flag_dir: str, directory: str, step: int) -> None:
    """A chaos victim: registers {"w": zeros(2)}, hands in its part of a checkpoint and waits in it
    (the test kills it there)."""
    from pathlib import Path

    worker = ps.init()
    worker.register({"w": torch.zeros(2)}, optimizer=ps.optim.SGD(lr=1.0))
    (Path(flag_dir) / "saving").touch()
    worker.save_checkpoint(directory, step=step)
    torch.save({"saved": True}, out)


def emb_train(out: str, rule: str, mode: str, weighted: bool, steps: int, overlap: bool = True,
              device: str = "cpu") -> None:
    """models.EmbNet with a ps.nn.EmbeddingBag.from_pretrained, the batch's bags split among the
    workers; saves the dense parameters and every row of the table (pulled for eval, creating none).
    ``device``: where the model, and so the rows of each batch, live."""
    model = models.EmbNet(ps.nn.EmbeddingBag.from_pretrained(models.emb_weight(), mode=mode)).to(device)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), sparse_optimizer=models.SPARSE_RULES[rule],
                                 overlap=overlap) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        per = models.EMB_BAGS // n
        mine = slice(rank * per, (rank + 1) * per)
        for step in range(steps):
            ids, weights, y = (t.to(device) for t in models.emb_batch(step))
            opt.zero_grad()
            pred = model(ids[mine], weights[mine] if weighted else None)
            torch.nn.functional.mse_loss(pred, y[mine]).backward()
            opt.step()
        weight = opt.worker.pull_rows("bag", torch.arange(models.EMB_ROWS), train=False).wait()
        lane_requests = sum(s["lane_requests"] for s in opt.worker.server_stats())
        torch.save({"weight": weight, "head.weight": model.head.weight.detach().cpu(),
                    "head.bias": model.head.bias.detach().cpu(), "steps": opt.step_count,
                    "lane_requests": lane_requests}, out)


def emb_checkpointed(out: str, total_steps: int, stop_after: int = 0) -> None:
    """A fixed and a hashed table (SparseAdam, admission) and a linear layer, with PS_CHECKPOINT_*
    from the environment; saves the dense parameters and every row it touched."""
    torch.manual_seed(1)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.items = ps.nn.EmbeddingBag(40, 4, mode="mean")
            self.users = ps.nn.Embedding(None, 4, admit_after=2, capacity=64)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, items, users):
            return self.head(torch.cat([self.items(items), self.users(users)], dim=1))

    model = Net()
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), sparse_optimizer=ps.optim.SparseAdam(lr=0.05)) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        for step in range(opt.start_step, stop_after or total_steps):
            g = torch.Generator().manual_seed(500 + step)
            items, users = torch.randint(0, 40, (8, 3), generator=g), torch.randint(0, 30, (8,), generator=g) * 1000
            mine = slice(rank * 8 // n, (rank + 1) * 8 // n)
            opt.zero_grad()
            model(items[mine], users[mine]).pow(2).mean().backward()
            opt.step()
        rows = {"items": opt.worker.pull_rows("items", torch.arange(40), train=False).wait(),
                "users": opt.worker.pull_rows("users", torch.arange(30) * 1000, train=False).wait()}
        stats = opt.worker.server_stats()
        torch.save({"start_step": opt.start_step, "rows": rows, "head": model.head.weight.detach().clone(),
                    "tables": [s["tables"] for s in stats]}, out)


class _Params(torch.nn.Module):
    """models' parameters as a module, for DistributedOptimizer."""

    def __init__(self, params: dict):
        super().__init__()
        for name, value in params.items():
            setattr(self, name, torch.nn.Parameter(value))


def compressed_train(out: str, codec: str, steps: int, pull: str = "None", overlap: bool = False,
                     optimizer: str = "sgd", device: str = "cpu") -> None:
    """sync_train with ``compression=eval(codec)`` (and ``pull_compression=eval(pull)``); with
    ``overlap``, through DistributedOptimizer. Saves the values, each tensor's segments and the
    servers' counters."""
    compression, pull_compression = eval(codec, {"ps": ps}), eval(pull, {"ps": ps})
    params = {k: v.to(device) for k, v in models.make_params(0).items()}
    if overlap:
        model = _Params(params)
        opt = ps.DistributedOptimizer(model, models.optimizer_spec(optimizer), compression=compression,
                                      pull_compression=pull_compression)
        worker, params = opt.worker, dict(model.named_parameters())
    else:
        worker = ps.init()
        worker.register(params, optimizer=models.optimizer_spec(optimizer), compression=compression,
                        pull_compression=pull_compression)
    per = models.BATCH // worker.num_workers
    for step in range(steps):
        x, y = (t.to(device) for t in models.batch(step))
        mine = slice(worker.rank * per, (worker.rank + 1) * per)
        if overlap:
            opt.zero_grad()
            models.loss_fn(params, x[mine], y[mine]).backward()
            opt.step()
        else:
            leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
            models.loss_fn(leaves, x[mine], y[mine]).backward()
            worker.push_pull({k: v.grad for k, v in leaves.items()}, into=params).wait(timeout=30)
    segments = {k: [(seg.offset, seg.numel) for _, seg in worker.shard_map.segments_of(k)] for k in params}
    torch.save({"params": {k: v.detach().cpu() for k, v in params.items()}, "segments": segments,
                "stats": worker.server_stats()}, out)
    (opt if overlap else worker).close()


def count_up(out: str, steps: int, numel: int) -> None:
    """Sync, SGD(lr=1), a gradient of -1 everywhere: every value is the number of steps applied."""
    with ps.init() as worker:
        params = {"w": torch.zeros(numel), "v": torch.zeros(1000)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(steps):
            worker.push_pull({k: torch.full_like(v, -1.0) for k, v in params.items()}, into=params).wait(timeout=30)
        torch.save(params, out)


def gpu_count_up(out: str, steps: int, numel: int, empty_cache: bool = False, repeats: int = 1) -> None:
    """``count_up`` with GPU tensors, and the servers' counters; ``empty_cache``: the gradients and
    the allocator's cache are let go between steps, so the worker's exports are made anew; each
    step's gradients are pushed ``repeats`` times."""
    with ps.init() as worker:
        params = {"w": torch.zeros(numel, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(steps):
            grads = {"w": torch.full_like(params["w"], -1.0)}
            for _ in range(repeats):
                worker.push_pull(grads, into=params).wait(timeout=30)
            if empty_cache:
                del grads
                torch.cuda.empty_cache()
        torch.save({"w": params["w"].cpu(), "stats": worker.server_stats()}, out)


def direct_then_die(out: str, flag_dir: str, victim: int) -> None:
    """Three push_pulls of a tensor in shared memory (the direct exchange), then ``done-RANK``; the
    victim exits abruptly once ``die`` exists, the others close once ``finish`` exists."""
    from pathlib import Path

    flags = Path(flag_dir)
    worker = ps.init()
    worker.register({"w": torch.zeros(1000)}, optimizer=ps.optim.SGD(lr=1.0))
    param, grad = (worker.lanes.direct.shared_empty(1000, torch.float32) for _ in range(2))
    grad.fill_(1.0)
    for _ in range(3):  # the first introduces the memory to the server, and goes through the lane
        worker.push_pull({"w": grad}, into={"w": param}).wait(timeout=30)
    (flags / f"done-{worker.rank}").touch()
    deadline = time.monotonic() + 60
    awaited = "die" if worker.rank == victim else "finish"
    while not (flags / awaited).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if worker.rank == victim:
        os._exit(17)
    torch.save({"direct": sum(s["direct_requests"] for s in worker.server_stats()), "w": param.clone()}, out)
    worker.close()


TASKS = {f.__name__: f for f in (count_up, sync_train, overlap_train, train_with_optimizer, die_after, checkpointed_train,
                                  elastic_train, count_steps, routed_train, stop_while_pulling,
                                  stop_myself, held_then_killed, checkpoint_part, emb_train, emb_checkpointed, compressed_train,
                                  direct_then_die, gpu_count_up)}

if __name__ == "__main__":
    task, out, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    TASKS[task](out, **kwargs)

