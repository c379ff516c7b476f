"""The id -> slot index of embedding tables against a dict, with ids chosen to collide."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from psframework.server.rowindex import RowIndex

# small ids and a small index: many ids share a home bucket, so probe runs are long
ids_lists = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.integers(0, 64), unique=True,
                     max_size=200)


@settings(max_examples=60, deadline=None)
@given(present=ids_lists, absent=ids_lists, removed_share=st.floats(0, 1))
def test_lookups_find_what_was_inserted_and_nothing_else(present, absent, removed_share):
    absent = [i for i in absent if i not in set(present)]
    index = RowIndex(capacity=16)
    slots = torch.randperm(len(present)) if present else torch.empty(0, dtype=torch.int64)
    for start in range(0, len(present), 37):  # inserted in batches: the index grows on the way
        index.insert(torch.tensor(present[start:start + 37], dtype=torch.int64), slots[start:start + 37])
    want = dict(zip(present, slots.tolist()))
    removed = present[:int(len(present) * removed_share)]
    index.remove(torch.tensor(removed, dtype=torch.int64))
    for gone in removed:
        want.pop(gone)
    asked = present + absent
    got = index.lookup(torch.tensor(asked, dtype=torch.int64)).tolist() if asked else []
    assert got == [want.get(i, -1) for i in asked]
    assert index.size == len(want)
