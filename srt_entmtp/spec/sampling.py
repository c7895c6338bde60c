"""Per-request sampling filters and a sampler that never divides by zero.

Shared by tree verification and the engine's plain sampler, so the speculative and the
autoregressive paths sample from exactly the same distribution (which is what "lossless" means).
"""
from __future__ import annotations

import torch


def _per_row(x: torch.Tensor | float | None, rows: int, dtype: torch.dtype, device, default) -> torch.Tensor:
    if x is None:
        x = default
    return torch.as_tensor(x, dtype=dtype, device=device).reshape(-1).expand(rows)


def apply_sampling_filters(logits: torch.Tensor, temperature: torch.Tensor | float,
                           top_p: torch.Tensor | float | None = None,
                           top_k: torch.Tensor | int | None = None) -> torch.Tensor:
    """Probabilities (float32, [B, V]) after temperature, then top-k, then top-p (HF order).

    temperature <= 0 means greedy: a one-hot at the first argmax. top_k <= 0 or >= V and
    top_p >= 1 switch those filters off. Tokens tied with the k-th / nucleus boundary are kept.
    """
    x = logits.float()
    B, V = x.shape
    dev = x.device
    temp = _per_row(temperature, B, torch.float32, dev, 1.0)
    k = _per_row(top_k, B, torch.long, dev, 0)
    p = _per_row(top_p, B, torch.float32, dev, 1.0)
    greedy = temp <= 0
    x = x / torch.where(greedy, 1.0, temp).unsqueeze(1)
    use_k = (k > 0) & (k < V)
    use_p = p < 1
    if bool((use_k | use_p).any()):  # one host sync buys skipping a [B, V] sort
        ordered = x.sort(dim=1, descending=True).values
        kth = ordered.gather(1, (k - 1).clamp(0, V - 1).unsqueeze(1))
        cut_k = use_k.unsqueeze(1)
        x = x.masked_fill(cut_k & (x < kth), float("-inf"))
        ordered = ordered.masked_fill(cut_k & (ordered < kth), float("-inf"))
        sp = ordered.softmax(dim=1)
        before = sp.cumsum(dim=1) - sp  # mass strictly ahead of each sorted token
        drop = before >= p.unsqueeze(1)
        drop[:, 0] = False
        keep_n = (~drop).sum(dim=1, keepdim=True)
        floor = ordered.gather(1, keep_n - 1)
        x = x.masked_fill(use_p.unsqueeze(1) & (x < floor), float("-inf"))
    probs = x.softmax(dim=1)
    onehot = torch.zeros_like(probs).scatter_(1, logits.argmax(dim=1, keepdim=True), 1.0)
    return torch.where(greedy.unsqueeze(1), onehot, probs)


def sample_from(weights: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from unnormalised non-negative weights [B, V] (inverse CDF in float64).

    Rows of all zeros return an arbitrary index instead of raising, so callers can sample every
    row and keep only the ones they need.
    """
    cdf = weights.double().cumsum(dim=1)
    u = torch.rand(weights.shape[0], dtype=torch.float64, device=weights.device, generator=generator)
    target = (u * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=weights.shape[1] - 1)
