"""Shared values (``datapath/values.py``): a process that rewrites blocks as fast as it can, and
other processes that read them at the same time, through the real shared memory of two processes.
Every read through the sequence numbers holds one version; a read without them tears (the control
that shows the test can see a torn block)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from psframework.datapath.lane import shm_available
from psframework.datapath.values import SharedValues
from psframework.errors import PSError

pytestmark = pytest.mark.skipif(not shm_available(), reason="no memfd_create or /proc/PID/fd on this system")

BLOCKS = [(0, 2 << 20), (1, 256 << 10), (5, 4096)]  # (block id, bytes)

# the writer: versions 1, 2, ... of every block, each element of a block set to its version, with
# pauses between versions about as long as the writes (a server between two steps)
WRITER = """
import sys, time, torch
from psframework.datapath.values import SharedValues
blocks = {blocks!r}
values = SharedValues.create("psf-test-values", blocks)
print(values.path, values.token.hex(), flush=True)
views = {{b: values.slot(b, 0, n).view(torch.float32) for b, n in blocks}}
version, stop = 0, time.monotonic() + {seconds}
while time.monotonic() < stop:
    version += 1
    for b, view in views.items():
        with values.writing([b]):
            view.fill_(float(version))
    time.sleep(0.0002)
print("wrote", version, flush=True)
"""


def _start_writer(seconds: float) -> tuple[subprocess.Popen, str, bytes]:
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(blocks=BLOCKS, seconds=seconds)],
                              stdout=subprocess.PIPE, text=True)
    path, token = writer.stdout.readline().split()
    return writer, path, bytes.fromhex(token)


def _versions(block: torch.Tensor) -> set[float]:
    return {float(block.min()), float(block.max())}


def test_reads_while_a_process_rewrites_the_blocks_each_hold_one_version():
    writer, path, token = _start_writer(seconds=12.0)
    try:
        values = SharedValues.attach(path, token, BLOCKS)
        torn_without, reads, seen = 0, 0, set()
        stop = time.monotonic() + 10
        # until enough reads of many versions, and the control tore at least once (a loaded machine
        # may take a while to interleave them)
        while time.monotonic() < stop and not (reads > 100 and len(seen) > 10 and torn_without):
            for block_id, nbytes in BLOCKS:
                source = values.slot(block_id, 0, nbytes).view(torch.float32)
                target = torch.empty_like(source)
                values.read(block_id, lambda: target.copy_(source))
                got = _versions(target)
                assert len(got) == 1, f"block {block_id} read torn: versions {sorted(got)[:5]}"
                seen |= got
                reads += 1
                target.copy_(source)  # the control: the same copy without the sequence numbers
                torn_without += len(_versions(target)) > 1
        assert reads > 100 and len(seen) > 10, (reads, len(seen))
        assert torn_without > 0, "the copies without sequence numbers never tore: the test cannot see a tear"
        values.close()
    finally:
        writer.kill()
        writer.wait()


def test_a_block_that_never_holds_still_is_an_error_not_a_hang():
    values = SharedValues.create("psf-test-values", BLOCKS)
    try:
        with values.writing([1]):  # a writer that died in the middle of an update
            started = time.monotonic()
            with pytest.raises(PSError, match="block 1 kept changing"):
                values.read(1, lambda: None, deadline=0.3)
            assert time.monotonic() - started < 2
        values.read(1, lambda: None, deadline=0.3)  # and once it is done, reads go through
    finally:
        values.close()


def test_a_file_with_another_token_or_size_is_refused():
    values = SharedValues.create("psf-test-values", BLOCKS)
    try:
        with pytest.raises(Exception, match="another token"):
            SharedValues.attach(str(values.path), b"x" * 16, BLOCKS)
        with pytest.raises(Exception, match="the shard map needs"):
            SharedValues.attach(str(values.path), values.token, BLOCKS[:2])
        with pytest.raises(Exception, match="not a psframework process"):
            SharedValues.attach("/etc/passwd", values.token, BLOCKS)
    finally:
        values.close()
