"""Picking the next token from logits, per request: greedy, or temperature / top-k / top-p.

Uses the same filters as tree verification (spec/sampling.py), so plain decoding and
speculative decoding sample from exactly the same distribution. Rows are filtered together;
only the final draw is per request when a request carries its own seeded generator, so a
seeded request is reproducible whatever it is batched with.
"""
from __future__ import annotations

import torch

from srt_entmtp.spec.sampling import apply_sampling_filters, sample_from


def sample(logits: torch.Tensor, params: list, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One token per row. params: objects with temperature/top_p/top_k (SamplingParams)."""
    if all(p.temperature <= 0 for p in params):
        return logits.argmax(-1)
    dev = logits.device
    probs = apply_sampling_filters(logits, torch.tensor([p.temperature for p in params], device=dev),
                                   torch.tensor([p.top_p for p in params], device=dev),
                                   torch.tensor([p.top_k for p in params], device=dev))
    out = sample_from(probs)  # greedy rows are one-hot, so any draw returns their argmax
    for i, g in enumerate(generators):
        if g is not None and params[i].temperature > 0:
            out[i] = sample_from(probs[i:i + 1].cpu(), g).to(dev)[0]
    return out
