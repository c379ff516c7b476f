"""Logging helpers shared by every role."""

from __future__ import annotations

import logging


class RateLimitedLog:
    """Logs the first few events of a kind, then one in a thousand, so that a flood (garbage from a
    stranger, refused handshakes) cannot fill a disk. ``count`` says how many there were."""

    def __init__(self, logger: logging.Logger, first: int = 20, every: int = 1000):
        self._logger, self._first, self._every = logger, first, every
        self.count = 0

    def warning(self, message: str, *args) -> None:
        self.count += 1
        if self.count <= self._first or self.count % self._every == 0:
            self._logger.warning(message + f" [{self.count} so far]", *args)


__all__ = ["RateLimitedLog"]
