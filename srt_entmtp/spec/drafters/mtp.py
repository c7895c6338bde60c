"""Shared MTP head (FastMTP-style): one block, weights shared across steps, applied recursively.

s_0 = h_t;  u = P [norm(s_{d-1}); norm(E x_{t+d})];  s_d = u + Down(SiLU(Gate n(u)) * Up n(u));
logits_d = LM_head(norm_f(s_d)) predicts x_{t+1+d}. Because the block is the same at every
step it can be unrolled to any depth; `trained_depth` says how far training unrolled it. By
default it projects onto a compressed draft vocabulary (rows of the base LM head gathered at
load), which is most of its cost saved on CPU.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from srt_entmtp.model import small_linear
from srt_entmtp.spec.drafters import fused_draft
from srt_entmtp.spec.drafters.base import UNBOUNDED_DEPTH, Drafter, init_normal_, rms


class MTPDrafter(Drafter):
    kind = "mtp"
    sequential = True

    def __init__(self, base: Any, *, intermediate_size: int = 1024, train_depth: int = 5, seed: int = 0,
                 draft_vocab: torch.Tensor | None = None, base_name: str | None = None):
        super().__init__(base, draft_vocab=draft_vocab, base_name=base_name)
        if intermediate_size < 1 or train_depth < 1:
            raise ValueError(f"intermediate_size ({intermediate_size}) and train_depth ({train_depth}) must be >= 1")
        H, I = self.hidden_size, intermediate_size
        self.intermediate_size, self.train_depth, self.seed = I, train_depth, seed
        dev = self.lm_head.device
        g = torch.Generator(device=dev).manual_seed(seed)
        self.norm_state = nn.Parameter(torch.ones(H, device=dev))
        self.norm_emb = nn.Parameter(torch.ones(H, device=dev))
        proj = torch.zeros(H, 2 * H, device=dev)
        init_normal_(proj[:, H:], 2 * H, generator=g)
        proj[:, :H] += torch.eye(H, device=dev)   # starts close to "carry the state over"
        self.proj = nn.Parameter(proj)
        self.norm_mlp = nn.Parameter(torch.ones(H, device=dev))
        self.gate_up = nn.Parameter(torch.empty(2 * I, H, device=dev))
        init_normal_(self.gate_up, H, generator=g)
        self.down = nn.Parameter(torch.zeros(H, I, device=dev))
        self.norm_out = nn.Parameter(self.base_final_norm.detach().float().clone())

    @property
    def max_depth(self) -> int:
        return UNBOUNDED_DEPTH

    @property
    def trained_depth(self) -> int:
        return self.train_depth

    def arch(self) -> dict:
        return {"intermediate_size": self.intermediate_size, "train_depth": self.train_depth}

    def step(self, d: int, state: torch.Tensor, token_emb: torch.Tensor) -> torch.Tensor:
        z = torch.cat([rms(state, self.norm_state, self.eps), rms(token_emb, self.norm_emb, self.eps)], dim=-1)
        u = self.linear("proj", z, self.proj)
        g, v = self.linear("gate_up", rms(u, self.norm_mlp, self.eps), self.gate_up).chunk(2, dim=-1)
        return u + self.linear("down", F.silu(g) * v, self.down)

    def state_logits(self, d: int, state: torch.Tensor) -> torch.Tensor:
        return self.project(rms(state, self.norm_out, self.eps))

    fused_logits = True

    def logits_norm(self, d: int) -> torch.Tensor:
        return self.norm_out

    def split_projection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(P[:, :H], T): the block's input projection split at the concatenation's seam, the
        token's half precomputed for every token v, T[v] = P[:, H:] @ RMSNorm(E[v]; norm_emb),
        since it depends on the token alone. T is float32, the accumulator's type, so that adding
        the state's half and rounding once is the torch form's one matmul up to summation order.
        Built once, outside CUDA graph capture (the capture's warm-up runs first), and again if the
        weights change; None while a capture is under way without it (fused_step then projects the
        embedding itself)."""
        key = (self.proj._version, self.norm_emb._version, self.embed._version, self.proj.data_ptr())
        hit = self.__dict__.get("_split_projection")
        if hit is not None and hit[0] == key:
            return hit[1]
        if self.proj.is_cuda and torch.cuda.is_current_stream_capturing():
            return None
        with torch.no_grad():
            H = self.hidden_size
            table = F.linear(rms(self.embed, self.norm_emb, self.eps).float(), self.proj[:, H:].float()).contiguous()
            split = (self.proj[:, :H].contiguous(), table)
        self.__dict__["_split_projection"] = (key, split)
        return split

    gathers_rows = True  # fused_step(rows=...) reads its states' rows in its first kernel

    def fused_step(self, d: int, state: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor | None = None
                   ) -> torch.Tensor:
        """step() in three kernels (model/small_linear.py), for the few rows of a GPU draft level;
        rows (optional): the step's states are state[rows], gathered by the first kernel's loads."""
        n = rows.shape[0] if rows is not None else state.shape[0]
        if not (small_linear.usable(state, n) and self.embed.dtype == state.dtype == self.proj.dtype):
            return super().fused_step(d, state, tokens, rows)
        cfg = fused_draft.CONFIGS
        split = self.split_projection() if fused_draft.TOKEN_TABLE else None
        if split is not None:  # the state's half of the projection, plus the token's row of the table
            proj_state, table = split
            u = small_linear.norm_linear_add_rows(state, self.norm_state, proj_state, self.eps, table, tokens,
                                                  config=cfg["proj"], h_rows=rows)
        else:
            u = small_linear.norm2_linear(state, self.norm_state, self.embed, tokens, self.norm_emb, self.proj,
                                          self.eps, config=cfg["proj"], a_rows=rows)
        act = small_linear.norm_gate_silu(u, self.norm_mlp, self.gate_up, self.eps, config=cfg["gate_up"])
        return small_linear.linear_residual(act, self.down, u, config=cfg["down"])
