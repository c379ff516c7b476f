"""``host_copy``: one memcpy between contiguous CPU tensors of the same size in bytes, else an error."""

from __future__ import annotations

import pytest
import torch

from psframework.buffers import host_copy


def test_copies_bytes_between_dtypes_of_the_same_size():
    source = torch.arange(6, dtype=torch.float32)
    target = torch.zeros(6, dtype=torch.int32)
    host_copy(target, source)
    assert torch.equal(target.view(torch.float32), source)
    host_copy(torch.empty(0), torch.empty(0))  # nothing to copy, no error


@pytest.mark.parametrize("target,source", [
    (torch.zeros(5), torch.zeros(6)),  # sizes differ
    (torch.zeros(6), torch.zeros(6, dtype=torch.float64)),  # same elements, twice the bytes
    (torch.zeros(4, 2).t(), torch.zeros(8)),  # not contiguous
    (torch.zeros(8), torch.zeros(4, 2).t()),
    (torch.zeros(6, device="meta"), torch.zeros(6)),  # not in host memory
    (torch.zeros(6), torch.zeros(6, device="meta")),
], ids=["sizes", "bytes", "target-strided", "source-strided", "target-meta", "source-meta"])
def test_refuses_what_is_not_one_plain_copy(target, source):
    with pytest.raises(ValueError, match="host_copy needs"):
        host_copy(target, source)
