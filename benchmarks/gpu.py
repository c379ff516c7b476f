"""GPU benchmarks: the server's update, push_pull from GPU tensors, and training end to end.

    python benchmarks/gpu.py --out RESULTS_GPU_fragment.md            # all three (a few minutes)
    python benchmarks/gpu.py --only apply,pushpull                      # one GPU is enough for these
    python benchmarks/gpu.py --only e2e --model tiny --batch 32 --steps 5 --device cpu   # smoke run

1. ``apply``: one update of a 1 GiB float32 shard through ``ShardOptimizer`` (what a server runs),
   as GB/s of device-memory traffic, against a device-to-device copy timed in the same run. Bytes
   counted: SGD with momentum reads param, grad, momentum and writes param, momentum (5 x shard);
   Adam reads param, grad, m, v and writes param, m, v (7 x shard); the copy reads and writes
   (2 x shard). CUDA events around each step, warm-up first, the median of ``--repeats``.
2. ``pushpull``: ``push_pull(grads, into=params).wait()`` of one tensor of 4, 64 and 256 MiB, one
   worker and one server with its shards on cuda: worker tensors on the host, on the GPU (through
   the device lanes, CUDA IPC), and on the GPU with ``PS_CUDA_IPC=0`` (through the shared-memory
   lanes); "device-ordered" is ``push_pull(..., device_ordered=True)`` through the device lanes
   (the copies out wait for the server on the GPU, as ``DistributedOptimizer(overlap=False)``
   does), all three with ``PS_DIRECT_GPU=0``; "direct" is the direct exchange (``PS_DIRECT_GPU=1``,
   the default: the server reads the gradient and
   writes its values where the worker's tensors lie, ``docs/direct-device-exchange.md``). GB/s = 2 x tensor bytes / median round trip (1 GB = 1e9 bytes), as
   benchmarks/pushpull.py. A GPU round trip ends after torch.cuda.synchronize(), so its copies are
   included.
3. ``e2e``: a ResNet-50 (torchvision; ``--model tiny`` is a small CNN for smoke runs) on synthetic
   224x224 images, one process per GPU on two GPUs, SGD(lr=0.01, momentum=0.9), the same batch
   per GPU everywhere: torch DistributedDataParallel with NCCL and with gloo, the parameter server
   (2 workers, 2 servers with their shards on the two GPUs) in sync and async mode, each with and
   without overlap, through the shared-memory lanes of one host (the default) and, for sync, over
   loopback TCP only (``PS_SHM=0``), and one GPU training alone times two (no communication at all:
   the ceiling).
   samples/s = GPUs x batch x steps / the slowest process's time for its timed steps.
   ``--chunk-mib 16`` adds PS sync rows with blocks of that size (``PS_CHUNK_BYTES``);
   ``--trace DIR`` writes a torch.profiler timeline of three steps of each rank of every setup
   (gzipped Chrome traces: chrome://tracing or https://ui.perfetto.dev open them).
4. ``onegpu``: one worker and one server on the same GPU against single-process torch, for the
   models of ``--onegpu-models`` (``benchmarks/_one_gpu.py``: a GPT-like 106M-parameter language
   model with bf16 autocast and Adam, ResNet-50 with SGD): PS sync with overlap on and off, and
   without CUDA IPC (``PS_CUDA_IPC=0``, the shared-memory lanes), and without overlap through the
   direct exchange (``PS_DIRECT_GPU=1``, the default since the twenty-third GPU round; the rows
   without "direct" set ``PS_DIRECT_GPU=0``, the device lanes). samples/s = batch x timed steps /
   time; the loss of every step against the single process's (largest relative difference).
   ``--rounds 3`` runs the setups three times, one after another, and adds a table of the medians
   of each setup's ratio to the single process of its round: the shared machine's speed moves by a
   third between minutes, and one round's ratio says little.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import psframework as ps  # noqa: E402
from benchmarks import _one_gpu as one  # noqa: E402
from benchmarks._common import free_port  # noqa: E402
from psframework.optim import ShardOptimizer  # noqa: E402

GB = 1e9
MiB = 1 << 20


def _device_name(index: int = 0) -> str:
    return torch.cuda.get_device_name(index) if torch.cuda.is_available() else "cpu"


def median_ms(fn, repeats: int, warmup: int) -> float:
    """Median of ``repeats`` CUDA-event timings of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ 1. apply


