"""Stream memory operations of the CUDA driver: a stream waits for a 32-bit value in memory, or writes one.

An interprocess event orders work between two processes only if one of them waits for it on the
host, or queues a wait for it on a stream; a stream that waits for the event of a process killed
with work in flight waits for ever (``benchmarks/ipc_event_death.py``). A *flag* does what neither
does: the other process's stream writes a sequence number into it when its work is done
(``write``), our stream waits for that number (``wait``) without our host waiting, and if the
other process dies first, we write the number ourselves and the wait ends. A device lane's flags
are in the worker's GPU memory (``cuda_ipc.DeviceLane``); ``register`` maps pinned host memory
for the device too, where flags there suit better (``benchmarks/ipc_floor.py`` has both sides'
flags in shared host memory, released by an ordinary store). The driver's version-2 calls are
available on every platform (CUDA 11.7 on).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional

from ..errors import ConfigError

WAIT_GEQ = 0x0  # CU_STREAM_WAIT_VALUE_GEQ: (int32)(*addr - value) >= 0, so sequence numbers may wrap
WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: after the stream's earlier work, with a memory barrier
HOST_REGISTER_PORTABLE_DEVICEMAP = 0x1 | 0x2  # CU_MEMHOSTREGISTER_PORTABLE | CU_MEMHOSTREGISTER_DEVICEMAP
STREAM_NON_BLOCKING = 0x1  # CU_STREAM_NON_BLOCKING
POINTER_BUFFER_ID = 7  # CU_POINTER_ATTRIBUTE_BUFFER_ID: unique to an allocation within the process
IPC_LAZY_ENABLE_PEER_ACCESS = 0x1  # CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS
IPC_HANDLE_BYTES = 64  # CU_IPC_HANDLE_SIZE


class IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * IPC_HANDLE_BYTES)]


class MemOps:
    """The driver's entry points, loaded once per process (``memops()``)."""

    def __init__(self, lib: ctypes.CDLL):
        self._lib = lib
        self._wait = _entry(lib, "cuStreamWaitValue32_v2", "cuStreamWaitValue32")
        self._write = _entry(lib, "cuStreamWriteValue32_v2", "cuStreamWriteValue32")
        for call in (self._wait, self._write):
            call.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
        lib.cuMemHostRegister_v2.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
        lib.cuMemHostUnregister.argtypes = [ctypes.c_void_p]
        lib.cuMemHostGetDevicePointer_v2.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p,
                                                     ctypes.c_uint]
        lib.cuStreamCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuStreamDestroy_v2.argtypes = [ctypes.c_void_p]
        self._ipc = _ipc_entries(lib)  # apart: a driver without them still has the flags


    def new_stream(self) -> int:
        """A stream of the calling thread's current context that no one else has (torch hands out
        its streams from a pool in turn: one of them may be the stream a wait is queued on); its
        raw handle, for ``torch.cuda.ExternalStream``. Not ordered with the legacy default stream."""
        handle = ctypes.c_void_p()
        self._check(self._lib.cuStreamCreate(ctypes.byref(handle), STREAM_NON_BLOCKING), "cuStreamCreate")
        return handle.value

    def destroy_stream(self, handle: int) -> None:
        self._check(self._lib.cuStreamDestroy_v2(handle), "cuStreamDestroy")

    def register(self, address: int, nbytes: int) -> int:
        """Pin ``nbytes`` of host memory at ``address`` for every context of the process, mapped
        into the device's address space; its device address. The calling thread must have a
        current CUDA context (torch makes one at its first CUDA call on the thread)."""
        self._check(self._lib.cuMemHostRegister_v2(address, nbytes, HOST_REGISTER_PORTABLE_DEVICEMAP),
                    "cuMemHostRegister")
        device_address = ctypes.c_uint64()
        self._check(self._lib.cuMemHostGetDevicePointer_v2(ctypes.byref(device_address), address, 0),
                    "cuMemHostGetDevicePointer")
        return device_address.value

    def unregister(self, address: int) -> None:
        self._check(self._lib.cuMemHostUnregister(address), "cuMemHostUnregister")

    def wait(self, stream: int, device_address: int, value: int) -> None:
        """Queue on ``stream`` (a raw handle, ``torch.cuda.Stream.cuda_stream``) a wait until the
        flag at ``device_address`` reaches ``value``."""
        self._check(self._wait(stream, device_address, value & 0xFFFFFFFF, WAIT_GEQ), "cuStreamWaitValue32")

    def write(self, stream: int, device_address: int, value: int) -> None:
        """Queue on ``stream`` the write of ``value`` into the flag at ``device_address``, after
        the stream's earlier work."""
        self._check(self._write(stream, device_address, value & 0xFFFFFFFF, WRITE_DEFAULT), "cuStreamWriteValue32")

    def allocation_of(self, device_address: int) -> tuple[int, int, int]:
        """The allocation (one ``cudaMalloc``) that ``device_address`` lies in: its base address,
        its size in bytes, and its buffer id, which no other allocation of this process has had
        (one freed and made again at the same address has another)."""
        ipc = self._ipc_calls()
        base, size = ctypes.c_uint64(), ctypes.c_size_t()
        self._check(ipc["range"](ctypes.byref(base), ctypes.byref(size), device_address), "cuMemGetAddressRange")
        buffer_id = ctypes.c_uint64()
        self._check(ipc["attribute"](ctypes.byref(buffer_id), POINTER_BUFFER_ID, device_address),
                    "cuPointerGetAttribute(BUFFER_ID)")
        return base.value, size.value, buffer_id.value

    def ipc_handle(self, base: int) -> bytes:
        """The interprocess handle of the allocation at ``base``; ``ConfigError`` where the driver
        cannot export it (memory of ``cuMemCreate``, as torch's ``expandable_segments`` makes)."""
        handle = IpcMemHandle()
        self._check(self._ipc_calls()["get"](ctypes.byref(handle), base), "cuIpcGetMemHandle")
        return bytes(handle)  # the struct's raw bytes

    def open_handle(self, handle: bytes) -> int:
        """Map another process's allocation into ours (on the calling thread's current device);
        its address here. Not for an allocation of this process."""
        if len(handle) != IPC_HANDLE_BYTES:
            raise ConfigError(f"an interprocess memory handle has {IPC_HANDLE_BYTES} bytes, not {len(handle)}")
        address = ctypes.c_uint64()
        self._check(self._ipc_calls()["open"](ctypes.byref(address), IpcMemHandle.from_buffer_copy(handle),
                                              IPC_LAZY_ENABLE_PEER_ACCESS), "cuIpcOpenMemHandle")
        return address.value

    def close_handle(self, address: int) -> None:
        """Unmap what ``open_handle`` mapped at ``address`` (no work of ours may still touch it)."""
        self._check(self._ipc_calls()["close"](address), "cuIpcCloseMemHandle")

    def _ipc_calls(self) -> dict:
        if self._ipc is None:
            raise ConfigError("this CUDA driver cannot export or map allocations (no cuIpc* calls)")
        return self._ipc

    def _check(self, result: int, call: str) -> None:
        if result:
            text = ctypes.c_char_p()
            self._lib.cuGetErrorString(result, ctypes.byref(text))
            raise ConfigError(f"{call} failed: CUDA error {result} "
                              f"({(text.value or b'unknown').decode()}); set PS_CUDA_IPC=0 to do without")


