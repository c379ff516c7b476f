"""The worker's bookkeeping of exported GPU allocations (``datapath/exports.py``), with a stand-in
for the driver over host tensors: which exports each server is told of, and which are gone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from psframework.datapath.exports import WorkerExports
from psframework.errors import ConfigError


class _Driver:
    """Allocations are host tensors registered here; a handle is the base address's bytes."""

    def __init__(self):
        self.allocations: dict[int, tuple[int, int]] = {}  # base -> (size, buffer id)
        self.unexportable: set[int] = set()
        self._next_buffer = 100

    def allocate(self, tensor: torch.Tensor) -> None:
        self._next_buffer += 1
        self.allocations[tensor.data_ptr()] = (tensor.numel() * tensor.element_size(), self._next_buffer)

    def allocation_of(self, address: int):
        for base, (size, buffer_id) in self.allocations.items():
            if base <= address < base + size:
                return base, size, buffer_id
        raise ConfigError("not an allocation")

    def ipc_handle(self, base: int) -> bytes:
        if base in self.unexportable:
            raise ConfigError("cuIpcGetMemHandle failed")
        return base.to_bytes(64, "little")


@pytest.fixture()
def driver():
    return _Driver()


def test_tensors_of_one_allocation_share_its_export_at_their_offsets(driver):
    memory = torch.zeros(1024)
    driver.allocate(memory)
    exports = WorkerExports(driver)
    first, second = exports.locate(memory[:100]), exports.locate(memory[256:512])
    assert first.export == second.export
    assert (first.offset, second.offset) == (0, 256 * 4)
    assert first.export.handle == memory.data_ptr().to_bytes(64, "little")


def test_each_server_is_told_of_an_export_once(driver):
    a, b = torch.zeros(64), torch.zeros(64)
    driver.allocate(a)
    driver.allocate(b)
    exports = WorkerExports(driver)
    located = [exports.locate(a), exports.locate(b), exports.locate(a[8:])]
    told = exports.introductions(0, located)
    assert sorted(export_id for export_id, _, _ in told) == sorted({item.export.id for item in located})
    assert all(size == 256 for _, _, size in told)
    assert exports.introductions(0, located) == []
    assert len(exports.introductions(1, located)) == 2  # another server hears of them itself
    exports.forget_server(0)  # restarted: knows nothing
    assert len(exports.introductions(0, located)) == 2


def test_an_allocation_made_again_at_the_same_address_is_a_new_export_and_the_old_one_is_gone(driver):
    memory = torch.zeros(64)
    driver.allocate(memory)
    exports = WorkerExports(driver)
    old = exports.locate(memory)
    exports.introductions(0, [old])
    driver.allocate(memory)  # freed and allocated again: another buffer id at the same base
    new = exports.locate(memory)
    assert new.export.id != old.export.id
    assert exports.take_gone(0) == [old.export.id]
    assert exports.take_gone(0) == []
    assert exports.take_gone(1) == []  # server 1 never knew it
    assert [export_id for export_id, _, _ in exports.introductions(0, [new])] == [new.export.id]


def test_an_allocation_the_driver_cannot_export_goes_through_the_lane_and_is_not_asked_again(driver):
    memory = torch.zeros(64)
    driver.allocate(memory)
    driver.unexportable.add(memory.data_ptr())
    exports = WorkerExports(driver)
    assert exports.locate(memory) is None
    driver.unexportable.clear()
    assert exports.locate(memory) is None  # refused once: not asked again for that allocation


def test_a_tensor_past_its_allocation_is_an_error(driver):
    memory = torch.zeros(64)
    driver.allocations[memory.data_ptr()] = (128, 1)  # the driver says the allocation is smaller
    with pytest.raises(ConfigError, match="runs past its allocation"):
        WorkerExports(driver).locate(memory)


