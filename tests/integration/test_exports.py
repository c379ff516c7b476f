"""A worker's GPU allocations mapped by another process (``datapath/exports.py``): the other process
reads a tensor where it lies and writes another straight into the worker's memory. GPU only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from psframework.datapath.exports import WorkerExports
from psframework.datapath.memops import memops

pytestmark = pytest.mark.gpu
REPO = Path(__file__).resolve().parents[2]

SERVER_SIDE = textwrap.dedent("""
    import json, sys, torch
    from psframework.datapath.exports import DeviceOpener, MappedExports
    from psframework.datapath.memops import memops
    torch.zeros(1, device="cuda")  # a context on this thread for the driver's calls
    asked = json.loads(sys.stdin.readline())
    mapped = MappedExports(DeviceOpener(memops(), torch.device("cuda:0")), worker=0)
    mapped.introduce(asked["id"], bytes.fromhex(asked["handle"]), asked["size"])
    source = mapped.view(asked["id"], asked["read_at"], asked["numel"], torch.float32)
    target = mapped.view(asked["id"], asked["write_at"], asked["numel"], torch.float32)
    total = float(source.sum())
    target.copy_(source * 2)
    try:
        mapped.view(asked["id"], asked["size"] - 4, 2, torch.float32)
        past_end = "allowed"
    except Exception as exc:
        past_end = type(exc).__name__
    address = source.data_ptr() - asked["read_at"]
    mapped.close()
    after_close = float(source.sum())  # a view held past close: still mapped
    del source, target
    try:
        memops().allocation_of(address)
        after_views = "mapped"
    except Exception:
        after_views = "unmapped"
    print(json.dumps({"sum": total, "open": len(mapped), "past_end": past_end, "after_close": after_close,
                      "after_views": after_views}), flush=True)
""")

WORKER_WITH_EXPANDABLE_SEGMENTS = textwrap.dedent("""
    import torch
    from psframework.datapath.exports import WorkerExports
    from psframework.datapath.memops import memops
    memory = torch.ones(1 << 20, device="cuda")
    print("lane" if WorkerExports(memops()).locate(memory) is None else "exported", flush=True)
""")


def _python(code: str, stdin: str = "", **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_another_process_reads_and_writes_a_workers_tensors_where_they_lie_while_it_holds_views():
    n = 1 << 20
    memory = torch.arange(2 * n, dtype=torch.float32, device="cuda")
    exports = WorkerExports(memops())
    source, target = exports.locate(memory[:n]), exports.locate(memory[n:])
    assert source.export == target.export and target.offset - source.offset == 4 * n
    [(export_id, handle, size)] = exports.introductions(0, [source, target])
    torch.cuda.synchronize()
    answer = json.loads(_python(SERVER_SIDE, json.dumps({
        "id": export_id, "handle": handle.hex(), "size": size, "read_at": source.offset,
        "write_at": target.offset, "numel": n}) + "\n"))
    assert answer["sum"] == float(memory[:n].sum())
    assert answer["open"] == 0 and answer["past_end"] == "ConfigError"
    # a view that outlives close (a sync step's held push) keeps the mapping; the last one unmaps it
    assert answer["after_close"] == answer["sum"] and answer["after_views"] == "unmapped"
    assert torch.equal(memory[n:], memory[:n] * 2)


def test_an_allocation_freed_and_made_again_is_a_new_export():
    exports = WorkerExports(memops())
    first = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    old = exports.locate(first)
    if (old.offset, old.export.size) != (0, 64 << 20):
        pytest.skip("the allocator carved the tensor out of a segment it had: empty_cache cannot free it")
    exports.introductions(0, [old])
    del first
    torch.cuda.empty_cache()
    exports.sweep()
    assert exports.take_gone(0) == [old.export.id]
    again = exports.locate(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    assert again.export.buffer_id != old.export.buffer_id and again.export.id != old.export.id


def test_memory_of_expandable_segments_goes_through_the_lane():
    assert _python(WORKER_WITH_EXPANDABLE_SEGMENTS, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True") == "lane"
