"""Run test bodies in threads, surfacing the first exception and failing on a hung thread."""

from __future__ import annotations

import threading
from typing import Callable


def run_in_threads(n: int, target: Callable[[int], object], timeout: float = 60.0) -> list:
    """``target(i)`` for i in 0..n-1, each in its own thread; returns the results in order."""
    results: list = [None] * n
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as exc:  # re-raised below, in the test's own thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return results
