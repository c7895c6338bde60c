"""Picking the next token from logits, per request: greedy, or temperature / top-k / top-p.

Rows are filtered together; only the final draw is per request when a request carries its own
seeded generator (so a seeded request is reproducible whatever it is batched with).
"""
from __future__ import annotations

import torch


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 top_k: torch.Tensor) -> torch.Tensor:
    """float32 probabilities after temperature, top-k (0 = off) and top-p (1 = off); rows with
    temperature 0 become one-hot on the argmax."""
    logits = logits.float()
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    x = logits / t[:, None]
    V = x.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    if bool((k < V).any()) or bool((top_p < 1).any()):
        sorted_x, order = x.sort(dim=-1, descending=True)
        ranks = torch.arange(V, device=x.device)[None, :]
        drop = ranks >= k[:, None]
        p = sorted_x.softmax(-1)
        # keep the smallest prefix whose mass reaches top_p (the token crossing it stays)
        drop |= (p.cumsum(-1) - p) >= top_p[:, None].float()
        sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, order, sorted_x)
    probs = x.softmax(-1)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample(logits: torch.Tensor, params: list, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row. params: objects with temperature/top_p/top_k (SamplingParams)."""
    if all(p.temperature <= 0 for p in params):
        return logits.argmax(-1)
    dev = logits.device
    temp = torch.tensor([p.temperature for p in params], device=dev)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    top_k = torch.tensor([p.top_k for p in params], device=dev, dtype=torch.long)
    probs = filter_probs(logits, temp, top_p, top_k)
    out = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    shared = [i for i in sampled if generators[i] is None]
    if shared:
        out[shared] = torch.multinomial(probs[shared], 1).view(-1)
    for i in sampled:
        if generators[i] is not None:
            out[i] = torch.multinomial(probs[i].cpu(), 1, generator=generators[i]).to(dev).view(())
    return out
