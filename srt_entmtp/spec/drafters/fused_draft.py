"""One level of a sequential draft head in a few Triton kernels (GPU, few rows).

Drafting a level of a fixed tree layout (Drafter.propose_layout) is, per level: the head's step
from its parents' states and tokens, logits over the draft vocabulary, their top k, then each
child slot's candidate (its parent's row, its rank) mapped to a full-vocabulary id. In torch
that is ~20 small kernels a level (norms, a concatenation, an embedding lookup, four GEMMs,
SiLU, adds, a two-pass top-k with its sorts, three gathers), ~100 a batch-1 step of a depth-5
tree inside the speculative step's graph, where every kernel costs ~2-3 us whatever its work.
Here a level is five kernels:

  * the MTP block (MTPDrafter.fused_step): norm_linear_add_rows (the normed state's half of the
    input projection plus the token's row of a per-token table, TOKEN_TABLE below; without it
    norm2_linear, both input norms, the concatenation and the embedding lookup in the loads),
    norm_gate_silu, linear_residual (model/small_linear.py);
  * norm_linear_topk: final norm, projection and each 128-column tile's top k, in one pass over
    the draft vocabulary's weights (the logits never reach memory);
  * pick_kernel (below): for each child slot the rank-th best of its parent's tile candidates,
    mapped through the draft vocabulary.

The tokens are the ones the torch form drafts (top k is exact; among equal logits either order
is a valid top k, as with torch.topk). Used for CUDA bf16/fp16 when a level has at most
MAX_ROWS rows (`usable`); tests run the kernels in Triton's interpreter on CPU.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from srt_entmtp.model import fused, pdl, small_linear

ENABLED = True  # False: the torch form for every drafter (read when a graph is captured)
MAX_ROWS = 32   # rows of a level drafted this way (measured up to here: scripts/bench_draft.py)
# Tile configs of a level's kernels (small_linear's 4- or 5-tuples; None: small_linear's own, tuned
# for the base model's layer shapes, not the MTP block's): "proj" the block's input projection
# (norm_linear_add_rows, or norm2_linear), "gate_up" norm_gate_silu, "down" linear_residual,
# "topk" norm_linear_topk; and pick_kernel's warps.
# `bench_draft.py --kernels` times the alternatives and writes ENTMTP_DRAFT_CONFIGS's file; read
# when a graph is captured.
# The H100 sweep's best (bench_draft_h100_2026-12-07_kernels{,_table}.json): topk 9.2-9.7 us a
# call at 1-16 rows against 10.8-11.1 with small_linear's config; the three block matmuls gain
# 0-0.3 us a call alone with 3 stages, yet the batch-1 draft graph took 100.6 us with all four
# against 113.1 with the topk's alone (more than the parts: not yet explained).
CONFIGS: dict[str, tuple | None] = {"proj": (16, 256, 4, 3), "gate_up": (32, 256, 4, 3), "down": (16, 512, 2, 3),
                                   "topk": (128, 128, 8, 3)}
PICK_WARPS = 4
# MTP: the block's input projection as RMSNorm(state) @ P_state.T plus a per-token table row
# (MTPDrafter.split_projection: float32, 113 MiB for this model), not the two normed halves side by
# side (norm2_linear: both norms and the embedding lookup in one kernel, 11-15 us a call on the
# H100 where the level's other matmuls take 4-5). The same sum up to its order, rounded once.
# Read when a graph is captured.
TOKEN_TABLE = True


def _load_overrides() -> None:
    """ENTMTP_DRAFT_CONFIGS=<json>: {"proj" | "gate_up" | "down" | "topk": [4 or 5 ints] or null,
    "pick_warps": int, "token_table": bool} (tuning on another GPU; A/B runs)."""
    global PICK_WARPS, TOKEN_TABLE
    path = os.environ.get("ENTMTP_DRAFT_CONFIGS")
    if not path:
        return
    d = json.loads(Path(path).read_text())
    unknown = set(d) - set(CONFIGS) - {"pick_warps", "token_table"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} (have {sorted(CONFIGS)}, pick_warps, token_table)")
    for op in CONFIGS:
        if d.get(op) is not None:
            CONFIGS[op] = tuple(int(v) for v in d[op])
    PICK_WARPS = int(d.get("pick_warps", PICK_WARPS))
    TOKEN_TABLE = bool(d.get("token_table", TOKEN_TABLE))


_load_overrides()


def topk_tile() -> int:
    """Columns of a top-k tile: each tile keeps at most this many candidates."""
    return small_linear.tile("topk", 1, CONFIGS["topk"])[1][0]


def usable(drafter, x: torch.Tensor, k: int) -> bool:
    """Whether `drafter` may draft a level of x's rows asking k candidates with these kernels."""
    w = drafter.out_weight
    return (ENABLED and drafter.fused_logits and drafter.fused_levels and fused.enabled(x) and x.dim() == 2
            and x.shape[0] <= min(MAX_ROWS, small_linear.SMALL_M) and k <= topk_tile()
            and w.dtype == x.dtype and w.is_contiguous() and _kernel() is not None
            and small_linear._kernel() is not None)


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def pick_kernel(topv_ptr, topi_ptr, parent_ptr, rank_ptr, vocab_ptr, out_ptr, C, w, k_max, s_top, s_sel, s_out,
                    HAS_VOCAB: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # program (b, j): child slot j of request b; its parent is row b * w + parent[b, j]
        b = tl.program_id(0)
        j = tl.program_id(1)
        parent = tl.load(parent_ptr + b * s_sel + j)
        rank = tl.minimum(tl.load(rank_ptr + b * s_sel + j), k_max - 1)
        row = b * w + parent
        c = tl.arange(0, BLOCK_C)
        v = tl.load(topv_ptr + row * s_top + c, mask=c < C, other=float("-inf"))
        for _ in range(rank):  # drop the `rank` best; the best left is the one
            at = tl.argmax(v, 0, tie_break_left=True)
            v = tl.where(c == at, float("-inf"), v)
        at = tl.argmax(v, 0, tie_break_left=True)
        tok = tl.load(topi_ptr + row * s_top + at).to(tl.int64)
        if HAS_VOCAB:
            tok = tl.load(vocab_ptr + tok)
        tl.store(out_ptr + b * s_out + j, tok)

    return triton, pick_kernel


def pick(top_v: torch.Tensor, top_i: torch.Tensor, parent: torch.Tensor, rank: torch.Tensor, w: int, k: int,
         vocab: torch.Tensor | None, warps: int | None = None) -> torch.Tensor:
    """Tokens [B, c] of c child slots per request: child (b, j) takes the rank[b, j]-th best
    (0 = best) candidate of row b * w + parent[b, j] of (top_v, top_i) [B * w, C], through
    `vocab` (draft index -> token id) when given. parent and rank may be column slices of wider
    tables (any row stride, unit column stride)."""
    triton, kern = _kernel()
    B, c = parent.shape
    C = top_v.shape[1]
    assert parent.stride(1) == 1 and rank.stride(1) == 1 and parent.stride(0) == rank.stride(0)
    out = torch.empty(B, c, dtype=torch.long, device=top_v.device)
    if B and c:
        use_pdl = pdl.on(top_v)
        kern[(B, c)](top_v, top_i, parent, rank, vocab if vocab is not None else top_i, out, C, w, k,
                     top_v.stride(0), parent.stride(0), out.stride(0), HAS_VOCAB=vocab is not None,
                     BLOCK_C=triton.next_power_of_2(C), PDL=use_pdl, num_warps=warps or PICK_WARPS,
                     **pdl.launch_kw(use_pdl))
    return out


def draft_level(drafter, prev: torch.Tensor, tokens: torch.Tensor, d: int, k: int, parent: torch.Tensor,
                rank: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Level d of a sequential drafter over B * w parent rows: prev [B*w, H] their states,
    tokens [B*w] their tokens; returns (their new states [B*w, H], the child slots' tokens [B, c])."""
    s = drafter.fused_step(d, prev, tokens)
    top_v, top_i = small_linear.norm_linear_topk(s, drafter.logits_norm(d), drafter.out_weight, drafter.eps, k,
                                                 config=CONFIGS["topk"])
    return s, pick(top_v, top_i, parent, rank, w, k, drafter.draft_vocab)
