"""The layer's four matmuls for forwards of a few tokens, each fused with its neighbours (Triton).

A decode step at batch 1 (or a small tree) multiplies 1-16 rows by each weight matrix. cuBLAS
takes ~3.8 us a matmul there on an H200 and the norm, activation and residual kernels around
them ~1.0-1.6 us each, for work that reads 1-3.5 MB: the layer is launch-bound, not
bandwidth-bound. Here each matmul takes its neighbours in:

  * norm_qkv_rope:    RMSNorm(h) @ W.T, then RoPE on q and k, k and v stored in their KV slots
                      (input norm + fused q/k/v projection + fused.rope_qkv_store's work);
                      norm_linear is the same without the epilogue
  * norm_gate_silu:   SiLU(g) * u, [g | u] = RMSNorm(h) @ W.T   (post-attention norm + MLP up)
  * linear_residual:  h + x @ W.T               (o projection, MLP down)

so a layer is four matmul kernels and attention: 5 kernels where the unfused forward has 9. On
Hopper they launch with PDL and prefetch their weight rows to L2 while the kernel before runs
(model/pdl.py). The MTP draft head (spec/drafters/fused_draft.py) uses three more forms:

  * norm2_linear:     [RMSNorm(a) | RMSNorm(E[tokens])] @ W.T   (the concatenation and the
                      embedding lookup are the kernel's loads)
  * norm_linear_topk: the top k of each tile of RMSNorm(h) @ W.T   (projection onto the draft
                      vocabulary; the logits stay in registers)
  * norm_linear_add_rows: RMSNorm(h) @ W.T + T[rows]   (the MTP block's input projection, its
                      token half read from a per-token table: fused_draft.TOKEN_TABLE)

A program owns BLOCK_N output columns of a 16-row tile and reads its whole K range; the RMS of
each row is computed again by every program (K <= a few thousand floats, nothing next to its
weight tile). Rounding follows the torch forms step by step (bf16 after the matmul, after the
norm and its scale, after SiLU, after the add), as model/fused.py does, so the forward agrees
with the unfused one up to summation order.

Only for CUDA tensors in bf16/fp16 with at most SMALL_M rows (the model checks `usable`; forwards of
SMALL_M-MID_M rows use norm_qkv_rope and linear_residual alone, with wider tiles from WIDE: `mid_usable`);
tests run the kernels in Triton's interpreter on CPU in float32.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch

from srt_entmtp.model import fused, pdl

SMALL_M = 32      # rows up to which the model takes this path (at 64 the unfused chain wins on the H200)
BLOCK_M = 16      # the smallest tile tl.dot takes; rows past M are masked
# per-op tile shapes (BLOCK_N, BLOCK_K, num_warps, num_stages) for up to 16 rows, the fastest at 1 and 8 rows in
# scripts/bench_small_linear.py --sweep on the H200; the loads are latency-bound, so deep
# pipelining (4 stages) and wide K tiles matter most (a second sweep, over 256-512 wide K tiles
# and 3-5 stages, found at most 0.1 us more; benchmarks/results/small_linear_h200_2026-12-01*.json)
CONFIGS = {"norm_linear": (16, 256, 4, 4), "norm_gate_silu": (32, 256, 4, 4), "linear_residual": (16, 256, 2, 4),
           # a draft head's projection onto its vocabulary with the per-tile top-k (norm_linear_topk):
           # 128 columns a program (128 programs for a 16k vocabulary), narrower K tiles to fit 3 stages
           "topk": (128, 64, 4, 3)}
# Tiles for 17-128 rows by row group ({group: {op: config}}; group 32 takes 17-32 rows, 64 takes
# 33-64, 128 takes 65-128): a 4-tuple config runs in one row tile of the group's height, so each
# weight tile is read once, not once per 16 rows; a 5-tuple names its row tile. An op a group does
# not name keeps 16-row tiles. Up to 32 rows (the few-token forward) none: on the H200 one 32-row
# tile was slower than two 16-row ones (fewer programs; the re-reads hit L2; bench_small_linear.py
# --sweep-wide, small_linear_wide_h200_2026-12-01.json). Groups 64 and 128 serve the mid-size
# forward's two fused matmuls (MID_M): 16-row tiles 32 columns wide for q/k/v (half the programs of
# 16 columns, so x is re-read half as often: 4.4 against 6.0 us at 40-64 rows, 6.1 against 9.5 at
# 120), one row tile for o.
# From the 2026-12-02 sweep (small_linear_wide128_h200_2026-12-02.json); ENTMTP_SMALL_LINEAR_CONFIGS
# retunes them for another GPU.
WIDE: dict[int, dict[str, tuple]] = {
    64: {"norm_linear": (16, 32, 256, 4, 4), "linear_residual": (64, 16, 128, 4, 3)},
    128: {"norm_linear": (16, 32, 256, 4, 4), "linear_residual": (128, 16, 64, 4, 3)},
}
ROW_GROUPS = (32, 64, 128)
# rows (SMALL_M, MID_M] take the mid-size forward (LlamaModel._forward_mid_tokens): q/k/v + RoPE and o
# fused here, the MLP on cuBLAS; 0 turns it off (the unfused forward; an A/B switch read at capture).
# H200, 2026-12-02 (small_linear_mid_h200_2026-12-02.json, a layer's matmuls in a 30-layer graph):
# 21.7 against 22.7-22.9 us unfused at 40-64 rows, but 24.9-25.2 against 23.2-23.6 at 96-128, and a
# batch-8 verify of 120 tokens took 1.103 ms this way against 1.064 unfused: so up to 64 rows only
MID_M = 64


def _load_overrides() -> None:
    """ENTMTP_SMALL_LINEAR_CONFIGS=<json> (tuning on another GPU; bench_small_linear.py --sweep-wide
    writes one): {"small_m": int, "mid_m": int, "wide": {"32": {op: [BLOCK_N, BLOCK_K, warps, stages]
    or [BLOCK_M, BLOCK_N, BLOCK_K, warps, stages]}, "64": ..., "128": ...}}."""
    global SMALL_M, MID_M
    path = os.environ.get("ENTMTP_SMALL_LINEAR_CONFIGS")
    if not path:
        return
    d = json.loads(Path(path).read_text())
    SMALL_M = int(d.get("small_m", SMALL_M))
    MID_M = int(d.get("mid_m", MID_M))
    for bm, ops in d.get("wide", {}).items():
        WIDE.setdefault(int(bm), {}).update({op: tuple(c) for op, c in ops.items()})


_load_overrides()


def tile(op: str, M: int, config=None) -> tuple[int, tuple]:
    """(BLOCK_M, (BLOCK_N, BLOCK_K, warps, stages)) for M rows; config: a 4-tuple (16-row tiles)
    or (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). Without one, M's row group in WIDE if it
    names op, else 16-row tiles; the draft top-k always keeps 16-row tiles."""
    if config is not None:
        return (config[0], tuple(config[1:])) if len(config) == 5 else (BLOCK_M, tuple(config))
    if op != "topk" and M > BLOCK_M:
        group = next((g for g in ROW_GROUPS if M <= g), None)
        c = WIDE.get(group, {}).get(op) if group is not None else None
        if c is not None:
            return (c[0], tuple(c[1:])) if len(c) == 5 else (group, tuple(c))
    return BLOCK_M, CONFIGS[op]


ENABLED = True    # False: the model's ordinary path at every size (benchmarks' A/B; read at capture)
ROPE_IN_QKV = True  # False: RoPE and the KV store in a kernel after norm_linear (benchmarks' A/B; read at capture)


def usable(x: torch.Tensor, rows: int | None = None) -> bool:
    """Whether a product of x's rows (or of `rows` rows gathered from x) takes these kernels."""
    n = x.shape[0] if rows is None else rows
    return ENABLED and fused.enabled(x) and x.dim() == 2 and n <= SMALL_M and _kernel() is not None


