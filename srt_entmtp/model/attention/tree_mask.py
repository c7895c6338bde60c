"""FlashInfer's packed custom mask for fixed-shape tree verification, built on the device.

Every request brings S tree nodes over prefix_b cached keys plus its S nodes, so its mask is
S rows x (prefix_b + S) columns, row-major, bit-packed little-endian, each request starting on a
byte boundary (FlashInfer's `segment_packbits` layout). Prefix columns are all visible; the
last S columns are the request's [S, S] tree mask. Built inside the CUDA graph from the device
prefix lengths and tree masks, so a step's plan never touches the mask on the host (planning a
tree mask through FlashInfer's own path packs it on the device and then waits for the GPU,
which was ~1 ms of every verify step on the H200).
"""
from __future__ import annotations

import numpy as np
import torch


def mask_byte_offsets(kv_lens: np.ndarray, rows: int, out: np.ndarray) -> None:
    """Write into out ([B+1] int32) the byte offsets of each request's packed mask of `rows` x
    kv_len bits, each request starting on a byte boundary."""
    out[0] = 0
    np.cumsum((rows * kv_lens + 7) // 8, out=out[1:])


def mask_byte_indptr(prefix_lens: list[int], S: int) -> torch.Tensor:
    """[B+1] int32 byte offsets of each request's packed mask (host)."""
    out = np.zeros(len(prefix_lens) + 1, dtype=np.int32)
    mask_byte_offsets(np.asarray(prefix_lens, dtype=np.int32) + S, S, out)
    return torch.from_numpy(out)


def pack_tree_mask_torch(out: torch.Tensor, byte_indptr: torch.Tensor, prefix: torch.Tensor,
                         tree: torch.Tensor) -> None:
    """Reference (and CPU) form: fill out[:byte_indptr[-1]] (uint8). tree [B, S, S] bool."""
    S = tree.shape[1]
    dev = out.device
    ind = byte_indptr.to(dev, torch.long)
    total = int(ind[-1])
    byte = torch.arange(total, device=dev)
    req = torch.searchsorted(ind[1:], byte, right=True)
    bit = (byte - ind[req]).unsqueeze(1) * 8 + torch.arange(8, device=dev)  # [total, 8]
    pre = prefix.to(dev, torch.long)[req].unsqueeze(1)
    kv = pre + S
    row, col = bit // kv, bit % kv
    rel = col - pre
    inside = row < S
    t = tree[req.unsqueeze(1), row.clamp(max=S - 1), rel.clamp(min=0)]
    val = inside & ((rel < 0) | t)
    weights = (1 << torch.arange(8, device=dev)).to(torch.long)
    out[:total] = (val.long() * weights).sum(1).to(torch.uint8)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _pack_kernel(out_ptr, indptr_ptr, prefix_ptr, tree_ptr, B, S: tl.constexpr, BPAD: tl.constexpr,
                     BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)          # byte ids
        b = tl.arange(0, BPAD)
        ends = tl.load(indptr_ptr + 1 + b, mask=b < B, other=2147483647)
        req = tl.sum((ends[None, :] <= offs[:, None]).to(tl.int32), axis=1)
        live = req < B
        reqc = tl.where(live, req, 0)
        start = tl.load(indptr_ptr + reqc, mask=live, other=0)
        pre = tl.load(prefix_ptr + reqc, mask=live, other=0).to(tl.int32)
        kv = pre + S
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for j in tl.static_range(8):
            bit = (offs - start) * 8 + j
            row = bit // kv
            col = bit % kv
            rel = col - pre
            inside = live & (row < S)
            t = tl.load(tree_ptr + reqc * S * S + row * S + rel, mask=inside & (rel >= 0), other=0)
            val = inside & ((rel < 0) | (t != 0))
            acc = acc | (val.to(tl.int32) << j)
        tl.store(out_ptr + offs, acc.to(tl.uint8), mask=live)

    HAVE_TRITON = True
except ImportError:  # CPU builds without Triton use the torch form
    HAVE_TRITON = False


def pack_tree_mask(out: torch.Tensor, byte_indptr: torch.Tensor, prefix: torch.Tensor, tree: torch.Tensor,
                   capacity_bytes: int) -> None:
    """Fill `out` (uint8, device) with the packed masks; CUDA-graph safe on CUDA (a fixed grid
    over `capacity_bytes`, bytes past byte_indptr[-1] untouched). byte_indptr and prefix live on
    the device there (int32 / int64), tree is [B, S, S] bool."""
    if out.is_cuda and HAVE_TRITON:
        B, S = tree.shape[0], tree.shape[1]
        BLOCK = 256
        bpad = max(triton.next_power_of_2(B), 2)
        _pack_kernel[(triton.cdiv(capacity_bytes, BLOCK),)](out, byte_indptr, prefix, tree.to(torch.uint8), B, S,
                                                             bpad, BLOCK)
    else:
        pack_tree_mask_torch(out, byte_indptr, prefix, tree)
