"""Fused elementwise kernels for the GPU forward (Triton), with the torch forms they replace.

At batch 1 a 135M model's layer is ~20 tiny kernels and the GPU time is mostly launch gaps,
even inside a CUDA graph (~2.4 us a kernel on an H200). Three fusions take a layer to ~11:

  * add_rms_norm: residual add + RMSNorm (2 kernels; the transformers form of RMSNorm alone is 7);
  * rope_qk: rotary embedding of q and k heads straight out of the fused qkv projection, writing
    contiguous q and k (5 kernels);
  * silu_mul: SiLU(gate) * up (2 kernels).

Each kernel rounds where the torch form rounds (bf16 after every op; RMSNorm in float32, cast
back, then scaled, as transformers does), so the fused and unfused forwards agree up to the
last bit of float32 rsqrt/exp/sum order. The torch forms run on CPU, in float32, and wherever
Triton is missing; `enabled(x)` says which one a tensor gets.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from srt_entmtp.model import pdl


@functools.cache
def _triton():
    try:
        import triton.language  # noqa: F401  (also imports triton)
    except ImportError:
        return None
    return _build_kernels()


# ENTMTP_FUSED_KERNELS=0 runs the torch forms on the GPU too (tests flip this to compare)
DISABLED = os.environ.get("ENTMTP_FUSED_KERNELS", "1") == "0"


def enabled(x: torch.Tensor) -> bool:
    return not DISABLED and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and _triton() is not None


# ---- torch forms (CPU, float32, no Triton) -----------------------------------------------------------

def rms_norm_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    # as transformers: normalise in float32, cast back, then scale (bit-compatible in bf16)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return w * x32.to(x.dtype)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) * sin written as
    roll(x, d/2) * [-sin_1, sin_2]: the same products (negation is exact)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, dims=-1) * sin_signed


# ---- the public ops ------------------------------------------------------------------------------------

def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    if not enabled(x):
        return rms_norm_torch(x, w, eps)
    return _triton().add_rms_norm(x, None, w, eps)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, w: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x)."""
    if not enabled(x):
        h = residual + x
        return rms_norm_torch(h, w, eps), h
    return _triton().add_rms_norm(x, residual, w, eps)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up for gate_up = [gate | up] along the last axis."""
    if not enabled(gate_up):
        g, u = gate_up.chunk(2, dim=-1)
        return F.silu(g) * u
    return _triton().silu_mul(gate_up)


def rope_qk(qk: torch.Tensor, num_q_heads: int, positions: torch.Tensor, cos: torch.Tensor,
            sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of qk = [n, q_heads + k_heads, d] (a view into qkv is fine), returning
    contiguous q [n, q_heads, d] and k [n, k_heads, d]. cos / sin_signed: float32 [positions, d]
    tables, rounded to qk's dtype before use (as the torch form does). Only where enabled(qk):
    elsewhere the model gathers cos / sin once per forward and calls rope_torch per layer."""
    return _triton().rope_qk(qk, num_q_heads, positions, cos, sin_signed)


def rope_qkv_store(qkv: torch.Tensor, num_q_heads: int, num_kv_heads: int, positions: torch.Tensor, cos: torch.Tensor,
                   sin_signed: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slots: torch.Tensor) -> torch.Tensor:
    """rope_qk for qkv = [n, q_heads + 2 kv_heads, d] that also stores the rotated k and the v
    heads straight into k_cache / v_cache ([slots, kv_heads, d]) at each token's slot, saving the
    two KV-write kernels per layer; returns contiguous q. Only where enabled(qkv)."""
    return _triton().rope_qkv_store(qkv, num_q_heads, num_kv_heads, positions, cos, sin_signed, k_cache, v_cache,
                                    slots)


# ---- Triton kernels --------------------------------------------------------------------------------------

