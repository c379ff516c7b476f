"""Data paths: how a block's tensors travel between a worker and a server.

- the socket (``psframework/transport.py``): a typed header frame, then one raw frame per segment,
  sent zero-copy and received into place; works between any two hosts;
- the shared-memory lane (``lane.py``): an anonymous memory file that a worker and a server of one
  host both map, with a push and a pull slot per block; the socket carries only the header.

The worker's end of each path is in ``psframework/worker/paths.py``, the server's in
``psframework/server/lanes.py`` and ``psframework/server/device.py``.
"""
