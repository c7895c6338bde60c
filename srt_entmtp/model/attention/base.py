"""The attention backend contract.

    backend.plan(batch)            once per forward, before the layers: turn the ForwardBatch's
                                   per-request metadata (lengths, KV slots, custom masks) into
                                   whatever the kernel wants (padded indices, packed masks,
                                   FlashInfer's plan()). May sync with the host; never inside a
                                   CUDA graph.
    backend.run(layer, q, k, v)    once per layer: store k, v of the new tokens in their KV slots
                                   and return attention of q over each request's prefix + new
                                   tokens under its mask. Only tensor work, so it can be captured.

q: [N, num_heads, head_dim]; k, v: [N, num_kv_heads, head_dim]; returns [N, num_heads * head_dim].
Masks: a request without a custom mask is causal over its new tokens; with one, new token i
sees the whole prefix plus the new tokens j where mask[i, j] (a tree mask).
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.kv_cache import KVPool


class AttentionBackend(ABC):
    def __init__(self, kv: KVPool, num_heads: int, num_kv_heads: int, head_dim: int):
        self.kv = kv
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5

    @abstractmethod
    def plan(self, batch: ForwardBatch) -> None: ...

    @abstractmethod
    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None) -> torch.Tensor:
        """Store the new tokens' K/V in their slots (unless k is None: the caller's fused kernel
        already wrote them there, see `cache_target`) and attend."""

    def cache_target(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Where this forward's new K/V go: (k cache, v cache) of `layer` and the slot of each
        new token, for kernels that write them as they compute them. Valid after plan()."""
        return self.kv.k[layer], self.kv.v[layer], self._out_slots


def create_backend(name: str, kv: KVPool, num_heads: int, num_kv_heads: int, head_dim: int) -> AttentionBackend:
    if name == "sdpa":
        from srt_entmtp.model.attention.sdpa import SdpaBackend

        return SdpaBackend(kv, num_heads, num_kv_heads, head_dim)
    if name == "flashinfer":
        from srt_entmtp.model.attention.flashinfer import FlashInferBackend

        return FlashInferBackend(kv, num_heads, num_kv_heads, head_dim)
    raise ValueError(f"unknown attention backend {name!r}; choose sdpa or flashinfer")
