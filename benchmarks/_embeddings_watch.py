"""Peak memory of a run's processes, from /proc: each process's ``VmHWM`` (the kernel's high-water
mark of its resident set), for the processes started and all their descendants, by role; and which
of the processes seen are still alive after the run.

>>> watch = MemoryWatch()
>>> watch.sample([os.getpid()])
>>> watch.peaks()["other"] > 0
True
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:  # the process has just ended
        return ""


def _stat(pid) -> list[str]:
    """The fields of /proc/PID/stat after "pid (comm)": state, ppid, ... (empty: no such process)."""
    stat = _read(f"/proc/{pid}/stat")
    return stat[stat.rindex(")") + 2:].split() if stat else []


def _children() -> dict[int, list[int]]:
    """Parent pid -> its children's pids, for every process on this host."""
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(entry)
            if fields:
                kids[int(fields[1])].append(int(entry))
    return kids


def descendants(roots: list[int]) -> list[int]:
    kids, seen, todo = _children(), [], list(roots)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(kids.get(pid, []))
    return seen


def role(pid: int) -> str:
    """How a report names the process: ps-launch, scheduler, server K, torch, ddp rank R, ps worker."""
    argv = _read(f"/proc/{pid}/cmdline").split("\0")
    joined = " ".join(argv)
    if "psframework.launch" in joined:
        return "ps-launch"
    if "-m psframework scheduler" in joined:
        return "scheduler"
    if "-m psframework server" in joined and "--rank" in argv:
        return f"server {argv[argv.index('--rank') + 1]}"
    if "_embeddings_worker.py" in joined:
        variant = argv[argv.index(next(a for a in argv if a.endswith("_embeddings_worker.py"))) + 1]
        if variant == "ddp" and "--rank" in argv:
            return f"ddp rank {argv[argv.index('--rank') + 1]}"
        return {"ps": f"ps worker (pid {pid})"}.get(variant, variant)
    return "other"


def vm_hwm_mib(pid: int) -> float:
    for line in _read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class MemoryWatch:
    def __init__(self):
        self._peak: dict[str, float] = {}
        self._seen: dict[tuple[int, str], str] = {}  # (pid, start time) -> role

    def sample(self, roots: list[int]) -> None:
        for pid in descendants(roots):
            fields = _stat(pid)
            hwm = vm_hwm_mib(pid)
            if hwm and fields:
                # looked up at each sample: a child forked by ps-launch shows the launcher's command
                # line until it execs, with the same pid and start time
                name = self._seen[(pid, fields[19])] = role(pid)
                self._peak[name] = max(self._peak.get(name, 0.0), hwm)

    def peaks(self) -> dict[str, float]:
        return dict(self._peak)

    def left_pids(self) -> list[int]:
        """The processes seen that still run (the same pid and start time, not a zombie)."""
        alive = []
        for pid, start in self._seen:
            fields = _stat(pid)
            if fields and fields[19] == start and fields[0] != "Z":
                alive.append(pid)
        return alive

    def left(self) -> list[str]:
        names = {pid: name for (pid, _), name in self._seen.items()}
        return [f"{names[pid]} (pid {pid})" for pid in self.left_pids()]


def mem_available_bytes(device: str) -> int:
    """Memory a torch run's tables may take: free GPU memory for cuda, else MemAvailable."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62
