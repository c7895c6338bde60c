"""Medusa heads: K independent heads, head d = residual SiLU block(s) on h_t, then the base LM head.

Head d predicts x_{t+1+d} from h_t alone, so a tree's node (d, r) is head d's r-th candidate
whatever its parent, and one batched pass computes all K heads for every request. W starts at
zero, so an untrained head is exactly the base model's LM head (Medusa's initialisation).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srt_entmtp.spec.drafters.base import Drafter


class MedusaDrafter(Drafter):
    kind = "medusa"
    sequential = False

    def __init__(self, base: Any, *, num_heads: int = 5, num_layers: int = 1,
                 draft_vocab: torch.Tensor | None = None, base_name: str | None = None):
        super().__init__(base, draft_vocab=draft_vocab, base_name=base_name)
        if num_heads < 1 or num_layers < 1:
            raise ValueError(f"num_heads ({num_heads}) and num_layers ({num_layers}) must be >= 1")
        H = self.hidden_size
        self.num_heads, self.num_layers = num_heads, num_layers
        dev = self.lm_head.device
        self.weight = nn.Parameter(torch.zeros(num_heads, num_layers, H, H, device=dev))
        self.bias = nn.Parameter(torch.zeros(num_heads, num_layers, H, device=dev))

    @property
    def max_depth(self) -> int:
        return self.num_heads

    def arch(self) -> dict:
        return {"num_heads": self.num_heads, "num_layers": self.num_layers}

    def head_states(self, hidden: torch.Tensor, depths: int) -> torch.Tensor:
        """[depths, N, H]: every head's residual stack over the same h_t, as batched matmuls."""
        x = hidden.unsqueeze(0).expand(depths, *hidden.shape)
        for layer in range(self.num_layers):
            w = self.weight[:depths, layer]                       # [D, H, H]
            b = self.bias[:depths, layer].unsqueeze(1)            # [D, 1, H]
            if torch.is_autocast_enabled(x.device.type):
                y = torch.bmm(x, w.transpose(1, 2)) + b
            else:
                y = torch.baddbmm(b.to(x.dtype), x, w.transpose(1, 2).to(x.dtype))
            x = x + F.silu(y)
        return x

    def head_logits(self, hidden: torch.Tensor, depths: int) -> torch.Tensor:
        return self.project(self.head_states(hidden, depths))
