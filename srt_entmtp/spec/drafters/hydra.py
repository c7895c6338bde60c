"""Hydra heads (Hydra++-style, running prefix state): head d sees h_t and the path's embeddings.

s_0 = h_t;  s_d = s_{d-1} + W2_d SiLU(W1_d [norm(s_{d-1}); norm(E x_{t+d})] + b1_d);
logits_d = LM_head(s_d) predicts x_{t+1+d}. Each depth has its own weights (unlike MTP), the
embedding E and LM head are the base model's, shared. s_d summarises the whole prefix
h_t, x_{t+1}..x_{t+d}, so head d is conditioned on the drafted path (Hydra's point), and W2
starts at zero so an untrained head is the base LM head. In a tree, the state of each internal
node is computed once and shared by its children: one batched pass per depth.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srt_entmtp.spec.drafters.base import Drafter, init_normal_, rms


class HydraDrafter(Drafter):
    kind = "hydra"
    sequential = True

    def __init__(self, base: Any, *, num_heads: int = 5, intermediate_size: int = 320, seed: int = 0,
                 draft_vocab: torch.Tensor | None = None, base_name: str | None = None):
        super().__init__(base, draft_vocab=draft_vocab, base_name=base_name)
        if num_heads < 1 or intermediate_size < 1:
            raise ValueError(f"num_heads ({num_heads}) and intermediate_size ({intermediate_size}) must be >= 1")
        H, I, K = self.hidden_size, intermediate_size, num_heads
        self.num_heads, self.intermediate_size, self.seed = K, I, seed
        dev = self.lm_head.device
        self.norm_state = nn.Parameter(torch.ones(K, H, device=dev))
        self.norm_emb = nn.Parameter(torch.ones(K, H, device=dev))
        self.w1 = nn.Parameter(torch.empty(K, I, 2 * H, device=dev))
        self.b1 = nn.Parameter(torch.zeros(K, I, device=dev))
        self.w2 = nn.Parameter(torch.zeros(K, H, I, device=dev))
        g = torch.Generator(device=dev).manual_seed(seed)
        init_normal_(self.w1, 2 * H, generator=g)

    @property
    def max_depth(self) -> int:
        return self.num_heads

    def arch(self) -> dict:
        return {"num_heads": self.num_heads, "intermediate_size": self.intermediate_size}

    def step(self, d: int, state: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        i = d - 1
        z = torch.cat([rms(state, self.norm_state[i], self.eps), rms(token_emb, self.norm_emb[i], self.eps)], dim=-1)
        h = F.silu(self.linear(f"w1.{i}", z, self.w1[i], self.b1[i]))
        return state + self.linear(f"w2.{i}", h, self.w2[i])

    def state_logits(self, d: int, state: torch.Tensor) -> torch.Tensor:
        return self.project(state)

    fused_logits = True

    def logits_norm(self, d: int) -> None:
        return None
