"""The flat, explicit metadata of one forward pass over a ragged batch.

B requests each bring q_len new tokens (a prompt chunk, one decode token, or a whole draft
tree) on top of a prefix already in the KV cache. Tokens are concatenated request by request;
`qo_indptr` / `kv_indptr` say where each request starts (FlashInfer's convention). The model
never looks at requests: only the attention backend reads the per-request fields.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor            # [N] new tokens, all requests concatenated
    positions: torch.Tensor            # [N] absolute positions (RoPE); tree nodes: prefix + depth
    out_slots: torch.Tensor            # [N] KV slot each new token writes
    qo_indptr: torch.Tensor            # [B+1] new-token offsets
    kv_indptr: torch.Tensor            # [B+1] offsets into kv_indices
    kv_indices: torch.Tensor           # [sum kv_len] every slot each request attends to, prefix then new tokens
    q_lens: list[int]                  # host copies, so planning needs no device sync
    kv_lens: list[int]
    custom_mask: torch.Tensor | None = None   # flat bool, per request [q_len, q_len] row-major over its new tokens; None = causal
    logits_indices: torch.Tensor | None = None  # which of the N tokens need logits (None = all)

    @property
    def batch_size(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @classmethod
    def build(cls, new_tokens: list[torch.Tensor], prefix_slots: list[torch.Tensor], new_slots: list[torch.Tensor],
              positions: list[torch.Tensor] | None = None, custom_masks: list[torch.Tensor] | None = None,
              logits_indices: torch.Tensor | None = None, device: torch.device | str = "cpu") -> ForwardBatch:
        """Assemble from per-request pieces. positions default to prefix_len + arange(q_len);
        custom_masks (per request [q_len, q_len] bool, or None for causal) switch on masking."""
        q_lens = [int(t.numel()) for t in new_tokens]
        kv_lens = [int(p.numel()) + q for p, q in zip(prefix_slots, q_lens)]
        if positions is None:
            positions = [torch.arange(int(p.numel()), int(p.numel()) + q) for p, q in zip(prefix_slots, q_lens)]
        mask = None
        if custom_masks is not None and any(m is not None for m in custom_masks):
            blocks = []
            for m, q in zip(custom_masks, q_lens):
                blocks.append((m if m is not None else torch.ones(q, q, dtype=torch.bool).tril()).reshape(-1))
            mask = torch.cat(blocks).to(device)
        kv_indices = torch.cat([t for pair in zip(prefix_slots, new_slots) for t in pair])
        return cls(
            input_ids=torch.cat(new_tokens).to(device),
            positions=torch.cat(positions).to(device),
            out_slots=torch.cat(new_slots).to(device),
            qo_indptr=_indptr(q_lens, device),
            kv_indptr=_indptr(kv_lens, device),
            kv_indices=kv_indices.to(device),
            q_lens=q_lens,
            kv_lens=kv_lens,
            custom_mask=mask,
            logits_indices=None if logits_indices is None else logits_indices.to(device),
        )

    @classmethod
    def build_decode(cls, tokens: list[int], prefix_slots: list[torch.Tensor], new_slots: torch.Tensor,
                     device: torch.device | str = "cpu", pending_slots: torch.Tensor | None = None) -> ForwardBatch:
        """One new token per request (a plain decode step): the same batch as `build`, assembled
        with a fixed number of tensor ops whatever the batch size (no per-request tensors).
        pending_slots [B]: each request's token of the step still in flight, not yet in its
        prefix; it goes between the prefix and the new slot."""
        B = len(tokens)
        extra = 0 if pending_slots is None else 1
        prefix_lens = [int(p.numel()) + extra for p in prefix_slots]
        kv_lens = [n + 1 for n in prefix_lens]
        kv_indptr = _indptr(kv_lens, "cpu")
        # each request's slots are its prefix (then its pending slot) then its new slot
        is_new = torch.zeros(int(kv_indptr[-1]), dtype=torch.bool)
        is_new[kv_indptr[1:] - 1] = True
        kv_indices = torch.empty(is_new.numel(), dtype=torch.long)
        kv_indices[is_new] = new_slots
        old = ~is_new
        if extra:
            is_pending = torch.zeros_like(is_new)
            is_pending[kv_indptr[1:] - 2] = True
            kv_indices[is_pending] = pending_slots
            old &= ~is_pending
        kv_indices[old] = torch.cat(prefix_slots) if B else kv_indices[:0]
        return cls(
            input_ids=torch.tensor(tokens, dtype=torch.long).to(device),
            positions=torch.tensor(prefix_lens, dtype=torch.long).to(device),
            out_slots=new_slots.to(device),
            qo_indptr=torch.arange(B + 1).to(device),
            kv_indptr=kv_indptr.to(device),
            kv_indices=kv_indices.to(device),
            q_lens=[1] * B,
            kv_lens=kv_lens,
        )

    def to(self, device: torch.device | str) -> ForwardBatch:
        """The same batch with its tensors on `device` (a no-op where they already are)."""
        dev = torch.device(device)
        if self.input_ids.device == dev:
            return self
        move = {f: getattr(self, f) for f in ("input_ids", "positions", "out_slots", "qo_indptr", "kv_indptr",
                                              "kv_indices", "custom_mask", "logits_indices")}
        return ForwardBatch(q_lens=self.q_lens, kv_lens=self.kv_lens,
                            **{f: None if t is None else t.to(dev, non_blocking=True) for f, t in move.items()})


def _indptr(lens: list[int], device) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.long)
    out[1:] = torch.tensor(lens, dtype=torch.long).cumsum(0)
    return out.to(device)
