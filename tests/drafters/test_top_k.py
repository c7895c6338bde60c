"""The drafters' two-pass top-k (used on CUDA for rows over the draft vocabulary) against torch.topk."""
from __future__ import annotations

import pytest
import torch

from srt_entmtp.spec.drafters.base import top_k


@pytest.mark.parametrize("shape, k", [((12, 16384), 12), ((3, 5, 16384), 4), ((7, 49152), 10), ((2, 16385), 3)])
def test_two_pass_top_k_equals_one_pass(shape, k):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    v, i = top_k(x, k, two_pass=True)
    v0, i0 = x.topk(k, dim=-1)
    assert torch.equal(v, v0) and torch.equal(i, i0)  # distinct values: the same indices in the same order
    xb = x.bfloat16()  # bf16 has ties: the same values, each index pointing at its value
    v, i = top_k(xb, k, two_pass=True)
    assert torch.equal(v, xb.topk(k, dim=-1).values) and torch.equal(xb.gather(-1, i), v)
    assert all(len(set(row.tolist())) == k for row in i.reshape(-1, k))
