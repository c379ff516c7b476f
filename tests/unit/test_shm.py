"""Shared-memory lanes on their own: layout, the token check, reservations, cleanup."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, strategies as st

from psframework.errors import ConfigError
from psframework.datapath.lane import (HEADER_BYTES, SHM_DIR, Lane, lane_layout, lane_name, remove_stale_lane_files,
                                       shm_available)

needs_shm = pytest.mark.skipif(not shm_available(), reason="no memfd_create or /proc/PID/fd on this system")


@given(st.dictionaries(st.integers(0, 1000), st.integers(0, 1 << 20), max_size=30))
def test_layout_gives_every_block_its_own_aligned_slot(sizes):
    offsets, total = lane_layout(sizes.items())
    spans = sorted((offsets[b], offsets[b] + n) for b, n in sizes.items())
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    assert total >= sum(sizes.values()) and (not spans or spans[-1][1] <= total)


@needs_shm
def test_a_lane_is_seen_by_whoever_maps_it_with_its_token_and_has_no_name():
    blocks = [(0, 1000), (5, 4096)]
    before = set(SHM_DIR.glob("*")) if SHM_DIR.is_dir() else set()
    lane = Lane.create(lane_name(0, 1), blocks)
    try:
        assert (set(SHM_DIR.glob("*")) if SHM_DIR.is_dir() else set()) == before, "a lane never has a name"
        assert str(lane.path) == f"/proc/{os.getpid()}/fd/{lane.fd}"
        other = Lane.attach(str(lane.path), lane.token, blocks)
        lane.mapped()  # the creator's descriptor goes; the mappings keep the memory
        assert lane.fd is None
        lane.push_slot(5, 8, 16).view(torch.float32).copy_(torch.arange(4.0))
        assert torch.equal(other.push_slot(5, 8, 16).view(torch.float32), torch.arange(4.0))
        other.pull_slot(0, 0, 8).view(torch.float64).fill_(2.5)
        assert lane.pull_slot(0, 0, 8).view(torch.float64).item() == 2.5
        # the pull area does not overlap the push area
        assert lane.pull_slot(0, 0, 1).data_ptr() - lane.memory.data_ptr() >= HEADER_BYTES + 1000 + 4096
        other.close()
    finally:
        lane.close()


def test_stale_lane_files_of_dead_processes_are_removed(tmp_path, monkeypatch):
    import psframework.datapath.lane as lane_module

    monkeypatch.setattr(lane_module, "SHM_DIR", tmp_path)
    dead = tmp_path / "psf-999999999-w0-s1-abcd"  # no such pid
    alive = tmp_path / f"psf-{os.getpid()}-w0-s1-abcd"
    other = tmp_path / "not-a-lane"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    assert remove_stale_lane_files() == [dead]
    assert not dead.exists() and alive.exists() and other.exists()


@needs_shm
def test_a_lane_with_another_token_or_size_or_place_is_refused(tmp_path):
    lane = Lane.create(lane_name(0, 0), [(0, 128)])
    try:
        with pytest.raises(ConfigError, match="another token"):
            Lane.attach(str(lane.path), b"x" * 16, [(0, 128)])
        with pytest.raises(ConfigError, match="the shard map needs"):
            Lane.attach(str(lane.path), lane.token, [(0, 128), (1, 128)])
        stray = tmp_path / "psf-stray"
        stray.write_bytes(b"\0" * 8192)
        for elsewhere in (str(stray), "/etc/passwd", f"/proc/{os.getpid()}/fd/{lane.fd}/../../environ"):
            with pytest.raises(ConfigError, match="lane .* is not a psframework process"):
                Lane.attach(elsewhere, lane.token, [(0, 128)])
    finally:
        lane.close()


@needs_shm
def test_a_reserved_block_is_refused_until_released():
    lane = Lane.create(lane_name(3, 0), [(0, 64), (1, 64)])
    try:
        assert lane.reserve(0)
        assert not lane.reserve(0), "a second request must take the socket"
        assert lane.reserve(1)
        lane.release(0)
        assert lane.reserve(0)
    finally:
        lane.close()


@needs_shm
def test_a_full_shm_is_an_error_not_a_crash(monkeypatch):
    def full(fd, offset, length):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    name = lane_name(0, 0)
    with pytest.raises(OSError, match="No space"):
        Lane.create(name, [(0, 1 << 20)])
    # by what the descriptors point to, not their count: another thread of the test process (a
    # socket of an earlier test's node) may open one meanwhile, as it did once in CI
    open_files = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}")]
    assert not [path for path in open_files if name in path], "the descriptor of the failed lane is closed"


@needs_shm
def test_a_process_killed_between_creating_and_handing_over_a_lane_leaves_nothing():
    """The old named lane files stayed in /dev/shm when their creator died before unlinking them."""
    import signal
    import subprocess
    import sys

    before = set(SHM_DIR.glob("*")) if SHM_DIR.is_dir() else set()
    code = ("from psframework.datapath.lane import Lane, lane_name; import time; "
            "lane = Lane.create(lane_name(0, 0), [(0, 1 << 20)]); print(lane.path, flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().startswith("/proc/")
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        child.kill()
    assert (set(SHM_DIR.glob("*")) if SHM_DIR.is_dir() else set()) == before


def test_a_slots_views_are_made_once_for_the_same_slot_and_layout_and_again_for_others():
    lane = Lane.create(lane_name(5, 0), [(0, 64), (1, 64)])
    try:
        made = []

        def split(slot):
            made.append(slot)
            return {0: slot[:4], 1: slot[4:]}

        slot, layout = lane.piece(False, 0, 0, 64, torch.float32), object()
        first = lane.views(False, 0, (slot, layout), lambda: split(slot))
        assert lane.views(False, 0, (slot, layout), lambda: split(slot)) is first and len(made) == 1
        assert lane.views(False, 0, (slot, object()), lambda: split(slot)) is not first  # another layout
        other = lane.piece(False, 0, 0, 32, torch.float32)
        assert lane.views(False, 0, (other, layout), lambda: split(other))[0].numel() == 4 and len(made) == 3
    finally:
        lane.close()