def mid_usable(x: torch.Tensor) -> bool:
    """Whether x's rows take the mid-size forward (SMALL_M < rows <= MID_M)."""
    return (ENABLED and fused.enabled(x) and x.dim() == 2 and SMALL_M < x.shape[0] <= MID_M
            and _kernel() is not None)


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def small_linear_kernel(x_ptr, xrows_ptr, x2_ptr, rows2_ptr, w_ptr, bias_ptr, ln_ptr, ln2_ptr, res_ptr, out_ptr,
                            topv_ptr, topi_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, kc_ptr, vc_ptr,
                            M, N, K, K1, sx, sx2, sr, so, stop, top_k, eps, q_cols, kv_cols,
                            NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                            X_ROWS: tl.constexpr, X2: tl.constexpr, X2_ROWS: tl.constexpr, RES_ROWS: tl.constexpr,
                            TOPK: tl.constexpr,
                            ROPE: tl.constexpr,
                            HEAD_D: tl.constexpr, PDL: tl.constexpr, K_LINES: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        if ROPE:  # column pairs (c, c + HEAD_D / 2) of a head side by side, so the rotation stays in the tile
            HALF: tl.constexpr = HEAD_D // 2
            lane = tl.arange(0, BLOCK_N)
            pair = tl.program_id(0) * (BLOCK_N // 2) + lane // 2
            rn = (pair // HALF) * HEAD_D + pair % HALF + (lane % 2) * HALF
            n_ok = pair < N // 2
        else:
            rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
        m_ok = rm < M
        dt = x_ptr.dtype.element_ty
        if PDL:  # launched while the kernel before runs: send this program's weight rows towards L2 (no kernel
            # writes them), then wait for the kernel before to finish, and let the next one start (model/pdl.py)
            wrow = tl.where(n_ok, rn, 0)
            line = tl.minimum(tl.arange(0, K_LINES) * 64, K - 1)  # one address per 128-byte line of a bf16 row
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                      [(w_ptr + wrow[:, None] * K + line[None, :]).to(tl.int64)],
                                      dtype=tl.int32, is_pure=False, pack=1)
            if SILU:
                tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                          [(w_ptr + (wrow + N)[:, None] * K + line[None, :]).to(tl.int64)],
                                          dtype=tl.int32, is_pure=False, pack=1)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        # X_ROWS: x's row r is x[xrows[r]] (a draft level's parent states, gathered by the load)
        xr = rm
        if X_ROWS:
            xr = tl.load(xrows_ptr + rm, mask=m_ok, other=0).to(tl.int64)
        # X2: the row is [x | x2] (columns K1.. come from x2, each part normed on its own);
        # X2_ROWS: x2's row r is x2[rows2[r]] (an embedding lookup done by the load)
        K1e = K
        if X2:
            K1e = K1
            r2 = rm
            if X2_ROWS:
                r2 = tl.load(rows2_ptr + rm, mask=m_ok, other=0)
        if NORM:  # each row's 1 / RMS, over the whole row (over each part with X2)
            ss = tl.zeros([BLOCK_M], tl.float32)
            ss2 = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + xr[:, None] * sx + rk[None, :], mask=m_ok[:, None] & (rk < K1e)[None, :],
                             other=0.0).to(tl.float32)
                ss += tl.sum(xt * xt, 1)
                if X2:
                    in2 = (rk >= K1) & (rk < K)
                    xb = tl.load(x2_ptr + r2[:, None] * sx2 + tl.maximum(rk - K1, 0)[None, :],
                                 mask=m_ok[:, None] & in2[None, :], other=0.0).to(tl.float32)
                    ss2 += tl.sum(xb * xb, 1)
            rstd = tl.rsqrt(ss / K1e + eps)
            if X2:
                rstd2 = tl.rsqrt(ss2 / (K - K1) + eps)
        res_rows = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        if RES_ROWS:  # the residual's row r is res[rows2[r]] (a table row): its load overlaps the matmul
            rr = tl.load(rows2_ptr + rm, mask=m_ok, other=0).to(tl.int64)
            res_rows = tl.load(res_ptr + rr[:, None] * sr + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                               other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            xt = tl.load(x_ptr + xr[:, None] * sx + rk[None, :], mask=m_ok[:, None] & (rk < K1e)[None, :], other=0.0)
            if NORM:  # as transformers: normalise in float32, round, then scale and round again
                lw = tl.load(ln_ptr + rk, mask=rk < K1e, other=0.0).to(tl.float32)
                xt = ((xt.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * lw[None, :]).to(dt)
            if X2:
                in2 = (rk >= K1) & k_ok
                k2 = tl.maximum(rk - K1, 0)
                xb = tl.load(x2_ptr + r2[:, None] * sx2 + k2[None, :], mask=m_ok[:, None] & in2[None, :], other=0.0)
                if NORM:
                    lw2 = tl.load(ln2_ptr + k2, mask=in2, other=0.0).to(tl.float32)
                    xb = ((xb.to(tl.float32) * rstd2[:, None]).to(dt).to(tl.float32) * lw2[None, :]).to(dt)
                xt = tl.where(in2[None, :], xb, xt)
            wmask = k_ok[:, None] & n_ok[None, :]
            wt = tl.load(w_ptr + rn[None, :] * K + rk[:, None], mask=wmask, other=0.0)  # W.T tile [K, N]
            acc = tl.dot(xt, wt, acc)
            if SILU:  # the matching `up` columns sit N rows further down W
                wu = tl.load(w_ptr + (rn + N)[None, :] * K + rk[:, None], mask=wmask, other=0.0)
                acc_up = tl.dot(xt, wu, acc_up)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = acc.to(dt)
        if SILU:
            g = y.to(tl.float32)
            s = (g / (1.0 + tl.exp(-g))).to(dt)
            y = (s.to(tl.float32) * acc_up.to(dt).to(tl.float32)).to(dt)
        omask = m_ok[:, None] & n_ok[None, :]
        if ROPE:  # rotary embedding of the q and k heads, rounded as fused.rope_qkv_store rounds; q goes to out,
            # k and v to their KV-cache slots
            a, b = tl.split(tl.reshape(y, [BLOCK_M, BLOCK_N // 2, 2]))
            partner = tl.reshape(tl.join(b, a), [BLOCK_M, BLOCK_N])
            pos = tl.load(pos_ptr + rm, mask=m_ok, other=0)
            trig = pos[:, None] * HEAD_D + (rn % HEAD_D)[None, :]
            c = tl.load(cos_ptr + trig, mask=omask, other=0.0).to(dt).to(tl.float32)
            s = tl.load(sin_ptr + trig, mask=omask, other=0.0).to(dt).to(tl.float32)
            rot = ((y.to(tl.float32) * c).to(dt).to(tl.float32) + (partner.to(tl.float32) * s).to(dt).to(tl.float32)
                   ).to(dt)
            qk = rn < q_cols + kv_cols
            y = tl.where(qk[None, :], rot, y)
            slot = tl.load(slot_ptr + rm, mask=m_ok, other=0).to(tl.int64)
            is_q = rn < q_cols
            tl.store(out_ptr + rm[:, None] * so + rn[None, :], y, mask=omask & is_q[None, :])
            tl.store(kc_ptr + slot[:, None] * kv_cols + (rn - q_cols)[None, :], y,
                     mask=omask & (qk & ~is_q)[None, :])
            tl.store(vc_ptr + slot[:, None] * kv_cols + (rn - q_cols - kv_cols)[None, :], y, mask=omask & ~qk[None, :])
        elif RES_ROWS:  # added in float32 before the one rounding: the sum stands for one matmul's output
            y = (acc + res_rows).to(dt)
        elif RESIDUAL:
            r = tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=omask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        if TOPK:  # keep only each row's top_k of this tile, best first: [M, tiles, top_k] values, column ids
            v = tl.where(n_ok[None, :], y.to(tl.float32), float("-inf"))
            cols = tl.arange(0, BLOCK_N)
            base = rm * stop + tl.program_id(0) * top_k
            for i in range(top_k):
                best, at = tl.max(v, 1, return_indices=True, return_indices_tie_break_left=True)
                tl.store(topv_ptr + base + i, best, mask=m_ok)
                tl.store(topi_ptr + base + i, tl.program_id(0) * BLOCK_N + at, mask=m_ok)
                v = tl.where(cols[None, :] == at[:, None], float("-inf"), v)
        elif not ROPE:
            tl.store(out_ptr + rm[:, None] * so + rn[None, :], y, mask=omask)

    return triton, small_linear_kernel


def _launch(op: str, x, w, n_out: int, *, bias=None, ln=None, eps=0.0, residual=None, silu=False, config=None,
            x2=None, rows2=None, ln2=None, top_k: int = 0, rope=None, residual_rows=None, x_rows=None):
    triton, kern = _kernel()
    M, K1 = x.shape
    if x_rows is not None:  # row r of the product is x[x_rows[r]]
        assert x_rows.dim() == 1 and x_rows.is_contiguous()
        M = x_rows.shape[0]
    K = K1 + (x2.shape[1] if x2 is not None else 0)
    assert x.stride(1) == 1 and w.is_contiguous() and w.shape[1] == K, "small_linear: row-major x and W"
    assert x2 is None or x2.stride(1) == 1
    assert residual_rows is None or (residual is not None and rows2 is None and not silu and residual.stride(1) == 1)
    if residual_rows is not None:
        rows2 = residual_rows  # the kernel reads either index through rows2_ptr
    bm, (bn, bk, warps, stages) = tile(op, M, config)
    assert rope is None or bn % 2 == 0, "norm_qkv_rope: a tile holds whole column pairs"
    if top_k:  # candidates, not the product: [M, tiles * top_k] values (float32) and column ids
        tiles = triton.cdiv(n_out, bn)
        assert top_k <= bn, f"top_k {top_k} > the tile's {bn} columns"
        out = (torch.empty(M, tiles * top_k, dtype=torch.float32, device=x.device),
               torch.empty(M, tiles * top_k, dtype=torch.int32, device=x.device))
        tv, ti, o = out[0], out[1], out[0]
    elif rope is not None:  # q only; k and v go to the cache
        out = o = torch.empty(M, rope.q_cols, dtype=x.dtype, device=x.device)
        tv = ti = o
    else:
        out = o = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
        tv = ti = o
    if M:
        res = residual if residual is not None else o
        r = rope if rope is not None else _NO_ROPE
        use_pdl = pdl.on(x)
        kern[(triton.cdiv(n_out, bn), triton.cdiv(M, bm))](
            x, x_rows if x_rows is not None else x, x2 if x2 is not None else x, rows2 if rows2 is not None else x, w, bias if bias is not None else w,
            ln if ln is not None else w, ln2 if ln2 is not None else w, res, o, tv, ti,
            *((r.positions, r.slots, r.cos, r.sin_signed, r.k_cache, r.v_cache) if rope is not None else (x,) * 6),
            M, n_out, K, K1, x.stride(0), x2.stride(0) if x2 is not None else 0, res.stride(0), o.stride(0),
            tv.stride(0), top_k, eps, r.q_cols, r.kv_cols,
            NORM=ln is not None, SILU=silu, RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
            X_ROWS=x_rows is not None, X2=x2 is not None, X2_ROWS=x2 is not None and rows2 is not None, RES_ROWS=residual_rows is not None,
            TOPK=top_k > 0, ROPE=rope is not None,
            HEAD_D=r.head_dim, PDL=use_pdl,
            K_LINES=triton.next_power_of_2(triton.cdiv(K, 64)) if use_pdl else 1,  # constexpr: one build per K only with PDL
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, **pdl.launch_kw(use_pdl))
    return out


class RopeStore(NamedTuple):
    """Where norm_qkv_rope puts its k and v, and the rotary tables (see fused.rope_qkv_store)."""
    positions: torch.Tensor
    cos: torch.Tensor          # float32 [positions, head_dim]
    sin_signed: torch.Tensor   # float32 [positions, head_dim], first half negated
    k_cache: torch.Tensor      # [slots, kv_heads, head_dim], contiguous
    v_cache: torch.Tensor
    slots: torch.Tensor        # [M] each row's KV slot
    q_cols: int                # q heads x head_dim
    kv_cols: int               # kv heads x head_dim
    head_dim: int


_NO_ROPE = RopeStore(None, None, None, None, None, None, 0, 0, 2)


def norm_linear(h: torch.Tensor, ln_w: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, eps: float,
                config=None) -> torch.Tensor:
    """RMSNorm(h; ln_w) @ w.T (+ bias)."""
    return _launch("norm_linear", h, w, w.shape[0], bias=bias, ln=ln_w, eps=eps, config=config)


def norm_gate_silu(h: torch.Tensor, ln_w: torch.Tensor, w_gate_up: torch.Tensor, eps: float, config=None
                   ) -> torch.Tensor:
    """SiLU(g) * u for [g | u] = RMSNorm(h; ln_w) @ w_gate_up.T (w_gate_up: gate rows, then up rows)."""
    return _launch("norm_gate_silu", h, w_gate_up, w_gate_up.shape[0] // 2, ln=ln_w, eps=eps, silu=True,
                   config=config)


def norm2_linear(a: torch.Tensor, ln_a: torch.Tensor, b_table: torch.Tensor, b_rows: torch.Tensor | None,
                 ln_b: torch.Tensor, w: torch.Tensor, eps: float, config=None, a_rows: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """[RMSNorm(a; ln_a) | RMSNorm(b; ln_b)] @ w.T, where b = b_table[b_rows] (b_rows None: b_table
    itself, row for row): two normed inputs side by side, e.g. a draft head's state beside the
    embedding of its token, with the concatenation and the lookup done by the kernel's loads.
    a_rows (optional): a's rows are a[a_rows] (the gather done by the loads too)."""
    return _launch("norm_linear", a, w, w.shape[0], ln=ln_a, eps=eps, x2=b_table, rows2=b_rows, ln2=ln_b,
                   config=config, x_rows=a_rows)


def norm_linear_add_rows(h: torch.Tensor, ln_w: torch.Tensor, w: torch.Tensor, eps: float, table: torch.Tensor,
                         rows: torch.Tensor, config=None, h_rows: torch.Tensor | None = None) -> torch.Tensor:
    """RMSNorm(h; ln_w) @ w.T + table[rows], summed in float32 and rounded once: the two halves of
    a matmul over [RMSNorm(h) | b] where b's half was computed ahead per row of a table (a draft
    head's token term, one row per vocabulary entry; float32 keeps it the one matmul's sum).
    h_rows (optional): h's rows are h[h_rows] (a draft level's parent states, gathered by the loads)."""
    M = h_rows.shape[0] if h_rows is not None else h.shape[0]
    assert table.shape[1] == w.shape[0] and rows.shape[0] == M
    return _launch("norm_linear", h, w, w.shape[0], ln=ln_w, eps=eps, residual=table, residual_rows=rows,
                   config=config, x_rows=h_rows)


def norm_linear_topk(h: torch.Tensor, ln_w: torch.Tensor | None, w: torch.Tensor, eps: float, k: int,
                     config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The top k of each row of RMSNorm(h; ln_w) @ w.T (ln_w None: h @ w.T) within each tile of
    BLOCK_N columns, best first: (values [M, tiles * k] float32, column ids [M, tiles * k] int32).
    The top k of a row is among these tiles * k candidates; the logits never reach memory."""
    return _launch("topk", h, w, w.shape[0], ln=ln_w, eps=eps, top_k=k, config=config)


def norm_qkv_rope(h: torch.Tensor, ln_w: torch.Tensor, w_qkv: torch.Tensor, bias: torch.Tensor | None, eps: float,
                  rope: RopeStore, config=None) -> torch.Tensor:
    """norm_linear onto [q | k | v] with fused.rope_qkv_store's work in the epilogue: q and k
    rotated, k and v written to their cache slots, q returned as [M, q heads, head_dim]. One
    kernel where the two-kernel form writes qkv out and reads it back."""
    assert rope.k_cache.is_contiguous() and rope.v_cache.is_contiguous()
    assert w_qkv.shape[0] == rope.q_cols + 2 * rope.kv_cols and rope.head_dim % 2 == 0
    q = _launch("norm_linear", h, w_qkv, w_qkv.shape[0], bias=bias, ln=ln_w, eps=eps, rope=rope, config=config)
    return q.view(q.shape[0], rope.q_cols // rope.head_dim, rope.head_dim)


def linear_residual(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, config=None) -> torch.Tensor:
    """residual + x @ w.T, written to a new tensor."""
    assert residual.stride(1) == 1 and residual.shape == (x.shape[0], w.shape[0])
    return _launch("linear_residual", x, w, w.shape[0], residual=residual, config=config)
