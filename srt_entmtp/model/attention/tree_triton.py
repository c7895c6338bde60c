"""Tree attention for the fixed-shape verify step: one Triton kernel, no mask in memory.

Every request verifies S tree nodes (S <= 64) over its cached prefix keys plus its own S keys,
which the step just wrote. Node i sees the whole prefix and the tree key j iff bit j of
anc[b, i] is set (ancestor-or-self), so the mask is one int64 per query row instead of a
packed bit per (query, key) pair. A verify graph may also hide one range of a request's keys
(`TreeAttention.skip`): a step launched before the one before it is read lays out all of
that step's tree after the prefix, and only the device knows which of those slots were rejected.

Why not FlashInfer here: its custom-mask prefill costs 14-23 us a layer at batch 1 (8-33
nodes over 256-1,024 keys) on the H200, and ~8 us of that is the kernel's fixed cost: its
tree part alone over 33 keys is 9-11 us, so a cascade (mask-free prefix + masked tree +
merge) gains nothing below batch 64 (scripts/bench_tree_attention.py,
benchmarks/results/tree_attention_h200_2026-12-01.json). FlashInfer stays the backend of
every other forward, and of this one without Triton or for trees over 64 slots.

Grid: (request, KV head x row tile, KV split). A program's rows are its KV head's query heads
for every node (GQA packing: S x H/KH rows), and its keys one contiguous share of the request's
KV; with more than one split, each writes a partial output and log-sum-exp and a second
kernel merges them (flash-decoding). The split count is fixed per captured shape, chosen so a
small batch still fills the GPU; the key range per split follows the live lengths. Only the
node count, the row tile and whether keys are split are compile-time constants, so a library's
shapes compile a handful of kernels (cached by Triton across starts).
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from srt_entmtp.model import pdl
from srt_entmtp.model.attention.base import AttentionBackend

MAX_NODES = 64          # one int64 of ancestor bits per node
BLOCK_N = 64
TARGET_PROGRAMS = 256   # split the keys until a step has about this many programs, in at most MAX_SPLITS
MAX_SPLITS = 8          # (H200, 256-1,024 keys: 8 splits beat 16 by 0.1-1.3 us at batch 1 and 8)
# True: the split that finishes last merges the partials (tickets), with no merge kernel. Off: on the
# H200 with PDL it was slower, 0.722 vs 0.644 ms a batch-1 decode graph (the merge kernel's launch
# overlaps the splits; the last split's merge does not; docs/gpu.md). A/B switch, read at capture.
MERGE_LAST = False
MERGE_PROGRAMS = 256    # the merge kernel's row block is sized for about this many programs (merge_rows)
MERGE_MIN_ROWS = 4


@functools.cache
def _kernels():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def tree_attn_kernel(q_ptr, k_ptr, v_ptr, kv_indptr_ptr, kv_indices_ptr, anc_ptr, skip_ptr, out_ptr, part_o_ptr,
                         part_lse_ptr, ticket_ptr, scale_log2, N, B, nsplit, S: tl.constexpr, H: tl.constexpr,
                         KH: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         SPLIT: tl.constexpr, SKIP: tl.constexpr, MERGE_LAST: tl.constexpr, PDL: tl.constexpr):
        G: tl.constexpr = H // KH
        MT: tl.constexpr = (S * G + BLOCK_M - 1) // BLOCK_M
        if PDL:  # everything below may read the kernel before's writes (model/pdl.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        b = tl.program_id(0)
        kh = tl.program_id(1) // MT
        split = tl.program_id(2)
        m = (tl.program_id(1) % MT) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = m < S * G
        node = tl.where(row_ok, m // G, 0)
        head = kh * G + m % G
        tok = b * S + node
        d = tl.arange(0, D)
        q = tl.load(q_ptr + (tok * H + head)[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0)
        anc = tl.load(anc_ptr + b * S + node, mask=row_ok, other=0)
        kv0 = tl.load(kv_indptr_ptr + b)
        kv_len = tl.load(kv_indptr_ptr + b + 1) - kv0
        prefix = kv_len - S
        if SKIP:  # keys [skip_lo, skip_hi) of the request's range are hidden (a rejected tail, see TreeAttention)
            skip_lo = tl.load(skip_ptr + b)
            skip_hi = tl.load(skip_ptr + B + b)
        chunk = tl.cdiv(tl.cdiv(kv_len, nsplit), BLOCK_N) * BLOCK_N
        lo = split * chunk
        hi = tl.minimum(lo + chunk, kv_len)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start in range(lo, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N)
            live = j < hi
            slot = tl.load(kv_indices_ptr + kv0 + j, mask=live, other=0).to(tl.int64)
            off = (slot * KH + kh)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + off, mask=live[:, None], other=0.0)
            v = tl.load(v_ptr + off, mask=live[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k)) * scale_log2
            t = j - prefix  # column among the tree's keys; < 0 for prefix keys
            bit = (anc[:, None] >> tl.maximum(t, 0).to(tl.int64)[None, :]) & 1
            vis = live[None, :] & ((t[None, :] < 0) | (bit != 0))
            if SKIP:
                vis = vis & ((j < skip_lo) | (j >= skip_hi))[None, :]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        o = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        row = tok * H + head
        if not SPLIT:
            tl.store(out_ptr + row[:, None] * D + d[None, :], o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
        else:
            part = split * N * H + row
            tl.store(part_o_ptr + part[:, None] * D + d[None, :], o, mask=row_ok[:, None])
            tl.store(part_lse_ptr + part, m_i + tl.log2(tl.where(l_i == 0.0, 1.0, l_i)), mask=row_ok)
            if MERGE_LAST:  # the split that finishes last merges its rows' partials (no merge kernel)
                tl.debug_barrier()  # the whole program's partials are written before its ticket is taken
                at = ticket_ptr + b * KH * MT + tl.program_id(1)
                if tl.atomic_add(at, 1, sem="acq_rel", scope="gpu") == nsplit - 1:
                    mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
                    for sp in range(nsplit):  # .cg: from L2, where the other programs' writes are
                        mx = tl.maximum(mx, tl.load(part_lse_ptr + sp * N * H + row, mask=row_ok,
                                                    other=float("-inf"), cache_modifier=".cg"))
                    mx = tl.where(mx == float("-inf"), 0.0, mx)
                    den = tl.zeros([BLOCK_M], tl.float32)
                    acc = tl.zeros([BLOCK_M, D], tl.float32)
                    for sp in range(nsplit):  # the merge kernel's sums, in its order
                        part = sp * N * H + row
                        w = tl.exp2(tl.load(part_lse_ptr + part, mask=row_ok, other=float("-inf"),
                                            cache_modifier=".cg") - mx)
                        den += w
                        acc += w[:, None] * tl.load(part_o_ptr + part[:, None] * D + d[None, :], mask=row_ok[:, None],
                                                    other=0.0, cache_modifier=".cg")
                    tl.store(out_ptr + row[:, None] * D + d[None, :], (acc / den[:, None]).to(out_ptr.dtype.element_ty),
                             mask=row_ok[:, None])
                    tl.store(at, 0)  # the next launch starts counting afresh

    @triton.jit
    def merge_kernel(part_o_ptr, part_lse_ptr, out_ptr, R, D: tl.constexpr, NSPLIT: tl.constexpr,
                     BLOCK_R: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        ok = r < R
        d = tl.arange(0, D)
        mx = tl.full([BLOCK_R], float("-inf"), tl.float32)
        for s in tl.static_range(NSPLIT):
            mx = tl.maximum(mx, tl.load(part_lse_ptr + s * R + r, mask=ok, other=float("-inf")))
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        den = tl.zeros([BLOCK_R], tl.float32)
        acc = tl.zeros([BLOCK_R, D], tl.float32)
        for s in tl.static_range(NSPLIT):
            w = tl.exp2(tl.load(part_lse_ptr + s * R + r, mask=ok, other=float("-inf")) - mx)
            den += w
            acc += w[:, None] * tl.load(part_o_ptr + (s * R + r)[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
        tl.store(out_ptr + r[:, None] * D + d[None, :], (acc / den[:, None]).to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])

    return triton, tree_attn_kernel, merge_kernel


def available() -> bool:
    return _kernels() is not None


def ancestor_bits(mask: torch.Tensor) -> torch.Tensor:
    """[..., S, S] bool ancestor-or-self masks -> [..., S] int64, bit j of row i = mask[i, j]."""
    S = mask.shape[-1]
    if S > MAX_NODES:
        raise ValueError(f"tree attention takes at most {MAX_NODES} nodes, got {S}")
    # distinct bits: the sum is their OR (bit 63 wraps to the sign bit, as intended)
    return (mask.to(torch.long) << torch.arange(S, device=mask.device)).sum(-1)


def num_splits(batch: int, nodes: int, num_heads: int, num_kv_heads: int, block_m: int) -> int:
    tiles = math.ceil(nodes * (num_heads // num_kv_heads) / block_m)
    return max(1, min(MAX_SPLITS, TARGET_PROGRAMS // (batch * num_kv_heads * tiles)))


def merge_rows(rows: int) -> int:
    """Rows per merge program: enough programs to spread the partials' reads over the GPU. A
    program reads nsplit x D floats a row; with 64 rows a program (as before), a verify of 120
    tokens x 9 heads was 17 programs reading 131 KB each, latency-bound on a few SMs."""
    return max(MERGE_MIN_ROWS, min(64, 1 << max(0, (rows // MERGE_PROGRAMS) - 1).bit_length()))


def tree_attention(q, k_cache, v_cache, kv_indptr, kv_indices, anc, out, part_o, part_lse, scale: float,
                   nodes: int, nsplit: int, block_m: int, skip: torch.Tensor | None = None,
                   tickets: torch.Tensor | None = None) -> torch.Tensor:
    """out[N, H, D] = attention of q[N, H, D] (B requests x `nodes` tokens) over each request's
    kv_indices[kv_indptr[b]:kv_indptr[b+1]] (prefix, then its `nodes` tree keys) under the
    ancestor bits anc[B, nodes]; skip [2, B] int32 (optional): request b's keys
    [skip[0, b], skip[1, b]) of its range are hidden. part_o / part_lse: [nsplit, N, H, (D)]
    float32 scratch. tickets (optional, with nsplit > 1): int32 zeros, one per (request, KV head,
    row tile), which the kernel leaves zero: the last split of each merges, in place of the merge
    kernel."""
    triton, attn_k, merge_k = _kernels()
    N, H, D = q.shape
    KH = k_cache.shape[1]
    B = N // nodes
    tiles = math.ceil(nodes * (H // KH) / block_m)
    merge_last = nsplit > 1 and tickets is not None
    assert not merge_last or tickets.numel() >= B * KH * tiles
    use_pdl = pdl.on(q)
    attn_k[(B, KH * tiles, nsplit)](q, k_cache, v_cache, kv_indptr, kv_indices, anc, skip if skip is not None else anc,
                                    out, part_o, part_lse, tickets if merge_last else anc, scale * 1.4426950408889634,
                                    N, B, nsplit, S=nodes, H=H, KH=KH, D=D, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
                                    SPLIT=nsplit > 1, SKIP=skip is not None, MERGE_LAST=merge_last, PDL=use_pdl,
                                    num_warps=4, **pdl.launch_kw(use_pdl))
    if nsplit > 1 and not merge_last:
        R = N * H
        block_r = merge_rows(R)
        merge_k[(triton.cdiv(R, block_r),)](part_o, part_lse, out, R, D=D, NSPLIT=nsplit, BLOCK_R=block_r,
                                            PDL=use_pdl, num_warps=4, **pdl.launch_kw(use_pdl))
    return out


class TreeAttention(AttentionBackend):
    """The verify graph's attention for one shape (`batch` requests x `nodes` tree nodes each):
    plan_fixed_trees stages kv_indptr and kv_indices (one pinned copy, no FlashInfer plan),
    the graph writes each request's ancestor bits (`anc`) and hidden key range (`skip`) before its
    forward (spec/verify_kernels.verify_inputs), run() stores K/V and attends."""

    tree = True
    decode = False  # DecodeAttention: no hidden keys, the kernel skips no range
    plans_in_turn = True  # plans alternate between two pinned buffers (CudaGraphRunner.queue_safe_decode)

    def __init__(self, kv, num_heads: int, num_kv_heads: int, head_dim: int, out_slots: torch.Tensor, batch: int,
                 nodes: int, kv_capacity: int):
        super().__init__(kv, num_heads, num_kv_heads, head_dim)
        if nodes > MAX_NODES:
            raise ValueError(f"TreeAttention takes at most {MAX_NODES} nodes, got {nodes}")
        dev = kv.k.device
        self.batch, self.nodes, self.tokens, self.kv_capacity = batch, nodes, batch * nodes, kv_capacity
        self._out_slots = out_slots
        self.meta = torch.zeros(batch + 1 + kv_capacity, dtype=torch.int32, device=dev)  # [kv_indptr | kv_indices]
        # two pinned twins used in turn, so a step can be planned while the one before is queued
        self._meta_hosts = [torch.zeros(self.meta.numel(), dtype=torch.int32, pin_memory=dev.type == "cuda")
                            for _ in range(2)]
        self._host_turn = 0
        self.kv_indptr, self.kv_indices = self.meta[: batch + 1], self.meta[batch + 1:]
        self.anc = torch.zeros(batch, nodes, dtype=torch.long, device=dev)
        # keys each request's queries do not see: [skip[0, b], skip[1, b]) of its range. A step
        # launched before the one before it is read lays out that step's whole tree after the prefix; the
        # rejected part of it, known only on the device, is hidden this way
        self.skip = torch.zeros(2, batch, dtype=torch.int32, device=dev)
        g = num_heads // num_kv_heads
        self.block_m = max(16, min(64, 1 << (nodes * g - 1).bit_length()))
        self.nsplit = num_splits(batch, nodes, num_heads, num_kv_heads, self.block_m)
        n = self.tokens
        self.out = torch.zeros(n, num_heads, head_dim, dtype=kv.k.dtype, device=dev)
        self.part_o = torch.zeros(self.nsplit if self.nsplit > 1 else 0, n, num_heads, head_dim, dtype=torch.float32,
                                  device=dev)
        self.part_lse = torch.zeros(self.nsplit if self.nsplit > 1 else 0, n, num_heads, dtype=torch.float32,
                                    device=dev)
        tiles = math.ceil(nodes * g / self.block_m)
        self.tickets = torch.zeros(batch * num_kv_heads * tiles, dtype=torch.int32, device=dev)

    def plan(self, fb) -> None:
        raise NotImplementedError("TreeAttention is planned with plan_fixed_trees (the device step's graphs)")

    def plan_fixed_trees(self, nodes: int, prefix_lens: list[int], kv_indices: torch.Tensor) -> None:
        """kv_indices (host tensor or numpy array): per request its prefix slots then its `nodes` tree slots."""
        if nodes != self.nodes:
            raise ValueError(f"TreeAttention captured for {self.nodes} nodes per request, got {nodes}")
        host = self._meta_hosts[self._host_turn]
        self._host_turn ^= 1
        B, h = self.batch, host.numpy()
        h[0] = 0
        np.cumsum(np.asarray(prefix_lens, dtype=np.int32) + nodes, out=h[1: B + 1])
        if isinstance(kv_indices, np.ndarray) or kv_indices.device.type == "cpu":  # numpy: ~0.2 us, torch ~2
            idx = kv_indices if isinstance(kv_indices, np.ndarray) else kv_indices.numpy()
            n = idx.size
            h[B + 1: B + 1 + n] = idx
        else:
            n = kv_indices.numel()
            host[B + 1: B + 1 + n] = kv_indices
        self.meta[: B + 1 + n].copy_(host[: B + 1 + n], non_blocking=True)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        kc, vc = self.kv.k[layer], self.kv.v[layer]
        if k is not None:  # else the fused RoPE kernel stored them (model/fused.py: rope_qkv_store)
            kc[self._out_slots] = k
            vc[self._out_slots] = v
        tree_attention(q.contiguous(), kc, vc, self.kv_indptr, self.kv_indices, self.anc, self.out, self.part_o,
                       self.part_lse, self.scale, self.nodes, self.nsplit, self.block_m,
                       skip=None if self.decode else self.skip, tickets=self.tickets if MERGE_LAST else None)
        return self.out.reshape(q.shape[0], self.num_heads * self.head_dim)


class DecodeAttention(TreeAttention):
    """The decode graphs' attention: each request's one new token is a one-node tree over its
    prefix, so the tree kernel serves decode too, planned from the step's ForwardBatch with one
    pinned copy (FlashInfer's decode wrapper needs its plan on the host every step, and at batch 1
    its kernel plus merge takes ~8 us a layer against ~6 here; bench_tree_attention.py)."""

    tree = False
    decode = True

    def __init__(self, kv, num_heads: int, num_kv_heads: int, head_dim: int, out_slots: torch.Tensor, batch: int,
                 kv_capacity: int):
        super().__init__(kv, num_heads, num_kv_heads, head_dim, out_slots, batch, 1, kv_capacity)
        self.anc.fill_(1)  # a node sees itself

    def fits(self, fb) -> bool:
        """Whether a batch already padded to this shape fits the buffers."""
        return fb.batch_size == self.batch and fb.num_tokens == self.tokens and sum(fb.kv_lens) <= self.kv_capacity

    def plan(self, fb) -> None:
        if fb.num_tokens != fb.batch_size:
            raise ValueError("DecodeAttention: one new token per request")
        self.plan_fixed_trees(1, [k - 1 for k in fb.kv_lens], fb.kv_indices)
