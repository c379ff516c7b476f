"""Models and steps for ``benchmarks/gpu.py --only onegpu``: one worker and one server on one GPU
against single-process torch.

``gpt``: a GPT-like language model of about 106M parameters (token embedding, 8 pre-norm
transformer layers of width 768 with 12 heads, an untied head over 32000 tokens), causal, bf16
autocast, Adam(lr=3e-4), batch 16 x 256 tokens of a fixed random sequence per step.
``resnet50``: torchvision's, SGD(lr=0.01, momentum=0.9), synthetic 224x224 images, batch 128.
``tinygpt``: a small ``gpt`` for smoke runs on the CPU.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable

import torch

import psframework as ps

VOCAB = 32000


class GPT(torch.nn.Module):
    def __init__(self, vocab: int = VOCAB, width: int = 768, layers: int = 8, heads: int = 12, context: int = 256):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.position = torch.nn.Parameter(torch.randn(context, width) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                                 batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.embed(tokens) + self.position[:length]
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))


SPECS = {
    "gpt": {"batch": 16, "context": 256, "kwargs": {}},
    "tinygpt": {"batch": 4, "context": 32, "kwargs": {"vocab": 500, "width": 64, "layers": 2, "heads": 4,
                                                      "context": 32}},
}


def make_model(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50().to(device)
    return GPT(**SPECS[name]["kwargs"]).to(device)


def optimizers(name: str) -> tuple[Callable, ps.optim.OptimizerSpec]:
    """The single process's torch optimizer (a function of the parameters) and the server's."""
    if name == "resnet50":
        return (lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9),
                ps.optim.SGD(lr=0.01, momentum=0.9))
    fused = torch.cuda.is_available()
    return lambda params: torch.optim.Adam(params, lr=3e-4, fused=fused), ps.optim.Adam(lr=3e-4)


def batches(name: str, steps: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The inputs and targets of ``steps`` steps (ResNet: one synthetic batch, repeated)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if name == "resnet50":
        x = torch.randn(128, 3, 224, 224, generator=g)
        y = torch.randint(0, 1000, (128,), generator=g)
        return [(x.to(device), y.to(device))] * steps
    spec = SPECS[name]
    vocab = spec["kwargs"].get("vocab", VOCAB)
    out = []
    for _ in range(steps):
        tokens = torch.randint(0, vocab, (spec["batch"], spec["context"] + 1), generator=g).to(device)
        out.append((tokens[:, :-1], tokens[:, 1:]))
    return out


def loss_of(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if name == "resnet50":
        return torch.nn.functional.cross_entropy(model(x), y)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
        logits = model(x)
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(name: str, model: torch.nn.Module, opt, data: list, warmup: int, synchronize: Callable,
          before_timing: Callable = lambda: None) -> dict:
    """``warmup`` steps, then the rest timed; the loss of every step."""
    import time

    losses = []

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(name, model, x, y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())

    for x, y in data[:warmup]:
        step(x, y)
    synchronize()
    before_timing()
    threads_before = thread_times()
    start = time.perf_counter()
    for x, y in data[warmup:]:
        step(x, y)
    synchronize()
    seconds = time.perf_counter() - start
    steps = len(data) - warmup
    return {"seconds": seconds, "steps": steps, "losses": [float(v) for v in torch.stack(losses).cpu()],
            "threads": thread_use(threads_before, thread_times(), steps)}


def thread_times() -> dict[int, tuple[str, float, float, int]]:
    """Each thread of this process: its name, the CPU seconds it ran, the seconds it waited for a
    CPU while it could run (from schedstat, where the kernel keeps it; else 0), and how often the
    kernel took the CPU from it (involuntary context switches). Linux only (empty elsewhere): tells
    a thread whose work got slower from one that waited for a CPU."""
    tick = os.sysconf("SC_CLK_TCK")
    times = {}
    for task in Path("/proc/self/task").glob("*"):
        try:
            stat = (task / "stat").read_text()
            status = (task / "status").read_text()
            schedstat = (task / "schedstat").read_text().split() if (task / "schedstat").exists() else []
        except OSError:  # the thread ended while we looked
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        preempted = next(int(line.split()[1]) for line in status.splitlines()
                         if line.startswith("nonvoluntary_ctxt_switches"))
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        if schedstat:
            ran, waited = int(schedstat[0]) / 1e9, int(schedstat[1]) / 1e9
        else:
            ran, waited = (int(fields[11]) + int(fields[12])) / tick, 0.0
        times[int(task.name)] = (name, ran, waited, preempted)
    return times


def thread_use(before: dict, after: dict, steps: int) -> dict:
    """Per step between two ``thread_times``: the main thread's CPU ms, ms waiting for a CPU and
    preemptions, the same for the busiest other thread (autograd's, on a GPU), and the process's
    CPU ms."""
    used = {}
    for tid, (name, ran, waited, preempted) in after.items():
        _, ran0, waited0, preempted0 = before.get(tid, (name, 0.0, 0.0, 0))
        used[tid] = (name, ran - ran0, waited - waited0, preempted - preempted0)
    if not used:
        return {}
    main_id = threading.main_thread().native_id
    main = used.get(main_id, ("main", 0.0, 0.0, 0))
    busiest = max((u for tid, u in used.items() if tid != main_id), key=lambda u: u[1], default=("-", 0.0, 0.0, 0))
    row = {}
    for label, (name, ran, waited, preempted) in (("main", main), ("other", busiest)):
        row.update({f"{label} cpu ms/step": ran * 1e3 / steps, f"{label} runqueue ms/step": waited * 1e3 / steps,
                    f"{label} preempted/step": preempted / steps})
    row["busiest other"] = busiest[0]
    row["process cpu ms/step"] = sum(u[1] for u in used.values()) * 1e3 / steps
    return row


def profile(name: str, model: torch.nn.Module, opt, data: list, path: str) -> None:
    """Three more steps under torch.profiler (CPU ops, CUDA kernels and copies), as a gzipped Chrome trace."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch_profile(activities=activities) as prof:
        for x, y in data[:3]:
            with torch.profiler.record_function("step"):
                opt.zero_grad(set_to_none=True)
                loss_of(name, model, x, y).backward()
                opt.step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    prof.export_chrome_trace(path)
