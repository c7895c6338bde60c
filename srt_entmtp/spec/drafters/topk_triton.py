"""Top-k of draft logits in two small Triton kernels (drafters/base.py: top_k uses it on CUDA).

A drafted step takes the top k (k <= 32) of a few rows over the 16k draft vocabulary once or
twice per tree level. torch's top-k, even split in two passes, is a gather-top-k and a bitonic
sort kernel per pass: ~18 us a call on the H200, ~0.1 ms of a batch-1 drafted step and ~0.16
ms at batch 8 (profile_gpu_step.py). Here:

  1. grid (row, chunk of CHUNK entries): the chunk's top k by k rounds of max-and-remove;
  2. grid (row,): the top k of the chunks' winners, largest first.

Values are compared as int32 keys that order like the floats (the sign-magnitude bits folded),
so an entry already taken (key INT_MIN) never ties with a real -inf and indices stay distinct
even in rows with fewer than k finite entries. Ties go to the smaller index.
"""
from __future__ import annotations

import functools

import torch

MAX_K = 32
CHUNK = 256


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def chunk_topk(x_ptr, key_ptr, idx_ptr, V, sx, G, K: tl.constexpr, KP: tl.constexpr, CHUNK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        x = tl.load(x_ptr + row * sx + offs, mask=offs < V, other=0.0).to(tl.float32)
        b = x.to(tl.int32, bitcast=True)  # float32 -> int32 keys in the same order (NaN aside)
        key = tl.where(offs < V, tl.where(b >= 0, b, b ^ 0x7FFFFFFF), -2147483648)
        slot = tl.arange(0, KP)
        keys = tl.full([KP], -2147483648, tl.int32)
        idxs = tl.zeros([KP], tl.int32)
        for i in tl.static_range(K):
            m, j = tl.max(key, 0, return_indices=True)
            keys = tl.where(slot == i, m, keys)
            idxs = tl.where(slot == i, c * CHUNK + j, idxs)
            key = tl.where(tl.arange(0, CHUNK) == j, -2147483648, key)
        out = (row * G + c) * KP + slot
        tl.store(key_ptr + out, keys)
        tl.store(idx_ptr + out, idxs)

    @triton.jit
    def merge_topk(key_ptr, idx_ptr, val_ptr, out_idx_ptr, GK, K: tl.constexpr, KP: tl.constexpr,
                   BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        key = tl.load(key_ptr + row * GK + offs, mask=offs < GK, other=-2147483648)
        idx = tl.load(idx_ptr + row * GK + offs, mask=offs < GK, other=0)
        slot = tl.arange(0, KP)
        keys = tl.full([KP], -2147483648, tl.int32)
        idxs = tl.zeros([KP], tl.int32)
        for i in tl.static_range(K):
            m, j = tl.max(key, 0, return_indices=True)
            keys = tl.where(slot == i, m, keys)
            idxs = tl.where(slot == i, tl.sum(tl.where(offs == j, idx, 0), 0), idxs)
            key = tl.where(offs == j, -2147483648, key)
        val = tl.where(keys >= 0, keys, keys ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        tl.store(val_ptr + row * K + slot, val.to(val_ptr.dtype.element_ty), mask=slot < K)
        tl.store(out_idx_ptr + row * K + slot, idxs.to(tl.int64), mask=slot < K)

    return triton, chunk_topk, merge_topk


def available() -> bool:
    return _kernels() is not None


def top_k(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row of x [..., V], largest first;
    k <= MAX_K. Values in x's dtype, indices int64, as torch.topk."""
    if not 0 < k <= MAX_K:
        raise ValueError(f"topk_triton.top_k takes 1 <= k <= {MAX_K}, got {k}")
    triton, chunk_k, merge_k = _kernels()
    V = x.shape[-1]
    rows = x.reshape(-1, V)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    R = rows.shape[0]
    KP = triton.next_power_of_2(k)
    G = triton.cdiv(V, CHUNK)
    keys = torch.empty(R, G, KP, dtype=torch.int32, device=x.device)
    idx1 = torch.empty(R, G, KP, dtype=torch.int32, device=x.device)
    vals = torch.empty(R, k, dtype=x.dtype, device=x.device)
    idx = torch.empty(R, k, dtype=torch.long, device=x.device)
    if R:
        chunk_k[(R, G)](rows, keys, idx1, V, rows.stride(0), G, K=k, KP=KP, CHUNK=CHUNK, num_warps=2)
        merge_k[(R,)](keys, idx1, vals, idx, G * KP, K=k, KP=KP, BLOCK=triton.next_power_of_2(G * KP), num_warps=4)
    return vals.view(*x.shape[:-1], k), idx.view(*x.shape[:-1], k)
