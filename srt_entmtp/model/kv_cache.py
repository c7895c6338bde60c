"""A token-slot KV pool: every token's K and V live in one slot of a flat per-layer array.

Page size is one token (as SGLang's token_to_kv_pool): a request's "page table" is simply the
list of its slots, so keeping the accepted path of a verified tree is bookkeeping plus a copy
of at most `depth` slots, and freeing a finished request returns its slots at once.
Slot 0 is reserved as the target of padded entries, so padding never corrupts real data.
"""
from __future__ import annotations

import numpy as np
import torch

from srt_entmtp.errors import KVCacheFullError


class KVPool:
    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_slots = num_slots
        # [layers, slots, kv_heads, head_dim]: slot-major, the NHD page layout FlashInfer reads
        # with page_size=1, and contiguous rows for the SDPA backend's gathers.
        self.k = torch.zeros(num_layers, num_slots + 1, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # host bookkeeping in numpy (a torch CPU op costs several microseconds of dispatch each,
        # a few of them per step; slot tensors handed out share memory with these arrays' copies)
        self._free = np.ones(num_slots + 1, dtype=bool)  # for catching double frees
        self._free[0] = False
        # free slots as a stack whose top (the end) is the smallest: alloc pops, free pushes. A scan
        # of the free map per step (torch.nonzero) cost ~1.8 ms a step on the H200 machine's CPU.
        self._stack = np.arange(num_slots, 0, -1, dtype=np.int64)
        self._num_free = num_slots

    @property
    def num_free(self) -> int:
        return self._num_free

    def alloc(self, n: int) -> torch.Tensor:
        """n free slots, smallest on the stack first. Freed slots go back on top smallest first,
        so a lone request's slots stay contiguous (its spare tree slots are the next ones it
        takes). Slot indices are host tensors (bookkeeping); ForwardBatch moves them to the
        device once per step."""
        return self.alloc_many([n])[0]

    def alloc_array(self, n: int) -> np.ndarray:
        """alloc() as a numpy array (the device step's bookkeeping is numpy: no torch op a step)."""
        if n > self._num_free:
            raise KVCacheFullError(f"KV cache full: need {n} slots, {self._num_free} free of {self.num_slots}")
        top = self._num_free
        slots = self._stack[top - n: top][::-1].copy()
        self._free[slots] = False
        self._num_free -= n
        return slots

    def alloc_many(self, counts: list[int]) -> list[torch.Tensor]:
        """Slots for several requests in one pop (one call per step)."""
        return list(torch.from_numpy(self.alloc_array(sum(counts))).split(counts))

    def free(self, slots: torch.Tensor | np.ndarray) -> None:
        s = slots if isinstance(slots, np.ndarray) else slots.cpu().numpy()
        if s.size == 0:
            return
        s = -np.sort(-s.reshape(-1))  # descending: the smallest lands on top of the stack
        if self._free[s].any() or s[-1] == 0 or (s[1:] == s[:-1]).any():
            raise RuntimeError("KVPool.free: double free or reserved slot (engine bookkeeping bug)")
        self._free[s] = True
        top = self._num_free
        self._stack[top: top + s.size] = s
        self._num_free += s.size

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move K/V of `src` slots into `dst` slots in every layer (KV compaction after verify)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
