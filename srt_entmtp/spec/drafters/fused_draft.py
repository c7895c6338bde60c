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
# The device step drafts a whole tree with no torch op between the kernels (draft_tree): the roots,
# the state rows of every level and the children's tokens written by Triton kernels, where the
# level-by-level form (Drafter.propose_layout) runs ~10 small torch kernels a step (gathers, a
# concatenation, copies), each a full launch dependency that PDL cannot overlap. A/B switch, read
# when a graph is captured.
FUSED_INPUTS = True


def _load_overrides() -> None:
    """ENTMTP_DRAFT_CONFIGS=<json>: {"proj" | "gate_up" | "down" | "topk": [4 or 5 ints] or null,
    "pick_warps": int, "token_table": bool, "fused_inputs": bool} (tuning on another GPU; A/B runs)."""
    global PICK_WARPS, TOKEN_TABLE, FUSED_INPUTS
    path = os.environ.get("ENTMTP_DRAFT_CONFIGS")
    if not path:
        return
    d = json.loads(Path(path).read_text())
    unknown = set(d) - set(CONFIGS) - {"pick_warps", "token_table", "fused_inputs"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)} "
                         f"(have {sorted(CONFIGS)}, pick_warps, token_table, fused_inputs)")
    for op in CONFIGS:
        if d.get(op) is not None:
            CONFIGS[op] = tuple(int(v) for v in d[op])
    PICK_WARPS = int(d.get("pick_warps", PICK_WARPS))
    TOKEN_TABLE = bool(d.get("token_table", TOKEN_TABLE))
    FUSED_INPUTS = bool(d.get("fused_inputs", FUSED_INPUTS))


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
    def pick_kernel(topv_ptr, topi_ptr, parent_ptr, rank_ptr, sel_row_ptr, vocab_ptr, out_ptr, out2_ptr, C, w, k_max,
                    s_top, s_sel, s_out, HAS_VOCAB: tl.constexpr, SEL_ROWS: tl.constexpr, OUT2: tl.constexpr,
                    BLOCK_C: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # program (b, j): child slot j of request b; its parent is row b * w + parent[b, j]
        b = tl.program_id(0)
        j = tl.program_id(1)
        sel = b
        if SEL_ROWS:  # parent and rank are tables: request b reads their row sel_row[b]
            sel = tl.load(sel_row_ptr + b)
        parent = tl.load(parent_ptr + sel * s_sel + j)
        rank = tl.minimum(tl.load(rank_ptr + sel * s_sel + j), k_max - 1)
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
        if OUT2:  # also [B, c] contiguous: the next level's token rows
            tl.store(out2_ptr + b * tl.num_programs(1) + j, tok)

    @triton.jit
    def draft_inputs_kernel(req_ptr, root_in_ptr, roots_ptr, row_ptr, pil_ptr, slot_ptr, tok_out_ptr, tok0_ptr,
                            xrows_ptr, B, s_out, S: tl.constexpr, SP: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # program b: request b's root token (its own, or the pool's from the step before) and, for
        # every slot, the row of the state its level's first kernel reads (see draft_tree)
        b = tl.program_id(0)
        r = tl.load(req_ptr + b)
        own = tl.load(root_in_ptr + b)
        root = tl.where(own >= 0, own, tl.load(roots_ptr + r))
        tl.store(tok_out_ptr + b * s_out, root)
        tl.store(tok0_ptr + b, root)
        s = tl.arange(0, SP)
        ok = s < S
        off = tl.load(slot_ptr + s * 4, mask=ok, other=0)        # the slot's level's first slot
        width = tl.load(slot_ptr + s * 4 + 1, mask=ok, other=1)  # its level's width
        wprev = tl.load(slot_ptr + s * 4 + 2, mask=ok, other=1)  # the level above's width
        pil = tl.load(pil_ptr + tl.load(row_ptr + b) * S + s, mask=ok, other=0)
        src = tl.where(s == 0, r, b * wprev + pil)
        tl.store(xrows_ptr + B * off + b * width + (s - off), src, mask=ok)

    return triton, pick_kernel, draft_inputs_kernel


def pick(top_v: torch.Tensor, top_i: torch.Tensor, parent: torch.Tensor, rank: torch.Tensor, w: int, k: int,
         vocab: torch.Tensor | None, warps: int | None = None, *, sel_rows: torch.Tensor | None = None,
         out: torch.Tensor | None = None, out2: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens [B, c] of c child slots per request: child (b, j) takes the rank[b, j]-th best
    (0 = best) candidate of row b * w + parent[b, j] of (top_v, top_i) [B * w, C], through
    `vocab` (draft index -> token id) when given. parent and rank may be column slices of wider
    tables (any row stride, unit column stride). sel_rows [B] (optional): parent and rank are
    tables and request b reads their row sel_rows[b] (then B = sel_rows' length). out: where to
    write (any row stride; default a new [B, c]); out2: a second, contiguous [B, c] copy."""
    triton, kern, _ = _kernel()
    c = parent.shape[1]
    B = sel_rows.shape[0] if sel_rows is not None else parent.shape[0]
    C = top_v.shape[1]
    assert parent.stride(1) == 1 and rank.stride(1) == 1 and parent.stride(0) == rank.stride(0)
    if out is None:
        out = torch.empty(B, c, dtype=torch.long, device=top_v.device)
    assert out.shape == (B, c) and out.stride(1) == 1 and (out2 is None or (out2.is_contiguous() and out2.numel() == B * c))
    if B and c:
        use_pdl = pdl.on(top_v)
        kern[(B, c)](top_v, top_i, parent, rank, sel_rows if sel_rows is not None else parent,
                     vocab if vocab is not None else top_i, out, out2 if out2 is not None else out, C, w, k,
                     top_v.stride(0), parent.stride(0), out.stride(0), HAS_VOCAB=vocab is not None,
                     SEL_ROWS=sel_rows is not None, OUT2=out2 is not None,
                     BLOCK_C=triton.next_power_of_2(C), PDL=use_pdl, num_warps=warps or PICK_WARPS,
                     **pdl.launch_kw(use_pdl))
    return out


def tree_usable(drafter, hidden_pool: torch.Tensor, batch: int, layout) -> bool:
    """Whether draft_tree may fill `batch` requests' trees of `layout`: every level fused, and a
    drafter whose block gathers its parents' states in its first kernel (MTP)."""
    if not (FUSED_INPUTS and getattr(drafter, "gathers_rows", False) and hidden_pool.dtype == drafter.param_dtype):
        return False
    probe = hidden_pool[:1]
    return all(usable(drafter, probe, k) and batch * w <= min(MAX_ROWS, small_linear.SMALL_M)
               for w, k in zip(layout.widths, layout.ks))


def draft_tree(drafter, hidden_pool: torch.Tensor, roots_pool: torch.Tensor, req: torch.Tensor, root_in: torch.Tensor,
               table, row: torch.Tensor, out: torch.Tensor) -> None:
    """Drafter.propose_layout for the device step, with no torch op between the kernels: B requests
    (req [B] their pool rows; root_in [B] a root token, or -1 for roots_pool[req]; row [B] their
    rows of the LayoutTable `table`) drafted into out [B, S]. One kernel writes the roots and, for
    every slot, which state row its level reads (the request's pool row for the root's level, its
    parent's row of the level above for the others); each level's first kernel gathers those rows
    by its loads, and pick writes the children straight into `out` and into the next level's
    token rows. The same tokens as propose_layout (tested)."""
    triton, _, kern = _kernel()
    lay = table.layout
    B, S = out.shape
    assert out.stride(1) == 1 and S == lay.num_slots and req.is_contiguous() and root_in.is_contiguous()
    if B == 0:
        return
    dev = out.device
    xrows = torch.empty(B * S, dtype=torch.long, device=dev)   # level by level: [B, width] state rows
    toks = torch.empty(B * S, dtype=torch.long, device=dev)    # the same layout: the slots' tokens
    use_pdl = pdl.on(out)
    kern[(B,)](req, root_in, roots_pool, row, table.parent_in_level, table.level_slots, out, toks, xrows, B,
               out.stride(0), S=S, SP=triton.next_power_of_2(S), PDL=use_pdl, num_warps=1, **pdl.launch_kw(use_pdl))
    offs, widths = lay.offsets, lay.widths
    states = hidden_pool
    for L in range(lay.depth):
        w, k, a = widths[L], lay.ks[L], B * offs[L]
        s = drafter.fused_step(L + 1, states, toks[a: a + B * w], rows=xrows[a: a + B * w])
        top_v, top_i = small_linear.norm_linear_topk(s, drafter.logits_norm(L + 1), drafter.out_weight, drafter.eps,
                                                     k, config=CONFIGS["topk"])
        kids, c = offs[L + 1], widths[L + 1]
        pick(top_v, top_i, table.parent_in_level[:, kids: kids + c], table.rank[:, kids: kids + c], w, k,
             drafter.draft_vocab, sel_rows=row, out=out[:, kids: kids + c], out2=toks[B * kids: B * (kids + c)])
        states = s


def draft_level(drafter, prev: torch.Tensor, tokens: torch.Tensor, d: int, k: int, parent: torch.Tensor,
                rank: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Level d of a sequential drafter over B * w parent rows: prev [B*w, H] their states,
    tokens [B*w] their tokens; returns (their new states [B*w, H], the child slots' tokens [B, c])."""
    s = drafter.fused_step(d, prev, tokens)
    top_v, top_i = small_linear.norm_linear_topk(s, drafter.logits_norm(d), drafter.out_weight, drafter.eps, k,
                                                 config=CONFIGS["topk"])
    return s, pick(top_v, top_i, parent, rank, w, k, drafter.draft_vocab)
