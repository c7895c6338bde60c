"""The layer's four matmuls for forwards of a few tokens, each fused with its neighbours (Triton).

A decode step at batch 1 (or a small tree) multiplies 1-16 rows by each weight matrix. cuBLAS
takes ~3.8 us a matmul there on an H200 and the norm, activation and residual kernels around
them ~1.0-1.6 us each, for work that reads 1-3.5 MB: the layer is launch-bound, not
bandwidth-bound. Here each matmul takes its neighbours in:

  * norm_linear:      RMSNorm(h) @ W.T          (input norm + fused q/k/v projection)
  * norm_gate_silu:   SiLU(g) * u, [g | u] = RMSNorm(h) @ W.T   (post-attention norm + MLP up)
  * linear_residual:  h + x @ W.T               (o projection, MLP down)

so a layer is four matmul kernels, the RoPE/KV-store kernel and attention: 6 kernels where
the unfused forward has 9. A program owns BLOCK_N output columns of a 16-row tile and reads its
whole K range; the RMS of each row is computed again by every program (K <= a few thousand
floats, nothing next to its weight tile). Rounding follows the torch forms step by step (bf16
after the matmul, after the norm and its scale, after SiLU, after the add), as model/fused.py
does, so the forward agrees with the unfused one up to summation order.

Only for CUDA tensors in bf16/fp16 with at most SMALL_M rows (the model checks `usable`);
tests run the kernels in Triton's interpreter on CPU in float32.
"""
from __future__ import annotations

import functools

import torch

from srt_entmtp.model import fused

SMALL_M = 32      # rows up to which the model takes this path (at 64 the unfused chain wins on the H200)
BLOCK_M = 16      # the smallest tile tl.dot takes; rows past M are masked
# per-op tile shapes (BLOCK_N, BLOCK_K, num_warps, num_stages), the fastest at 1 and 8 rows in
# scripts/bench_small_linear.py --sweep on the H200; the loads are latency-bound, so deep
# pipelining (4 stages) and wide K tiles matter most (a second sweep, over 256-512 wide K tiles
# and 3-5 stages, found at most 0.1 us more; benchmarks/results/small_linear_h200_2026-12-01*.json)
CONFIGS = {"norm_linear": (16, 256, 4, 4), "norm_gate_silu": (32, 256, 4, 4), "linear_residual": (16, 256, 2, 4)}


ENABLED = True    # False: the model's ordinary path at every size (benchmarks' A/B; read at capture)


def usable(x: torch.Tensor) -> bool:
    return ENABLED and fused.enabled(x) and x.dim() == 2 and x.shape[0] <= SMALL_M and _kernel() is not None


@functools.cache
def _kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def small_linear_kernel(x_ptr, w_ptr, bias_ptr, ln_ptr, res_ptr, out_ptr, M, N, K, sx, sr, so, eps,
                            NORM: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok = rm < M
        n_ok = rn < N
        dt = x_ptr.dtype.element_ty
        if NORM:  # each row's 1 / RMS, over the whole row
            ss = tl.zeros([BLOCK_M], tl.float32)
            for k0 in range(0, K, BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=m_ok[:, None] & (rk < K)[None, :],
                             other=0.0).to(tl.float32)
                ss += tl.sum(xt * xt, 1)
            rstd = tl.rsqrt(ss / K + eps)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            xt = tl.load(x_ptr + rm[:, None] * sx + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            if NORM:  # as transformers: normalise in float32, round, then scale and round again
                lw = tl.load(ln_ptr + rk, mask=k_ok, other=0.0).to(tl.float32)
                xt = ((xt.to(tl.float32) * rstd[:, None]).to(dt).to(tl.float32) * lw[None, :]).to(dt)
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
        if RESIDUAL:
            r = tl.load(res_ptr + rm[:, None] * sr + rn[None, :], mask=omask, other=0.0)
            y = (y.to(tl.float32) + r.to(tl.float32)).to(dt)
        tl.store(out_ptr + rm[:, None] * so + rn[None, :], y, mask=omask)

    return triton, small_linear_kernel


def _launch(op: str, x, w, n_out: int, *, bias=None, ln=None, eps=0.0, residual=None, silu=False, config=None):
    triton, kern = _kernel()
    M, K = x.shape
    assert x.stride(1) == 1 and w.is_contiguous() and w.shape[1] == K, "small_linear: row-major x and W"
    bn, bk, warps, stages = config or CONFIGS[op]
    out = torch.empty(M, n_out, dtype=x.dtype, device=x.device)
    if M:
        res = residual if residual is not None else out
        kern[(triton.cdiv(n_out, bn), triton.cdiv(M, BLOCK_M))](
            x, w, bias if bias is not None else w, ln if ln is not None else w, res, out, M, n_out, K, x.stride(0),
            res.stride(0), out.stride(0), eps, NORM=ln is not None, SILU=silu, RESIDUAL=residual is not None,
            HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)
    return out


def norm_linear(h: torch.Tensor, ln_w: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, eps: float,
                config=None) -> torch.Tensor:
    """RMSNorm(h; ln_w) @ w.T (+ bias)."""
    return _launch("norm_linear", h, w, w.shape[0], bias=bias, ln=ln_w, eps=eps, config=config)


def norm_gate_silu(h: torch.Tensor, ln_w: torch.Tensor, w_gate_up: torch.Tensor, eps: float, config=None
                   ) -> torch.Tensor:
    """SiLU(g) * u for [g | u] = RMSNorm(h; ln_w) @ w_gate_up.T (w_gate_up: gate rows, then up rows)."""
    return _launch("norm_gate_silu", h, w_gate_up, w_gate_up.shape[0] // 2, ln=ln_w, eps=eps, silu=True,
                   config=config)


def linear_residual(x: torch.Tensor, w: torch.Tensor, residual: torch.Tensor, config=None) -> torch.Tensor:
    """residual + x @ w.T, written to a new tensor."""
    assert residual.stride(1) == 1 and residual.shape == (x.shape[0], w.shape[0])
    return _launch("linear_residual", x, w, w.shape[0], residual=residual, config=config)
