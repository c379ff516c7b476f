"""Small helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """Environment additions for child processes: this checkout first on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": str(ROOT) + (os.pathsep + path if path else "")}


def read_json_lines(path: Path) -> list[dict]:
    """The complete lines of a JSON-lines file another process may still be writing."""
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"({path.name}: no output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
