"""Next-token entropy and a rolling per-request estimate of it.

The verify pass already holds the target's logits at every accepted position, so the entropy
of those distributions is a free signal of how predictable the text is right now; the policy
picks deeper trees when it is low. The tracker keeps its state for all scheduler slots in
tensors on the model's device, and folds in each step's ragged list of new entropies with
vectorised closed forms (no Python loop per token, no host sync).
"""
from __future__ import annotations

import torch

MODES = ("ema", "window", "max")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats over the last axis, computed in float32 (safe for bf16/fp16 logits).

    Tokens masked to -inf contribute 0 rather than NaN.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    plogp = torch.where(logp > float("-inf"), logp.exp() * logp, 0.0)
    return -plogp.sum(dim=-1)


class EntropyTracker:
    """Rolling entropy per slot: an EMA and a sliding window of the last `window` values.

    The EMA starts at `init` (a prior that fades as a^k), and every new value h updates it as
    ema <- a * ema + (1 - a) * h in arrival order. `value` reports the EMA, the window mean, or
    (mode "max") the larger of the two, which reacts to a sudden rise in entropy fast while
    ignoring a single low outlier. With `draft_mix` = m > 0, the latest draft-head entropy d (a
    look-ahead signal available before verification) is blended in: (1 - m) * value + m * d.
    Before any observation `value` is `init`.
    """

    def __init__(self, capacity: int, mode: str = "ema", ema_decay: float = 0.7, window: int = 8,
                 init: float = 2.0, draft_mix: float = 0.0, device: torch.device | str = "cpu"):
        if mode not in MODES:
            raise ValueError(f"entropy estimator mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if not 0.0 <= draft_mix <= 1.0:
            raise ValueError(f"draft_mix must be in [0, 1], got {draft_mix}")
        self.mode, self.decay, self.init, self.draft_mix = mode, float(ema_decay), float(init), float(draft_mix)
        self.capacity, self.W = capacity, window
        self.ema = torch.full((capacity,), self.init, dtype=torch.float32, device=device)
        self.window = torch.zeros(capacity, window, dtype=torch.float32, device=device)
        self.count = torch.zeros(capacity, dtype=torch.long, device=device)
        self.draft = torch.full((capacity,), self.init, dtype=torch.float32, device=device)
        self.has_draft = torch.zeros(capacity, dtype=torch.bool, device=device)

    def reset(self, slots: torch.Tensor) -> None:
        """Forget everything about `slots` (a new request took them)."""
        self.ema[slots] = self.init
        self.window[slots] = 0.0
        self.count[slots] = 0
        self.draft[slots] = self.init
        self.has_draft[slots] = False

    def update(self, slots: torch.Tensor, entropies_flat: torch.Tensor, indptr: torch.Tensor) -> None:
        """Append request i's new entropies entropies_flat[indptr[i]:indptr[i+1]], in order."""
        dev = self.ema.device
        slots = slots.to(dev)
        h = entropies_flat.to(device=dev, dtype=torch.float32)
        indptr = indptr.to(dev)
        k = indptr[1:] - indptr[:-1]                                    # new values per request
        req = torch.repeat_interleave(torch.arange(k.numel(), device=dev), k, output_size=h.numel())
        j = torch.arange(h.numel(), device=dev) - indptr[:-1][req]      # index within the request
        from_end = (k[req] - 1 - j).to(torch.float32)                   # newer values come later
        a = self.decay
        weights = (1.0 - a) * torch.pow(torch.tensor(a, device=dev), from_end)
        fresh = torch.zeros(k.numel(), dtype=torch.float32, device=dev).index_add_(0, req, weights * h)
        self.ema[slots] = torch.pow(torch.tensor(a, device=dev), k.to(torch.float32)) * self.ema[slots] + fresh

        # ring buffer: only the last W values of a request can survive, so write only those
        # (duplicate targets in one index_put would have no defined winner)
        keep = from_end < self.W
        pos = (self.count[slots][req] + j) % self.W
        self.window.index_put_((slots[req][keep], pos[keep]), h[keep])
        self.count[slots] += k

    def update_draft(self, slots: torch.Tensor, draft_entropy: torch.Tensor) -> None:
        """Record the drafter's latest entropy for `slots` (used only when draft_mix > 0)."""
        slots = slots.to(self.ema.device)
        self.draft[slots] = draft_entropy.to(device=self.ema.device, dtype=torch.float32)
        self.has_draft[slots] = True

    def window_mean(self, slots: torch.Tensor) -> torch.Tensor:
        n = self.count[slots].clamp(max=self.W)
        total = self.window[slots].sum(dim=1)
        return torch.where(n > 0, total / n.clamp(min=1), self.init)

    def value(self, slots: torch.Tensor) -> torch.Tensor:
        """FloatTensor[B]: the estimate the policy sees for `slots`."""
        slots = slots.to(self.ema.device)
        if self.mode == "ema":
            est = self.ema[slots]
        elif self.mode == "window":
            est = self.window_mean(slots)
        else:
            est = torch.maximum(self.ema[slots], self.window_mean(slots))
        if self.draft_mix > 0:
            mixed = (1.0 - self.draft_mix) * est + self.draft_mix * self.draft[slots]
            est = torch.where(self.has_draft[slots], mixed, est)
        return est