def _ipc_entries(lib: ctypes.CDLL) -> Optional[dict]:
    """The driver's calls for exporting and mapping allocations (``exports.py``); None if it lacks one."""
    try:
        entries = {"range": lib.cuMemGetAddressRange_v2, "attribute": lib.cuPointerGetAttribute,
                   "get": lib.cuIpcGetMemHandle, "open": _entry(lib, "cuIpcOpenMemHandle_v2", "cuIpcOpenMemHandle"),
                   "close": lib.cuIpcCloseMemHandle}
    except (AttributeError, ConfigError):
        return None
    entries["range"].argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
    entries["attribute"].argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64]
    entries["get"].argtypes = [ctypes.POINTER(IpcMemHandle), ctypes.c_uint64]
    entries["open"].argtypes = [ctypes.POINTER(ctypes.c_uint64), IpcMemHandle, ctypes.c_uint]
    entries["close"].argtypes = [ctypes.c_uint64]
    return entries


def _entry(lib: ctypes.CDLL, *names: str):
    for name in names:
        call = getattr(lib, name, None)
        if call is not None:
            return call
    raise ConfigError(f"the CUDA driver has none of {names}")


@functools.lru_cache(maxsize=None)
def memops() -> Optional[MemOps]:
    """The driver's stream memory operations, or None where there is no CUDA driver."""
    try:
        return MemOps(ctypes.CDLL("libcuda.so.1"))
    except (OSError, ConfigError, AttributeError):
        return None


__all__ = ["IPC_HANDLE_BYTES", "MemOps", "memops"]