def test_a_sweep_finds_allocations_freed_wherever_the_next_one_lands(driver):
    a, b = torch.zeros(64), torch.zeros(64)
    driver.allocate(a)
    driver.allocate(b)
    exports = WorkerExports(driver)
    located_a, located_b = exports.locate(a), exports.locate(b)
    exports.introductions(0, [located_a, located_b])
    exports.introductions(1, [located_a])
    del driver.allocations[a.data_ptr()]  # freed; nothing made again there
    exports.sweep()
    assert exports.take_gone(0) == [located_a.export.id]
    assert exports.take_gone(1) == [located_a.export.id]
    assert exports._gone == []  # every server that knew it heard
    exports.sweep()
    assert exports.take_gone(0) == []
    driver.allocate(a)  # made again: a new export, told anew
    assert exports.locate(a).export.id != located_a.export.id


def test_a_gone_export_no_server_knew_is_not_reported(driver):
    memory = torch.zeros(64)
    driver.allocate(memory)
    exports = WorkerExports(driver)
    exports.locate(memory)
    driver.allocate(memory)
    exports.locate(memory)
    assert exports.take_gone(0) == [] and exports._gone == []


def test_what_the_driver_cannot_place_goes_through_the_lane(driver):
    exports = WorkerExports(driver)
    assert exports.locate(torch.zeros(64)) is None  # not an allocation the driver knows
    assert exports.locate(torch.zeros(0)) is None


def test_shared_host_tensors_are_mapped_by_their_handle_and_written_where_they_lie():
    from psframework.datapath.exports import HostOpener, MappedExports, SharedHostMemory
    memory = SharedHostMemory()
    try:
        values = memory.empty(1000, torch.float32)
        values.copy_(torch.arange(1000, dtype=torch.float32))
        exports = WorkerExports(memory)
        located = exports.locate(values[100:200])
        assert located.offset == 400
        [(export_id, handle, size)] = exports.introductions(0, [located])
        assert size == 4000
        mapped = MappedExports(HostOpener(), worker=3)
        mapped.introduce(export_id, handle, size)
        view = mapped.view(export_id, located.offset, 100, torch.float32)
        assert torch.equal(view, torch.arange(100, 200, dtype=torch.float32))
        view.mul_(-1)  # the worker's tensor, not a copy
        assert values[150].item() == -150
        with pytest.raises(ConfigError, match="export .* has 4000 bytes"):
            mapped.view(export_id, 3996, 2, torch.float32)
        block = SimpleNamespace(segments=[SimpleNamespace(block_offset=0, numel=60),
                                          SimpleNamespace(block_offset=60, numel=40)])
        state = SimpleNamespace(block=block, split=lambda whole: {i: whole[s.block_offset:s.block_offset + s.numel]
                                                                  for i, s in enumerate(block.segments)})
        split = mapped.split(view, state)  # made once per view and block: a request must not split it again
        assert mapped.split(view, state) is split and split[1][0].item() == -160
        mapped.forget([export_id])
        assert mapped.split(view, state) is not split
        mapped.close()
        assert len(mapped) == 0
    finally:
        memory.close()


def test_host_tensors_not_made_shared_are_not_exported_and_a_wrong_token_is_refused():
    from psframework.datapath.exports import HostOpener, MappedExports, SharedHostMemory
    memory = SharedHostMemory()
    try:
        exports = WorkerExports(memory)
        assert exports.locate(torch.zeros(10)) is None  # ordinary memory: the lane instead
        shared = memory.empty(10, torch.float32)
        [(export_id, handle, size)] = exports.introductions(0, [exports.locate(shared)])
        forged = bytes(16) + handle[16:]
        with pytest.raises(ConfigError, match="worker 1's export .*another token"):
            MappedExports(HostOpener(), worker=1).introduce(export_id, forged, size)
        with pytest.raises(ConfigError, match="not a psframework process's file"):
            MappedExports(HostOpener(), worker=1).introduce(export_id, handle[:16] + b"/etc/passwd", size)
    finally:
        memory.close()
