"""Running a Starlette app under uvicorn on a socket bound first (port 0 picks a free port, and the
caller learns it before the first request can come)."""

from __future__ import annotations

import socket
from typing import Callable

from ..errors import ConfigError


def bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # inherited by every accepted connection (Linux): a response's body never waits behind its
    # headers for the client's delayed ACK
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; pick another --port "
                          "(0: any free port)") from None
    sock.listen(1024)
    return sock


def run(app, sock: socket.socket, on_listening: Callable[[int], None]) -> None:
    """Serve ``app`` on ``sock`` until SIGINT or SIGTERM (uvicorn's own handlers end it cleanly)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    on_listening(sock.getsockname()[1])
    server.run(sockets=[sock])


class BadRequest(Exception):
    """A request we refuse: its HTTP status, and a message that says what was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


async def read_body(request, max_bytes: int) -> bytes:
    """The body of a starlette ``request``, refused with a 413 as soon as it is over ``max_bytes``:
    by its Content-Length before anything is read, and for a chunked body without one at the chunk
    that goes over (``request.body()`` would first hold all of it in memory)."""
    declared = int(request.headers.get("content-length") or 0)
    if declared > max_bytes:
        raise BadRequest(413, f"a body of {declared} bytes; at most {max_bytes} (--max-body-bytes)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise BadRequest(413, f"a body of more than {max_bytes} bytes; at most {max_bytes} (--max-body-bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


__all__ = ["BadRequest", "bind", "read_body", "run"]
