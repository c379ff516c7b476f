"""The served model: two copies, one answering requests while the other is refreshed.

A refresh fills the copy that no batch uses (waiting for the batches still running on it, which
started before the last swap), then makes it the live one: a batch is always answered by one
whole version, never a mix. Weights come from an exported file (``FileWeights``, once) or from a
live job through a ``ps.Reader`` (``JobWeights``, whenever the job's version changes).
"""

from __future__ import annotations

import importlib
import logging
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..config import ServeConfig
from ..errors import ConfigError, PSError
from ..nn import tables_of
from .tables import JobRows, bind_file_rows, check_job_tables

log = logging.getLogger("psframework.serve")


def build_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """``MODULE:FACTORY`` as a callable that builds the module (checked once, here)."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} (of {spec!r}): {exc}; run ps-serve where it is importable "
                          "or put its folder on PYTHONPATH") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise ConfigError(f"{module_name} has no callable {name!r} (of {spec!r}); give MODULE:FACTORY, a function "
                          "that returns the torch.nn.Module to serve")
    return factory


class ServedModel:
    def __init__(self, factory: Callable[[], torch.nn.Module], device: str):
        self._copies = [self._built(factory, device), self._built(factory, device)]
        # entries the weights' source does not hold keep the factory's values: the same in both
        self._copies[1].load_state_dict(self._copies[0].state_dict())
        self._users = [0, 0]  # batches running on each copy
        self._live: Optional[int] = None
        self._version = -1
        self._changed = threading.Condition()

    @staticmethod
    def _built(factory, device: str) -> torch.nn.Module:
        module = factory()
        if not isinstance(module, torch.nn.Module):
            raise ConfigError(f"the factory returned a {type(module).__name__}, not a torch.nn.Module")
        return module.to(device).eval().requires_grad_(False)

    @property
    def module(self) -> torch.nn.Module:
        """A copy of the model (for its names, shapes and ``input_shape``), not for answering."""
        return self._copies[0]

    @property
    def version(self) -> int:
        """The live version; -1 before the first load."""
        return self._version

    @contextmanager
    def live(self) -> Iterator[tuple[torch.nn.Module, int]]:
        """The live copy and its version, kept from refreshes until the block ends."""
        with self._changed:
            if self._live is None:
                raise ConfigError("no weights are loaded yet")
            index, version = self._live, self._version
            self._users[index] += 1
        try:
            yield self._copies[index], version
        finally:
            with self._changed:
                self._users[index] -= 1
                self._changed.notify_all()

    def bind_tables(self, owner) -> None:
        """Both copies' embedding tables look their rows up through ``owner`` (``tables.py``)."""
        for copy in self._copies:
            for name, table in tables_of(copy).items():
                table.bind(owner, name)

    def load(self, fill: Callable[[torch.nn.Module], int]) -> int:
        """``fill`` the copy no batch uses (it returns the version it wrote), then make it live."""
        standby = 0 if self._live is None else 1 - self._live
        with self._changed:
            self._changed.wait_for(lambda: self._users[standby] == 0)
        with torch.no_grad():
            version = fill(self._copies[standby])
        with self._changed:
            self._live, self._version = standby, version
        return version


def file_weights(path: str) -> tuple[dict[str, torch.Tensor], int]:
    """The tensors of a file written by ``python -m psframework.export``, and its step."""
    from ..export import load

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--from-file {path}: no such file")
    tensors = load(path)
    step = 0
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            step = int((f.metadata() or {}).get("step") or 0)
    return tensors, step


def fill_from(tensors: dict[str, torch.Tensor], version: int, where: str) -> Callable[[torch.nn.Module], int]:
    """A ``fill`` that copies ``tensors`` into every entry of the module's state dict."""
    def fill(module: torch.nn.Module) -> int:
        state = module.state_dict()
        missing = [name for name in state if name not in tensors]
        if missing:
            raise ConfigError(f"{where} has no {', '.join(missing[:5])}{'...' if len(missing) > 5 else ''} of the "
                              f"model ({len(missing)} of its {len(state)} entries); it holds "
                              f"{', '.join(list(tensors)[:5])}...: is it the model this factory builds?")
        module.load_state_dict({name: tensors[name] for name in state}, strict=True)
        bind_file_rows(module, tensors, where)
        return version
    return fill


class JobWeights:
    """The weights of a live job: a reader, and a thread that refreshes the model when they change."""

    def __init__(self, config: ServeConfig, served: ServedModel, on_refresh: Callable[[int, float], None]):
        from ..reader import Reader

        self.config, self.served, self._on_refresh = config, served, on_refresh
        self.reader = Reader(scheduler=config.from_job, secret_file=config.secret_file, timeout=config.timeout)
        self._rows_reader = None  # the model's thread reads table rows through its own
        try:
            tables = check_job_tables(served.module, self.reader.shard_map.tables, config.from_job)
            names = {spec.name for spec in self.reader.shard_map.tensors}
            state = served.module.state_dict()
            self.names = [name for name in state if name in names]
            if not self.names and not tables:
                raise ConfigError(f"the job at {config.from_job} registered none of the model's entries "
                                  f"({', '.join(list(state)[:4])}...): is it the model this factory builds?")
            if tables:
                self._rows_reader = Reader(scheduler=config.from_job, secret_file=config.secret_file,
                                           timeout=config.timeout)
                served.bind_tables(JobRows(self._rows_reader))
                log.info("rows of tables %s are read from the job at each batch", ", ".join(tables))
        except BaseException:
            self.reader.close()
            raise
        unread = [name for name in state if name not in names]
        if unread:
            log.warning("the job does not hold %s; they keep the factory's values", ", ".join(unread[:8]))
        self._seen: Optional[dict[int, int]] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def refresh(self) -> bool:
        """Load the job's values if they changed since the last load; True if they did."""
        seen = self.reader.versions()
        if seen == self._seen:
            return False
        noticed = time.monotonic()
        version = self.served.load(self._read_into)
        self._seen = seen
        self._on_refresh(version, time.monotonic() - noticed)
        return True

    def _read_into(self, module: torch.nn.Module) -> int:
        state = module.state_dict()
        return self.reader.snapshot({name: state[name] for name in self.names})

    def start(self) -> None:
        thread = threading.Thread(target=self._run, name="ps-serve-refresh", daemon=True)
        thread.start()
        self._thread = thread  # only once started: close() joins it

    def _run(self) -> None:
        failing = False
        while not self._stop.wait(self.config.refresh_every):
            try:
                self.refresh()
                failing = False
            except PSError as exc:  # the job ended or is restarting: serve the last version meanwhile
                if not failing:
                    log.warning("cannot refresh from the job (serving version %d meanwhile): %s",
                                self.served.version, exc)
                failing = True

    def close(self) -> None:
        self._stop.set()
        if self._rows_reader is not None:  # the model's thread is done: the batcher stopped first
            self._rows_reader.close()
        if self._thread is not None:
            self._thread.join(timeout=self.config.timeout + 5)
            if self._thread.is_alive():  # still in a read: its sockets go with the process
                log.warning("the refresh thread is still reading; leaving its reader open")
                return
        self.reader.close()


__all__ = ["JobWeights", "ServedModel", "build_factory", "file_weights", "fill_from"]
