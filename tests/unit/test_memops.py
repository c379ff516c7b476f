"""The flags of device lanes without a GPU: their layout, how a flag's number is compared, and the
driver's absence. The flags themselves are exercised on the GPU machine (``tests/integration/test_cuda_ipc.py``)."""

from __future__ import annotations

import ctypes

import pytest

from psframework.datapath import memops as memops_module
from psframework.datapath.cuda_ipc import HEADER_BYTES, _reached, device_lane_base
from psframework.datapath.memops import MemOps, memops
from psframework.errors import ConfigError


@pytest.mark.parametrize("value, number, reached", [
    (0, 1, False),  # a fresh flag: nothing written yet
    (1, 1, True),
    (5, 3, True),  # a later number was written already
    (2, 3, False),
    (0, 0xFFFFFFFF, True),  # the number wrapped past 2**32 - 1: 0 comes after it
    (0xFFFFFFFF, 1, False),  # ... and 1 is still to come
    (0x7FFFFFFF, 0, True),
])
def test_a_flag_reaches_a_number_as_the_streams_wait_compares_them(value, number, reached):
    assert _reached(value, number) is reached


def test_the_flags_of_every_block_fit_between_the_header_and_the_slots():
    assert device_lane_base(0) == HEADER_BYTES
    assert device_lane_base(1) == HEADER_BYTES + 64
    assert device_lane_base(16) == HEADER_BYTES + 64
    assert device_lane_base(17) == HEADER_BYTES + 128
    assert all(device_lane_base(n) >= HEADER_BYTES + 4 * n and device_lane_base(n) % 64 == 0 for n in range(300))


def test_without_a_cuda_driver_there_are_no_flags(monkeypatch):
    """Where libcuda cannot be loaded (no GPU driver), ``memops()`` is None and workers wait for
    the servers' events instead."""
    def no_driver(name, *args, **kwargs):
        raise OSError(f"{name}: cannot open shared object file")

    memops.cache_clear()
    monkeypatch.setattr(memops_module.ctypes, "CDLL", no_driver)
    try:
        assert memops() is None
    finally:
        memops.cache_clear()


def test_a_failed_driver_call_names_the_call_the_error_and_the_way_out():
    class Driver:
        """Stands in for libcuda: every call fails with CUDA_ERROR_NOT_SUPPORTED (801)."""

        def __init__(self):
            for name in ("cuStreamWaitValue32_v2", "cuStreamWriteValue32_v2", "cuMemHostRegister_v2",
                         "cuMemHostUnregister", "cuMemHostGetDevicePointer_v2", "cuStreamCreate",
                         "cuStreamDestroy_v2"):
                setattr(self, name, _Call(801))

        @staticmethod
        def cuGetErrorString(result, text):
            ctypes.cast(text, ctypes.POINTER(ctypes.c_char_p))[0] = b"operation not supported"
            return 0

    ops = MemOps(Driver())
    with pytest.raises(ConfigError, match=r"cuStreamWaitValue32 failed: CUDA error 801 \(operation not supported\)"
                                          r".*PS_CUDA_IPC=0"):
        ops.wait(0, 0x1000, 1)
    with pytest.raises(ConfigError, match=r"cuStreamCreate failed: CUDA error 801"):
        ops.new_stream()


class _Call:
    def __init__(self, result: int):
        self.result, self.argtypes = result, None

    def __call__(self, *args):
        return self.result