def bench_apply(shard_bytes: int, repeats: int, warmup: int) -> list[dict]:
    dev = torch.device("cuda:0")
    n = shard_bytes // 4
    copy_ms = _copy_ms(n, dev, repeats, warmup)
    copy_gbs = 2 * shard_bytes / (copy_ms / 1e3) / GB
    rows = [{"rule": "device-to-device copy", "impl": "copy_", "traffic": 2, "ms": copy_ms,
             "GB/s": copy_gbs, "vs copy": 1.0}]
    cases = [("SGD momentum", ps.optim.SGD(lr=0.01, momentum=0.9), 5),
             ("Adam", ps.optim.Adam(lr=1e-3), 7)]
    for name, spec, traffic in cases:
        for impl in ("ShardOptimizer", "foreach"):
            used, ms = _apply_ms(spec, impl, n, dev, repeats, warmup)
            gbs = traffic * shard_bytes / (ms / 1e3) / GB
            rows.append({"rule": name, "impl": f"{impl}: {used}", "traffic": traffic, "ms": ms, "GB/s": gbs,
                         "vs copy": gbs / copy_gbs})
            torch.cuda.empty_cache()  # the last case's tensors are gone with its call
    return rows


def _copy_ms(n: int, dev: torch.device, repeats: int, warmup: int) -> float:
    src = torch.randn(n, device=dev)
    dst = torch.empty_like(src)
    return median_ms(lambda: dst.copy_(src), repeats, warmup)


def _apply_ms(spec, impl: str, n: int, dev: torch.device, repeats: int, warmup: int) -> tuple[str, float]:
    """One optimizer step over ``n`` parameters: ours (ShardOptimizer) or torch's foreach path."""
    param = torch.randn(n, device=dev)
    grad = torch.randn(n, device=dev) * 1e-3
    if impl == "ShardOptimizer":
        opt = ShardOptimizer(spec, [param])
        used = "fused" if opt.opt.param_groups[0].get("fused") else "foreach"
        return used, median_ms(lambda: opt.step({0: grad}), repeats, warmup)
    param.grad = grad  # torch's multi-tensor path, for comparison
    plain = spec.torch_class([param], **spec.hyperparameters(), foreach=True)
    return "foreach (torch.optim)", median_ms(plain.step, repeats, warmup)


# ------------------------------------------------------------------------------------------ 2. push_pull


