"""Data paths: how a block's tensors travel between a worker and a server.

- the socket (``psframework/transport.py``): a typed header frame, then one raw frame per segment,
  sent zero-copy and received into place; works between any two hosts;
- the shared-memory lane (``lane.py``): an anonymous memory file that a worker and a server of one
  host both map, with a push and a pull slot per block; the socket carries only the header;
- the device lane (``cuda_ipc.py``): the same slots in a GPU worker's device memory, which a GPU
  server of its host maps by CUDA IPC;
- a sync server's shared values (``values.py``): its blocks in a memory file that the workers of
  its host map and copy from, under a per-block seqlock, instead of one answer per worker;
- codecs (``compression.py``): how a compressed push or pull is laid out in its frames.

The worker's end of the lanes is in ``psframework/worker/lanes.py`` (used by
``worker/exchange.py``), the server's in ``psframework/server/lanes.py`` and
``psframework/server/device.py``.
"""
