"""Slurm's compact lists, expanded: host lists (``SLURM_JOB_NODELIST``) and task counts
(``SLURM_TASKS_PER_NODE``). Pure functions, written here because the maintained expanders are
LGPL (ClusterShell) or GPL (python-hostlist), which an Apache-2.0 package cannot depend on.

Example::

    >>> expand_hostlist("n[01-03,07],gpu4")
    ['n01', 'n02', 'n03', 'n07', 'gpu4']
    >>> expand_hostlist("rack[1-2]-n[8-9]")
    ['rack1-n8', 'rack1-n9', 'rack2-n8', 'rack2-n9']
    >>> expand_tasks_per_node("2(x3),1")
    [2, 2, 2, 1]

The rules are Slurm's (checked against ``scontrol show hostnames`` in the tests): items are
separated by commas or whitespace, empty items are skipped; each ``[...]`` holds numbers and
``low-high`` ranges, and several brackets in one name multiply (``a[1-2]b[3-4]``: four names);
a range keeps the zero padding of its low end (``[009-11]``: 009, 010, 011); nothing may follow
the last bracket.
"""

from __future__ import annotations

import itertools
import re

from ..errors import ConfigError

_NUMBER = re.compile(r"[0-9]+")
_TASKS = re.compile(r"([0-9]+)(?:\(x([0-9]+)\))?")
_MAX_NAMES = 1_000_000  # a typo like n[1-999999999] must fail, not fill the memory


def expand_hostlist(text: str) -> list[str]:
    """Every host name of a Slurm host list, in order, duplicates kept.

    ConfigError, naming the list and the bad part, for unbalanced brackets, a bad or reversed
    range, or text after the last bracket.
    """
    names: list[str] = []
    for item in _split_items(text):
        names.extend(_expand_item(item, text))
        if len(names) > _MAX_NAMES:
            raise ConfigError(f"host list {text!r} names more than {_MAX_NAMES} hosts; check its ranges")
    return names


def expand_tasks_per_node(text: str) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` as one count per node: ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts: list[int] = []
    for item in text.split(","):
        match = _TASKS.fullmatch(item.strip())
        if match is None:
            raise ConfigError(f"tasks per node {text!r}: cannot read {item.strip()!r}; "
                              "expected a count or COUNT(xREPEAT), e.g. 2(x3),1")
        count, repeat = int(match.group(1)), int(match.group(2) or 1)
        if repeat < 1:
            raise ConfigError(f"tasks per node {text!r}: repeat count in {item.strip()!r} must be at least 1")
        counts.extend([count] * repeat)
    return counts


def _split_items(text: str) -> list[str]:
    """Split at commas and whitespace outside brackets."""
    items, current, depth = [], [], 0
    for char in text:
        if char == "[":
            if depth:
                raise ConfigError(f"host list {text!r}: '[' inside brackets; brackets do not nest")
            depth = 1
        elif char == "]":
            if not depth:
                raise ConfigError(f"host list {text!r}: ']' without '['")
            depth = 0
        elif not depth and (char == "," or char.isspace()):
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise ConfigError(f"host list {text!r}: '[' without ']'")
    items.append("".join(current))
    return [item for item in items if item]


def _expand_item(item: str, text: str) -> list[str]:
    # re.split with a group: literal, bracket body, literal, bracket body, ..., literal
    parts = re.split(r"\[([^\]]*)\]", item)
    if len(parts) > 1 and parts[-1]:
        raise ConfigError(f"host list {text!r}: {item!r} has {parts[-1]!r} after its last bracket, "
                          "which Slurm does not accept")
    choices = [[part] if i % 2 == 0 else _expand_ranges(part, text) for i, part in enumerate(parts)]
    return ["".join(combo) for combo in itertools.product(*choices)]


def _expand_ranges(body: str, text: str) -> list[str]:
    numbers: list[str] = []
    for piece in body.split(","):
        low, dash, high = piece.partition("-")
        if not _NUMBER.fullmatch(low) or (dash and not _NUMBER.fullmatch(high)):
            raise ConfigError(f"host list {text!r}: bad range {piece!r} in [{body}]; "
                              "write numbers or LOW-HIGH, e.g. n[01-04,07]")
        first, last = int(low), int(high) if dash else int(low)
        if last < first:
            raise ConfigError(f"host list {text!r}: range {piece!r} goes backwards; write {high}-{low}")
        if last - first >= _MAX_NAMES:
            raise ConfigError(f"host list {text!r}: range {piece!r} names more than {_MAX_NAMES} hosts")
        numbers.extend(str(n).zfill(len(low)) for n in range(first, last + 1))
    return numbers


__all__ = ["expand_hostlist", "expand_tasks_per_node"]