def bench_pushpull(sizes_mib: list[int], repeats: int, warmup: int, chunk_mib: Optional[int] = None) -> list[dict]:
    """Host tensors, GPU tensors through the device lanes (CUDA IPC), and GPU tensors through the
    shared-memory lanes (``PS_CUDA_IPC=0``), each with a cluster of its own; blocks of
    ``chunk_mib`` (default: ``PS_CHUNK_BYTES``'s)."""
    rows = [{"MiB": mib, "blocks MiB": chunk_mib or "default"} for mib in sizes_mib]
    for where, ipc in (("cpu", "1"), ("cuda", "1"), ("cuda, device-ordered", "1"), ("cuda, direct", "1"),
                       ("cuda, no IPC", "0")):
        os.environ["PS_CUDA_IPC"] = ipc  # read by ps.init below
        os.environ["PS_DIRECT_GPU"] = "1" if "direct" in where else "0"
        device = where.split(",")[0]
        with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync", server_device="cuda",
                             chunk_bytes=chunk_mib * MiB if chunk_mib else None) as cluster:
            with ps.init(scheduler=cluster.scheduler) as worker:
                worker.register({f"t{m}": torch.zeros(m * MiB // 4, device=device) for m in sizes_mib},
                                optimizer=ps.optim.SGD(lr=1e-6))
                for row, mib in zip(rows, sizes_mib):
                    timed = repeats if mib < 256 else max(3, repeats // 2)
                    blocks = len(worker.shard_map.segments_of(f"t{mib}"))
                    start = _path_counts(worker)
                    round_trip_times(worker, mib, device, warmup, 0, device_ordered="device-ordered" in where)
                    before = _path_counts(worker)
                    seconds = statistics.median(round_trip_times(worker, mib, device, timed, 0,
                                                                 device_ordered="device-ordered" in where))
                    row[f"{where} ms"] = seconds * 1e3
                    row[f"{where} GB/s"] = 2 * mib * MiB / seconds / GB
                    if "direct" in where:  # of the requests, those that really went direct (and through the device lane)
                        after = _path_counts(worker)
                        row["direct requests"] = (f"timed {after[0] - before[0]} of {timed * blocks} (through device "
                                                  f"lanes {after[1] - before[1]}, direct ones included), warm-up "
                                                  f"{before[0] - start[0]} of {warmup * blocks}, exports refused "
                                                  f"{after[2] - start[2]}")
    os.environ.pop("PS_CUDA_IPC")
    os.environ.pop("PS_DIRECT_GPU")
    for row in rows:
        row["IPC/no IPC"] = row["cuda GB/s"] / row["cuda, no IPC GB/s"]
    return rows


def _path_counts(worker) -> tuple[int, int, int]:
    """The servers' counts of direct requests, of requests through device lanes (direct ones
    included), and of exports they could not map."""
    stats = worker.server_stats()
    return tuple(sum(s[key] for s in stats) for key in ("direct_requests", "ipc_requests", "exports_refused"))


def round_trip_times(worker, mib: int, device: str, repeats: int, warmup: int,
                     device_ordered: bool = False) -> list[float]:
    """Seconds of each of ``repeats`` timed ``push_pull(grads, into=params).wait()`` of the key
    ``t{mib}`` (``mib`` MiB of float32, registered by the caller), after ``warmup`` untimed ones;
    on a GPU each ends after ``torch.cuda.synchronize()``, so the copies out are included.
    ``device_ordered``: ``push_pull(..., device_ordered=True)``, whose copies out wait for the
    server on the GPU, so ``wait()`` takes the answers in while the GPU works; each round trip
    still ends only once both are done."""
    params = {f"t{mib}": torch.zeros(mib * MiB // 4, device=device)}
    grads = {f"t{mib}": torch.randn(mib * MiB // 4, device=device)}

    def round_trip():
        worker.push_pull(grads, into=params, device_ordered=device_ordered).wait(timeout=120)
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        round_trip()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        round_trip()
        times.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------------------------ 3. end to end


def _make_model(name: str) -> torch.nn.Module:
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50()
    if name == "tiny":
        layers, channels = [], 3
        for width in (32, 64, 128):
            layers += [torch.nn.Conv2d(channels, width, 3, stride=2, padding=1), torch.nn.BatchNorm2d(width),
                       torch.nn.ReLU()]
            channels = width
        return torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                   torch.nn.Linear(channels, 1000))
    raise click.BadParameter(f"unknown model {name!r}")


def _batch(batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    y = torch.randint(0, 1000, (batch,), generator=g)
    return x.to(device), y.to(device)


def _timed_steps(step, steps: int, warmup: int, device: torch.device, before_timing=None) -> float:
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if before_timing is not None:
        before_timing()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _parts(model, opt, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One training step in two named parts (the names label them in ``--trace`` timelines)."""
    def forward_backward():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()

    return {"forward_backward": forward_backward, "optimizer_step": opt.step}


def _run_parts(parts: dict) -> None:
    for part in parts.values():
        part()


def _trace(parts: dict, args: dict, rank: int, device: torch.device) -> None:
    """With ``--trace DIR``: three more steps, with a torch.profiler timeline (CPU ops, CUDA
    kernels and copies) of each rank, written as a gzipped Chrome trace that chrome://tracing or
    Perfetto opens."""
    if not args.get("trace"):
        return
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            for name, part in parts.items():
                with record_function(name):
                    part()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    path = Path(args["trace"]) / f"{args['label']}-rank{rank}.json.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))


def _child_setup(rank: int, device: str) -> torch.device:
    if device == "cuda":
        torch.cuda.set_device(rank)
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", rank)
    return torch.device("cpu")


def run_local(args: dict) -> dict:
    """One process, one GPU, torch.optim: the ceiling, with no communication."""
    device = _child_setup(0, args["device"])
    model = _make_model(args["model"]).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x, y = _batch(args["batch"], args["size"], device)

    parts = _parts(model, opt, x, y)
    seconds = _timed_steps(lambda: _run_parts(parts), args["steps"], args["warmup"], device)
    _trace(parts, args, 0, device)
    return {"seconds": seconds}


def run_ddp(args: dict) -> dict:
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    device = _child_setup(rank, args["device"])
    dist.init_process_group(args["backend"], rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    try:
        model = _make_model(args["model"]).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if device.type == "cuda" else None)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x, y = _batch(args["batch"], args["size"], device)

        parts = _parts(ddp, opt, x, y)
        seconds = _timed_steps(lambda: _run_parts(parts), args["steps"], args["warmup"], device,
                               before_timing=dist.barrier)
        _trace(parts, args, rank, device)
        return {"seconds": seconds}
    finally:
        dist.destroy_process_group()


def run_ps(args: dict) -> dict:
    if args.get("switch_interval"):  # how often Python hands the GIL between the training and comm threads
        sys.setswitchinterval(args["switch_interval"])
    worker = ps.init()
    device = _child_setup(worker.rank, args["device"])
    model = _make_model(args["model"]).to(device)
    x, y = _batch(args["batch"], args["size"], device)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.01, momentum=0.9), worker=worker,
                                 overlap=args["overlap"]) as opt:
        parts = _parts(model, opt, x, y)
        seconds = _timed_steps(lambda: _run_parts(parts), args["steps"], args["warmup"], device,
                               before_timing=worker.barrier)
        _trace(parts, args, worker.rank, device)
        worker.barrier()  # no one leaves while another still needs the servers (sync mode)
    worker.close()
    return {"seconds": seconds}


def run_local_one_gpu(args: dict) -> dict:
    device = _child_setup(0, args["device"])
    model = one.make_model(args["model"], device)
    data = one.batches(args["model"], args["warmup"] + args["steps"], device)
    opt = one.optimizers(args["model"])[0](model.parameters())
    result = one.train(args["model"], model, opt, data, args["warmup"], lambda: _synchronize(device))
    _profile_one_gpu(args, model, opt, data)
    return result


def run_ps_one_gpu(args: dict) -> dict:
    worker = ps.init()
    device = _child_setup(0, args["device"])
    model = one.make_model(args["model"], device)
    data = one.batches(args["model"], args["warmup"] + args["steps"], device)
    with ps.DistributedOptimizer(model, one.optimizers(args["model"])[1], worker=worker,
                                 overlap=args["overlap"]) as opt:
        before = []
        result = one.train(args["model"], model, opt, data, args["warmup"], lambda: _synchronize(device),
                           before_timing=lambda: (worker.barrier(), before.extend(worker.server_stats())))
        result["stats"] = worker.server_stats()
        result["busy_s"] = sum(s["busy_s"] for s in result["stats"]) - sum(s["busy_s"] for s in before)
        _profile_one_gpu(args, model, opt, data)
        worker.barrier()
    worker.close()
    return result


def _profile_one_gpu(args: dict, model, opt, data: list) -> None:
    if args.get("trace"):
        Path(args["trace"]).mkdir(parents=True, exist_ok=True)
        one.profile(args["model"], model, opt, data, str(Path(args["trace"]) / f"{args['label']}.json.gz"))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CHILDREN = {"local": run_local, "ddp": run_ddp, "ps": run_ps, "local1": run_local_one_gpu, "ps1": run_ps_one_gpu}


def _spawn_children(kind: str, n: int, args: dict, env: dict, timeout: float, log_dir: Path) -> list[dict]:
    procs, outs = [], []
    for rank in range(n):
        out = log_dir / f"{kind}-{args.get('label', '')}-{rank}.json"
        log = open(log_dir / f"{kind}-{args.get('label', '')}-{rank}.log", "wb")
        child_env = {**os.environ, **env, "RANK": str(rank), "PS_RANK": str(rank), "PYTHONPATH": str(ROOT)}
        argv = [sys.executable, str(Path(__file__).resolve()), "child", kind, json.dumps(args), str(out)]
        procs.append((subprocess.Popen(argv, env=child_env, stdout=log, stderr=subprocess.STDOUT), log))
        outs.append(out)
    try:
        deadline = time.monotonic() + timeout
        for proc, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    failed = [r for r, (proc, _) in enumerate(procs) if proc.returncode != 0 or not outs[r].exists()]
    if failed:
        rank = failed[0]
        text = (log_dir / f"{kind}-{args.get('label', '')}-{rank}.log").read_text(errors="replace")[-2500:]
        raise RuntimeError(f"{kind} rank {rank} failed (exit {procs[rank][0].returncode}):\n{text}")
    return [json.loads(p.read_text()) for p in outs]


def bench_e2e(model: str, batch: int, size: int, steps: int, warmup: int, device: str, gpus: int,
              only: Optional[set], log_dir: Path, timeout: float, chunk_mibs: tuple = (),
              trace: Optional[str] = None) -> list[dict]:
    base = {"model": model, "batch": batch, "size": size, "steps": steps, "warmup": warmup, "device": device,
            "trace": trace}
    runs: list[tuple[str, str, int, dict]] = [("1 GPU alone, x2 (no communication)", "local", 1, {})]
    for backend in ("nccl", "gloo"):
        if device == "cpu" and backend == "nccl":
            continue
        runs.append((f"DDP {backend}", "ddp", gpus, {"backend": backend}))
    for mode in ("sync", "async"):
        for overlap in (True, False):
            runs.append((f"PS {mode}, overlap {'on' if overlap else 'off'}", "ps", gpus,
                         {"overlap": overlap, "mode": mode, "shm": True}))
    runs.append(("PS sync, overlap on, GIL switch interval 0.5 ms", "ps", gpus,
                 {"overlap": True, "mode": "sync", "shm": True, "switch_interval": 0.0005}))
    for mib in chunk_mibs:  # blocks of another size than PS_CHUNK_BYTES's default
        for overlap in (True, False):
            runs.append((f"PS sync, overlap {'on' if overlap else 'off'}, {mib} MiB blocks", "ps", gpus,
                         {"overlap": overlap, "mode": "sync", "shm": True, "chunk_mib": mib}))
    for overlap in (True, False):  # the same host, without the shared-memory lanes: loopback TCP
        runs.append((f"PS sync, overlap {'on' if overlap else 'off'}, sockets only", "ps", gpus,
                     {"overlap": overlap, "mode": "sync", "shm": False}))
    rows = []
    for label, kind, n, extra in runs:
        if only and label not in only:
            continue
        args = {**base, **extra, "label": "".join(c if c.isalnum() else "_" for c in label)}
        print(f"e2e: {label} ...", flush=True)
        try:
            if kind == "ps":
                chunk = extra.get("chunk_mib")
                with ps.LocalCluster(num_servers=gpus, num_workers=gpus, mode=extra["mode"],
                                     server_device="cuda" if device == "cuda" else "cpu",
                                     chunk_bytes=chunk * MiB if chunk else None) as cluster:
                    env = {**cluster.env(), "PS_SHM": "1" if extra["shm"] else "0"}
                    results = _spawn_children(kind, n, args, env, timeout, log_dir)
            elif kind == "ddp":
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n),
                       "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
                results = _spawn_children(kind, n, args, env, timeout, log_dir)
            else:
                results = _spawn_children(kind, 1, args, {}, timeout, log_dir)
            slowest = max(r["seconds"] for r in results)
            samples = gpus * batch * steps  # local: one GPU's rate times the GPUs
            rows.append({"setup": label, "samples/s": samples / slowest, "step ms": slowest / steps * 1e3})
        except Exception as exc:  # one failed setup should not cost the others' numbers
            print(f"e2e: {label} FAILED: {exc}", flush=True)
            rows.append({"setup": label, "samples/s": float("nan"), "step ms": float("nan"),
                         "error": str(exc).splitlines()[0][:200]})
    by = {r["setup"]: r["samples/s"] for r in rows}
    nccl, gloo = by.get("DDP nccl"), by.get("DDP gloo")
    for row in rows:
        if nccl:
            row["vs DDP nccl"] = row["samples/s"] / nccl
        if gloo:
            row["vs DDP gloo"] = row["samples/s"] / gloo
    return rows


def bench_one_gpu(models: list[str], steps: int, warmup: int, device: str, log_dir: Path,
                  timeout: float, chunk_mibs: tuple = (), trace: Optional[str] = None,
                  only: Optional[set] = None, rounds: int = 1) -> list[dict]:
    """One row per model, setup and round; the setups of a model run one after another, ``rounds``
    times, each round's ratios against that round's single process (the shared machine's speed
    moves between minutes: ``one_gpu_summary`` takes the medians)."""
    setups = [("single process, torch.optim", "local1", {}),
              ("single process, beside an idle CUDA process", "local1", {"beside": True}),
              ("PS sync, overlap on", "ps1", {"overlap": True, "ipc": "1"}),
              ("PS sync, overlap off", "ps1", {"overlap": False, "ipc": "1"}),
              ("PS sync, overlap on, no CUDA IPC", "ps1", {"overlap": True, "ipc": "0"}),
              ("PS sync, overlap off, direct", "ps1", {"overlap": False, "ipc": "1", "direct": "1"}),
              ("PS sync, overlap on, direct", "ps1", {"overlap": True, "ipc": "1", "direct": "1"})]
    for mib in chunk_mibs:
        setups += [(f"PS sync, overlap {'on' if overlap else 'off'}, {mib} MiB blocks", "ps1",
                    {"overlap": overlap, "ipc": "1", "chunk_mib": mib}) for overlap in (True, False)]
    setups = [setup for setup in setups if not only or setup[0] in only]
    rows = []
    for model in models:
        for round_ in range(1, rounds + 1):
            rows += _one_gpu_round(model, setups, round_ if rounds > 1 else None, steps, warmup, device, log_dir,
                                   timeout, trace)
    return rows


def _one_gpu_round(model: str, setups: list, round_: Optional[int], steps: int, warmup: int, device: str,
                   log_dir: Path, timeout: float, trace: Optional[str]) -> list[dict]:
    batch = 128 if model == "resnet50" else one.SPECS[model]["batch"]
    reference, rows = None, []
    for label, kind, extra in setups:
        args = {"model": model, "steps": steps, "warmup": warmup, "device": device, **extra, "trace": trace,
                "label": f"{model}-" + "".join(c if c.isalnum() else "_" for c in label)}
        print(f"onegpu: {model}, {label}{f', round {round_}' if round_ else ''} ...", flush=True)
        row = {"model": model, "setup": label, **({"round": round_} if round_ else {})}
        try:
            result = _one_gpu_child(kind, args, log_dir, timeout)
        except Exception as exc:  # one failed setup should not cost the others' numbers
            print(f"onegpu: {model}, {label} FAILED: {exc}", flush=True)
            rows.append({**row, "error": str(exc).splitlines()[0][:200]})
            continue
        reference = reference or result  # the single process, unless --e2e-only left it out
        row.update({"samples/s": batch * result["steps"] / result["seconds"],
                    "step ms": result["seconds"] / result["steps"] * 1e3})
        row["vs single process"] = row["samples/s"] / (batch * reference["steps"] / reference["seconds"])
        row["loss diff"] = max(abs(a - b) / abs(b) for a, b in zip(result["losses"], reference["losses"]))
        row.update(result.get("threads", {}))
        if "stats" in result:
            row["IPC requests"] = sum(s["ipc_requests"] for s in result["stats"])
            row["direct requests"] = sum(s["direct_requests"] for s in result["stats"])
            row["server busy ms/step"] = result["busy_s"] * 1e3 / result["steps"]
        print(f"onegpu: {model}, {label}: {row['step ms']:.1f} ms a step, {row['vs single process']:.3f} of the "
              f"round's single process, loss diff {row['loss diff']:.3g}", flush=True)
        rows.append(row)
    return rows


def one_gpu_summary(rows: list[dict]) -> list[dict]:
    """Per model and setup over its rounds: the median step, and the median, lowest and highest
    of its ratios to the single process of the same round."""
    runs: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        if "error" not in row:
            runs.setdefault((row["model"], row["setup"]), []).append(row)
    return [{"model": model, "setup": setup, "rounds": len(done),
             "median step ms": statistics.median(r["step ms"] for r in done),
             "median vs single": statistics.median(r["vs single process"] for r in done),
             "lowest": min(r["vs single process"] for r in done),
             "highest": max(r["vs single process"] for r in done)}
            for (model, setup), done in runs.items()]


def _one_gpu_child(kind: str, args: dict, log_dir: Path, timeout: float) -> dict:
    if kind == "local1" and args.get("beside"):
        with _idle_cuda_process(args["device"]):
            return _spawn_children(kind, 1, args, {}, timeout, log_dir)[0]
    if kind == "local1":
        return _spawn_children(kind, 1, args, {}, timeout, log_dir)[0]
    chunk = args.get("chunk_mib")
    trace = str(Path(args["trace"]) / "ps" / args["label"]) if args.get("trace") else None
    with _server_profiled(str(Path(trace) / "server.json") if trace else None), \
            ps.LocalCluster(num_servers=1, num_workers=1, mode="sync", server_device=args["device"],
                            chunk_bytes=chunk * MiB if chunk else None, trace_dir=trace) as cluster:
        env = {**cluster.env(), "PS_CUDA_IPC": args["ipc"], "PS_DIRECT_GPU": args.get("direct", "0")}
        result = _spawn_children(kind, 1, args, env, timeout, log_dir)[0]
        if trace:
            cluster.wait(60)  # the server writes its profile as it exits
        return result


@contextlib.contextmanager
def _server_profiled(path: Optional[str]):
    """With ``--trace``: the server's process runs under torch.profiler, its timeline written to
    ``path`` as it exits (pushpull_profile.py's wrapper), to line up with the worker's."""
    if path is None:
        yield
        return
    import psframework.cluster as cluster_module
    from benchmarks.pushpull_profile import _profiled_servers

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    plain = cluster_module.python_module
    cluster_module.python_module = _profiled_servers(path)
    try:
        yield
    finally:
        cluster_module.python_module = plain


@contextlib.contextmanager
def _idle_cuda_process(device: str):
    """Another process with a context on the GPU that does nothing, as a server between steps:
    whether a second context alone slows the single process."""
    code = ("import sys, time, torch; torch.zeros(1, device=sys.argv[1]).sum().item(); "
            "print('up', flush=True); time.sleep(3600)")
    proc = subprocess.Popen([sys.executable, "-c", code, device], stdout=subprocess.PIPE)
    try:
        if proc.stdout.readline().strip() != b"up":
            raise RuntimeError(f"the idle CUDA process did not start (exit {proc.poll()})")
        yield
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


# ------------------------------------------------------------------------------------------ report


def _table(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    lines = [f"**{title}**", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@click.group(invoke_without_command=True)
@click.option("--only", default="apply,pushpull,e2e,onegpu", help="comma-separated: apply, pushpull, e2e, onegpu")
@click.option("--onegpu-models", default="gpt,resnet50", help="onegpu: gpt, resnet50, tinygpt (comma-separated)")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="onegpu: run the setups this many times, alternating, and add a table of medians")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="markdown fragment for RESULTS.md")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
@click.option("--shard-mib", type=int, default=1024)
@click.option("--repeats", type=int, default=20)
@click.option("--sizes", default="4,64,256", help="push_pull sizes in MiB")
@click.option("--model", default="resnet50")
@click.option("--batch", type=int, default=128, help="per GPU")
@click.option("--image-size", type=int, default=224)
@click.option("--steps", type=int, default=20)
@click.option("--warmup", type=int, default=5)
@click.option("--device", type=click.Choice(["cuda", "cpu"]), default="cuda", help="e2e only")
@click.option("--e2e-only", default="", help="e2e and onegpu setup labels to run, separated by ';' (default all)")
@click.option("--timeout", type=float, default=150.0, help="seconds for one e2e setup")
@click.option("--chunk-mib", default="", help="pushpull, e2e, onegpu: also run with blocks of these MiB (comma-separated)")
@click.option("--trace", type=click.Path(file_okay=False), default=None,
              help="e2e: write a torch.profiler timeline of three steps of each rank of each setup here")
@click.pass_context
def main(ctx, only, onegpu_models, rounds, out, json_out, shard_mib, repeats, sizes, model, batch, image_size, steps, warmup, device,
         e2e_only, timeout, chunk_mib, trace) -> None:
    if ctx.invoked_subcommand is not None:
        return
    parts = set(only.split(","))
    gpu = _device_name(0)
    gpus = torch.cuda.device_count()
    results: dict = {"gpu": gpu, "gpus": gpus, "torch": torch.__version__}
    report = [f"GPU: {gpu} x {gpus}, torch {torch.__version__}, python {sys.version.split()[0]}\n"]
    if "apply" in parts:
        results["apply"] = bench_apply(shard_mib * MiB, repeats, warmup=3)
        report.append(_table(f"1. Server-side apply, {shard_mib} MiB fp32 shard, median of {repeats} "
                             "(GB/s of device-memory traffic)", results["apply"]))
        print(report[-1], flush=True)
    if "pushpull" in parts:
        sizes_mib = [int(s) for s in sizes.split(",")]
        results["pushpull"] = [row for mib in [None, *(int(c) for c in chunk_mib.split(",") if c.strip())]
                               for row in bench_pushpull(sizes_mib, max(5, repeats // 2), 2, mib)]
        report.append(_table("2. push_pull, 1 worker, 1 server on cuda:0, GB/s = 2 x bytes / median round trip",
                             results["pushpull"]))
        print(report[-1], flush=True)
    if "e2e" in parts:
        n = 2 if device == "cpu" else min(2, gpus)
        if n < 2:
            report.append("**3. End to end**: not run, it needs two GPUs and this machine has "
                          f"{gpus}.\n")
        else:
            with tempfile.TemporaryDirectory(prefix="ps-gpu-bench-") as tmp:
                log_dir = Path(os.environ.get("PS_BENCH_LOGS", tmp))
                log_dir.mkdir(parents=True, exist_ok=True)
                selected = {s.strip() for s in e2e_only.split(";") if s.strip()} or None
                chunks = tuple(int(c) for c in chunk_mib.split(",") if c.strip())
                results["e2e"] = bench_e2e(model, batch, image_size, steps, warmup, device, n, selected,
                                           log_dir, timeout, chunks, str(Path(trace).resolve()) if trace else None)
            report.append(_table(f"3. End to end, {model}, batch {batch} per GPU, {image_size}x{image_size}, "
                                 f"{n} GPUs, {steps} timed steps after {warmup}", results["e2e"]))
            print(report[-1], flush=True)
    if "onegpu" in parts:
        with tempfile.TemporaryDirectory(prefix="ps-gpu-bench-") as tmp:
            log_dir = Path(os.environ.get("PS_BENCH_LOGS", tmp))
            log_dir.mkdir(parents=True, exist_ok=True)
            selected = {s.strip() for s in e2e_only.split(";") if s.strip()} or None
            results["onegpu"] = bench_one_gpu(onegpu_models.split(","), steps, warmup, device, log_dir, timeout,
                                              tuple(int(c) for c in chunk_mib.split(",") if c.strip()),
                                              str(Path(trace).resolve()) if trace else None, selected,
                                              rounds)
        report.append(_table(f"4. One GPU: 1 worker and 1 server on it against single-process torch, {steps} "
                             f"timed steps after {warmup}; loss diff: largest relative difference of a step's "
                             "loss from the single process's", results["onegpu"]))
        if rounds > 1:
            report.append(_table(f"4a. One GPU over {rounds} alternating rounds: each round's ratio against "
                                 "that round's single process", one_gpu_summary(results["onegpu"])))
        print("\n".join(report[-2 if rounds > 1 else -1:]), flush=True)
    if out:
        Path(out).write_text("\n".join(report))
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=1))


@main.command(hidden=True)
@click.argument("kind")
@click.argument("args")
@click.argument("out")
def child(kind: str, args: str, out: str) -> None:
    result = CHILDREN[kind](json.loads(args))
    Path(out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
