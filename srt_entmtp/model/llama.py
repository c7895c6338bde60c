"""Native Llama-family forward (Llama, Mistral, Qwen2 with q/k/v bias, Qwen3 with q/k norm).

Written against HF weight names so any checkpoint directory loads without renaming; at load
q/k/v and gate/up are fused into one matrix each (two matmuls fewer per layer). The model
knows nothing of requests: it gets flat tokens and positions, and hands attention to the
backend, which owns the KV cache and masks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from srt_entmtp.errors import ModelLoadError
from srt_entmtp.model import fused, small_linear
from srt_entmtp.model.attention.base import AttentionBackend
from srt_entmtp.model.config import ModelConfig
from srt_entmtp.model.fused import add_rms_norm, rms_norm, rope_qkv_store, rope_torch, silu_mul
from srt_entmtp.model.linear import Linear, onednn_available


def rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies after the checkpoint's rope scaling, and the attention factor."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "default":
        return inv.float(), 1.0
    if kind == "linear":
        return (inv / sc["factor"]).float(), 1.0
    if kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
        return scaled.float(), 1.0
    raise ModelLoadError(f"config.json: rope_scaling type {kind!r} is not supported (default, linear, llama3)")


class LlamaModel:
    """Weights as plain tensors; forward() is a loop over layers with the backend for attention."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                 device: torch.device | str, max_positions: int):
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)

        def take(name: str, optional: bool = False) -> torch.Tensor | None:
            t = state.pop(name, None)
            if t is None:
                if optional:
                    return None
                raise ModelLoadError(f"weights: tensor {name!r} is missing (is this a {cfg.model_type} checkpoint?)")
            return t.to(device=self.device, dtype=dtype).contiguous()

        self.embed = take("model.embed_tokens.weight")
        if tuple(self.embed.shape) != (cfg.vocab_size, cfg.hidden_size):
            raise ModelLoadError(f"weights: model.embed_tokens.weight has shape {tuple(self.embed.shape)}, "
                                 f"config says ({cfg.vocab_size}, {cfg.hidden_size})")
        head = take("lm_head.weight", optional=True)
        self.lm_head = self.embed if head is None or cfg.tie_word_embeddings else head
        self.final_norm = take("model.norm.weight")
        pack = onednn_available(self.device, dtype)
        self.lm_head_linear = Linear(self.lm_head, pack=pack)  # plain self.lm_head stays for drafters
        self.layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            qkv_bias = None
            if cfg.qkv_bias:
                qkv_bias = torch.cat([take(a + "q_proj.bias"), take(a + "k_proj.bias"), take(a + "v_proj.bias")])
            layer = {
                "ln1": take(p + "input_layernorm.weight"),
                "ln2": take(p + "post_attention_layernorm.weight"),
                "qkv": Linear(torch.cat([take(a + "q_proj.weight"), take(a + "k_proj.weight"),
                                         take(a + "v_proj.weight")]), qkv_bias, pack),
                "o": Linear(take(a + "o_proj.weight"), pack=pack),
                "gate_up": Linear(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]),
                                  pack=pack),
                "down": Linear(take(p + "mlp.down_proj.weight"), pack=pack),
                "q_norm": None, "k_norm": None,
            }
            if cfg.qk_norm:
                layer["q_norm"] = take(a + "q_norm.weight")
                layer["k_norm"] = take(a + "k_norm.weight")
            self.layers.append(layer)
        inv, self.attn_factor = rope_inv_freq(cfg)
        pos = torch.arange(max_positions, dtype=torch.float32)
        ang = torch.outer(pos, inv)
        emb = torch.cat([ang, ang], dim=-1)
        self.cos = emb.cos().to(self.device)
        sin = emb.sin()
        half = cfg.head_dim // 2
        self.sin_signed = torch.cat([-sin[:, :half], sin[:, half:]], dim=-1).to(self.device)
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                hidden_indices: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [M, hidden] of the tokens in hidden_indices (all if None)."""
        cfg = self.cfg
        H, Hk, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        n = input_ids.shape[0]
        h = F.embedding(input_ids, self.embed)
        qk_size = self.q_size + self.kv_size
        fused_rope = fused.enabled(h) and not self.cfg.qk_norm
        if fused_rope and small_linear.usable(h):
            return self._forward_few_tokens(h, positions, attn, hidden_indices)
        if fused_rope and small_linear.mid_usable(h):
            return self._forward_mid_tokens(h, positions, attn, hidden_indices)
        if not fused_rope:
            cos = self.cos[positions].to(self.dtype).unsqueeze(1)  # [N, 1, d], shared by all heads
            sin = self.sin_signed[positions].to(self.dtype).unsqueeze(1)
        pending = None  # the last MLP's output, added to h inside the next norm (one kernel on GPU)
        for i, L in enumerate(self.layers):
            if pending is None:
                x = rms_norm(h, L["ln1"], eps)
            else:
                x, h = add_rms_norm(pending, h, L["ln1"], eps)
            qkv = L["qkv"](x)
            v = qkv[:, qk_size:].view(n, Hk, d)
            if fused_rope:  # one kernel rotates q and k and writes k and v into the cache
                kc, vc, slots = attn.cache_target(i)
                q = rope_qkv_store(qkv.view(n, H + 2 * Hk, d), H, Hk, positions, self.cos, self.sin_signed, kc, vc,
                                   slots)
                k = v = None
            elif L["q_norm"] is None:
                qk = rope_torch(qkv[:, :qk_size].view(n, H + Hk, d), cos, sin)
                q, k = qk[:, :H], qk[:, H:]
            else:
                q = rope_torch(rms_norm(qkv[:, :self.q_size].view(n, H, d), L["q_norm"], eps), cos, sin)
                k = rope_torch(rms_norm(qkv[:, self.q_size:qk_size].view(n, Hk, d), L["k_norm"], eps), cos, sin)
            x, h = add_rms_norm(L["o"](attn.run(i, q, k, v)), h, L["ln2"], eps)
            pending = L["down"](silu_mul(L["gate_up"](x)))
        if hidden_indices is not None:
            return rms_norm((h + pending)[hidden_indices], self.final_norm, eps)
        return add_rms_norm(pending, h, self.final_norm, eps)[0]

    def _forward_few_tokens(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                            hidden_indices: torch.Tensor | None) -> torch.Tensor:
        """forward() for decode steps and small trees (<= small_linear.SMALL_M tokens): five kernels
        a layer (norm+qkv+RoPE+KV store, attention, o+residual, norm+gate/up+SiLU, down+residual),
        six with small_linear.ROPE_IN_QKV off (RoPE and the KV store in a kernel of their own)."""
        cfg, sl = self.cfg, small_linear
        H, Hk, d, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        n = h.shape[0]
        for i, L in enumerate(self.layers):
            kc, vc, slots = attn.cache_target(i)
            if sl.ROPE_IN_QKV:
                q = sl.norm_qkv_rope(h, L["ln1"], L["qkv"].weight, L["qkv"].bias, eps, sl.RopeStore(
                    positions, self.cos, self.sin_signed, kc, vc, slots, self.q_size, self.kv_size, d))
            else:
                qkv = sl.norm_linear(h, L["ln1"], L["qkv"].weight, L["qkv"].bias, eps)
                q = rope_qkv_store(qkv.view(n, H + 2 * Hk, d), H, Hk, positions, self.cos, self.sin_signed, kc, vc,
                                   slots)
            h = sl.linear_residual(attn.run(i, q, None, None), L["o"].weight, h)
            h = sl.linear_residual(sl.norm_gate_silu(h, L["ln2"], L["gate_up"].weight, eps), L["down"].weight, h)
        return rms_norm(h if hidden_indices is None else h[hidden_indices], self.final_norm, eps)

    def _forward_mid_tokens(self, h: torch.Tensor, positions: torch.Tensor, attn: AttentionBackend,
                            hidden_indices: torch.Tensor | None) -> torch.Tensor:
        """forward() for tree verification of SMALL_M-MID_M tokens (33-64: batch 8 of 5-8-slot
        trees): norm + q/k/v + RoPE + KV store and o + residual as in _forward_few_tokens (their
        Triton tiles keep pace with cuBLAS at these rows), the MLP on cuBLAS (the Triton tiles fall
        behind on its two wide matmuls) with the residual added in the down projection's epilogue
        (addmm: one rounding where the unfused forward rounds the product, then the sum). Eight
        kernels a layer where the unfused forward has ten."""
        cfg, sl = self.cfg, small_linear
        d, eps = cfg.head_dim, cfg.rms_norm_eps
        for i, L in enumerate(self.layers):
            kc, vc, slots = attn.cache_target(i)
            q = sl.norm_qkv_rope(h, L["ln1"], L["qkv"].weight, L["qkv"].bias, eps, sl.RopeStore(
                positions, self.cos, self.sin_signed, kc, vc, slots, self.q_size, self.kv_size, d))
            h = sl.linear_residual(attn.run(i, q, None, None), L["o"].weight, h)
            h = torch.addmm(h, silu_mul(L["gate_up"](rms_norm(h, L["ln2"], eps))), L["down"].weight.t())
        return rms_norm(h if hidden_indices is None else h[hidden_indices], self.final_norm, eps)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits (entropy and sampling want float32 anyway)."""
        return self.lm_head_linear(hidden).float()