def _build_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, h_ptr, sx, sr, so, sh, n_cols, eps,
                             HAS_RES: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
        if PDL:  # model/pdl.py
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        m = cols < n_cols
        x = tl.load(x_ptr + row * sx + cols, mask=m, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * sr + cols, mask=m, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the bf16 residual add
            tl.store(h_ptr + row * sh + cols, x, mask=m)
        x32 = x.to(tl.float32)
        var = tl.sum(x32 * x32, axis=0) / n_cols
        y = (x32 * tl.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=m, other=0.0)
        tl.store(out_ptr + row * so + cols, (y.to(tl.float32) * w.to(tl.float32)).to(x.dtype), mask=m)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n_cols, sg, so, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < n_cols
        g = tl.load(gu_ptr + row * sg + cols, mask=m, other=0.0)
        u = tl.load(gu_ptr + row * sg + n_cols + cols, mask=m, other=0.0)
        g32 = g.to(tl.float32)
        s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype)
        tl.store(out_ptr + row * so + cols, (s.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)

    @triton.jit
    def _rope_kernel(qk_ptr, pos_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, s_tok, s_head, n_q_heads, n_k_heads,
                     D: tl.constexpr, HALF: tl.constexpr):
        t = tl.program_id(0)
        hd = tl.program_id(1)
        p = tl.load(pos_ptr + t)
        cols = tl.arange(0, D)
        base = qk_ptr + t * s_tok + hd * s_head
        x = tl.load(base + cols)
        xr = tl.load(base + (cols + HALF) % D)  # roll by d/2
        c = tl.load(cos_ptr + p * D + cols).to(x.dtype).to(tl.float32)
        s = tl.load(sin_ptr + p * D + cols).to(x.dtype).to(tl.float32)
        a = (x.to(tl.float32) * c).to(x.dtype)
        b = (xr.to(tl.float32) * s).to(x.dtype)
        out = (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)
        if hd < n_q_heads:
            tl.store(q_ptr + (t * n_q_heads + hd) * D + cols, out)
        else:
            tl.store(k_ptr + (t * n_k_heads + hd - n_q_heads) * D + cols, out)

    @triton.jit
    def _rope_store_kernel(qkv_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, q_ptr, kc_ptr, vc_ptr, s_tok, s_head,
                           n_q_heads, n_k_heads, D: tl.constexpr, HALF: tl.constexpr, PDL: tl.constexpr):
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        t = tl.program_id(0)
        hd = tl.program_id(1)
        cols = tl.arange(0, D)
        base = qkv_ptr + t * s_tok + hd * s_head
        x = tl.load(base + cols)
        if hd >= n_q_heads + n_k_heads:  # a v head: copied as it is
            slot = tl.load(slot_ptr + t)
            tl.store(vc_ptr + (slot * n_k_heads + hd - n_q_heads - n_k_heads) * D + cols, x)
        else:
            p = tl.load(pos_ptr + t)
            xr = tl.load(base + (cols + HALF) % D)
            c = tl.load(cos_ptr + p * D + cols).to(x.dtype).to(tl.float32)
            s = tl.load(sin_ptr + p * D + cols).to(x.dtype).to(tl.float32)
            a = (x.to(tl.float32) * c).to(x.dtype)
            b = (xr.to(tl.float32) * s).to(x.dtype)
            out = (a.to(tl.float32) + b.to(tl.float32)).to(x.dtype)
            if hd < n_q_heads:
                tl.store(q_ptr + (t * n_q_heads + hd) * D + cols, out)
            else:
                slot = tl.load(slot_ptr + t)
                tl.store(kc_ptr + (slot * n_k_heads + hd - n_q_heads) * D + cols, out)

    class Kernels:
        @staticmethod
        def add_rms_norm(x, residual, w, eps):
            n_cols = x.shape[-1]
            x2 = x.reshape(-1, n_cols)
            out = torch.empty_like(x2)
            if residual is None:
                r2, h = x2, out  # unused
            else:
                r2 = residual.reshape(-1, n_cols)
                h = torch.empty_like(x2)
            rows = x2.shape[0]
            if rows:
                use_pdl = pdl.on(x2)
                _add_rms_norm_kernel[(rows,)](x2, r2, w, out, h, x2.stride(0), r2.stride(0), out.stride(0),
                                              h.stride(0), n_cols, eps, HAS_RES=residual is not None,
                                              BLOCK=triton.next_power_of_2(n_cols), PDL=use_pdl,
                                              **pdl.launch_kw(use_pdl))
            return out.view(x.shape), (None if residual is None else h.view(x.shape))

        @staticmethod
        def silu_mul(gu):
            n_cols = gu.shape[-1] // 2
            g2 = gu.reshape(-1, 2 * n_cols)
            out = torch.empty(g2.shape[0], n_cols, dtype=gu.dtype, device=gu.device)
            block = 1024
            if g2.shape[0]:
                _silu_mul_kernel[(g2.shape[0], triton.cdiv(n_cols, block))](g2, out, n_cols, g2.stride(0),
                                                                           out.stride(0), BLOCK=block)
            return out.view(*gu.shape[:-1], n_cols)

        @staticmethod
        def rope_qk(qk, n_q, positions, cos, sin_signed):
            n, heads, d = qk.shape
            assert qk.stride(2) == 1 and d % 2 == 0 and (d & (d - 1)) == 0, "rope_qk: head_dim a power of two"
            q = torch.empty(n, n_q, d, dtype=qk.dtype, device=qk.device)
            k = torch.empty(n, heads - n_q, d, dtype=qk.dtype, device=qk.device)
            if n:
                _rope_kernel[(n, heads)](qk, positions, cos, sin_signed, q, k, qk.stride(0), qk.stride(1), n_q,
                                         heads - n_q, D=d, HALF=d // 2)
            return q, k

        @staticmethod
        def rope_qkv_store(qkv, n_q, n_kv, positions, cos, sin_signed, kc, vc, slots):
            n, heads, d = qkv.shape
            assert qkv.stride(2) == 1 and heads == n_q + 2 * n_kv and (d & (d - 1)) == 0
            assert kc.is_contiguous() and vc.is_contiguous() and kc.shape[1:] == (n_kv, d)
            q = torch.empty(n, n_q, d, dtype=qkv.dtype, device=qkv.device)
            if n:
                use_pdl = pdl.on(qkv)
                _rope_store_kernel[(n, heads)](qkv, positions, slots, cos, sin_signed, q, kc, vc, qkv.stride(0),
                                               qkv.stride(1), n_q, n_kv, D=d, HALF=d // 2, PDL=use_pdl,
                                               **pdl.launch_kw(use_pdl))
            return q

    # the jitted kernels themselves, for tests that compile them for a GPU target (tests/model/compile_sm90.py)
    Kernels.add_rms_norm_kernel = _add_rms_norm_kernel
    Kernels.rope_store_kernel = _rope_store_kernel
    return Kernels
