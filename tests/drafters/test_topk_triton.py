"""The drafters' Triton top-k (spec/drafters/topk_triton.py) against torch.topk. Without CUDA it
runs in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1) in float32; with CUDA,
compiled, in bfloat16 as the draft heads' logits are."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton runs these in its interpreter)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32


# a chunk and a half (V not a multiple of the chunk), the draft vocabulary's size, k from 1 to 32
@pytest.mark.parametrize("shape, k", [((1, 300), 1), ((3, 300), 7), ((2, 5, 1000), 15), ((4, 16384), 32)])
def test_top_k_matches_torch_topk(shape, k):
    from srt_entmtp.spec.drafters import topk_triton

    g = torch.Generator().manual_seed(k)
    x = torch.randn(*shape, generator=g).to(DEV, DT)
    val, idx = topk_triton.top_k(x, k)
    want_val, _ = x.float().topk(k, dim=-1)
    assert val.dtype == x.dtype and idx.dtype == torch.long and val.shape == (*shape[:-1], k)
    assert torch.equal(val.float().cpu(), want_val.cpu()), "values, largest first"
    assert torch.equal(x.gather(-1, idx).float().cpu(), val.float().cpu()), "each index points at its value"
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "indices distinct"


def test_top_k_keeps_indices_distinct_among_ties_and_minus_infinity():
    """A row with fewer finite entries than k (masked logits), and a row of equal values: the
    k indices are still distinct, ties go to the smaller index, -inf comes last."""
    from srt_entmtp.spec.drafters import topk_triton

    x = torch.full((2, 700), float("-inf"))
    x[0, [5, 300, 650]] = torch.tensor([1.0, 3.0, 2.0])
    x[1] = 0.5
    val, idx = topk_triton.top_k(x.to(DEV, DT), 6)
    assert idx[0, :3].tolist() == [300, 650, 5] and val[0, 3:].float().eq(float("-inf")).all()
    assert len(set(idx[0].tolist())) == 6
    assert idx[1].tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="k <= 32"):
        topk_triton.top_k(x, 33)
