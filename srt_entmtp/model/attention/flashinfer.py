"""Attention with FlashInfer's paged kernels (CUDA; `pip install .[gpu]`).

The KV pool is already FlashInfer's paged layout with page_size = 1: per layer, k and v are
[slots, kv_heads, head_dim] (NHD), and `unsqueeze(1)` makes them [pages, 1, kv_heads, head_dim]
without a copy. A request's page table is its slot list (ForwardBatch.kv_indices), every last
page holds one token.

plan() picks one of two wrappers per forward:
  * decode (BatchDecodeWithPagedKVCacheWrapper, tensor cores for GQA) when every request brings
    one new token: plain autoregressive steps and root-only trees;
  * prefill (BatchPrefillWithPagedKVCacheWrapper) otherwise: causal for prompt chunks, and with a
    custom mask when any request verifies a tree. FlashInfer's mask is per request [q_len, kv_len]
    over prefix + new tokens; the ForwardBatch carries only the [q_len, q_len] block over the new
    tokens, so the prefix columns (all visible) are filled in on the device in one gather.
Both wrappers share one workspace, allocated once. Planning reads host copies of the lengths
(ForwardBatch keeps them), so it never waits on the GPU.

`GraphAttention` is the same pair of kernels in FlashInfer's CUDA-graph mode, for one captured
shape (a fixed number of requests and tokens): its index, mask and output-slot buffers keep
their addresses for the wrapper's lifetime, and plan() rewrites their contents before a replay.
"""
from __future__ import annotations

import inspect
import logging

import torch

from srt_entmtp.model.attention.base import AttentionBackend
from srt_entmtp.model.forward_batch import ForwardBatch

log = logging.getLogger(__name__)

WORKSPACE_BYTES = 128 * 1024 * 1024


class FlashInferBackend(AttentionBackend):
    def __init__(self, kv, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__(kv, num_heads, num_kv_heads, head_dim)
        import flashinfer

        dev = kv.k.device
        if dev.type != "cuda":
            raise ValueError("the flashinfer attention backend needs a CUDA device; use --attention-backend sdpa")
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
        # FA2 kernels: the SM90 (FA3) path rejects custom masks on this model's shapes ("operation not
        # supported", seen on an H100 with 0.2.14.post1)
        kw = {"backend": "fa2"} if "backend" in inspect.signature(
            flashinfer.BatchPrefillWithPagedKVCacheWrapper.__init__).parameters else {}
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", **kw)
        self.decode = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD", use_tensor_cores=True)
        # keyword names moved between releases (0.2.x: head_dim_qk; older: head_dim); ask the signature
        params = inspect.signature(self.prefill.plan).parameters
        self._prefill_head_kw = "head_dim_qk" if "head_dim_qk" in params else "head_dim"
        self._last_page = torch.ones(0, dtype=torch.int32)
        self.wrapper = None
        self._out_slots = None

    def _last_page_len(self, B: int) -> torch.Tensor:
        if self._last_page.numel() < B:
            self._last_page = torch.ones(max(B, 2 * self._last_page.numel()), dtype=torch.int32)
        return self._last_page[:B]

    def plan(self, fb: ForwardBatch) -> None:
        dev = self.kv.k.device
        B = fb.batch_size
        kv_indptr = _host_indptr(fb.kv_lens)
        kv_indices = fb.kv_indices.to(device=dev, dtype=torch.int32)
        last = self._last_page_len(B)
        dtype = self.kv.k.dtype
        self._out_slots = fb.out_slots
        if max(fb.q_lens) == 1:
            self.decode.plan(kv_indptr, kv_indices, last, self.num_heads, self.num_kv_heads, self.head_dim, 1,
                             q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
            self.wrapper = self.decode
            return
        qo_indptr = _host_indptr(fb.q_lens)
        kw = {self._prefill_head_kw: self.head_dim}
        if fb.custom_mask is None:
            self.prefill.plan(qo_indptr, kv_indptr, kv_indices, last, self.num_heads, self.num_kv_heads, page_size=1,
                              causal=True, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale, **kw)
        else:
            mask = full_kv_mask(fb)
            # the mask is bit-packed on the device, per request: FlashInfer wants these indptrs there too
            qo_indptr, kv_indptr, last = qo_indptr.to(dev), kv_indptr.to(dev), last.to(dev)
            self.prefill.plan(qo_indptr, kv_indptr, kv_indices, last, self.num_heads, self.num_kv_heads, page_size=1,
                              custom_mask=mask, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale, **kw)
        self.wrapper = self.prefill

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _store_and_attend(self, self.wrapper, layer, q, k, v)


class GraphAttention(AttentionBackend):
    """FlashInfer attention for one CUDA-graph shape: `batch` requests, `tokens` new tokens.

    tree=False: the decode wrapper (every request one token, tokens == batch); tree=True: the
    paged prefill wrapper with a custom mask per request (ragged tree verification). Buffers are
    sized for the worst case the engine can send: kv_capacity slots in all, and a mask of at
    most mask_bits bits (bit-packed per request, each request rounded up to a byte).
    """

    def __init__(self, kv, num_heads: int, num_kv_heads: int, head_dim: int, workspace: torch.Tensor,
                 out_slots: torch.Tensor, batch: int, tokens: int, kv_capacity: int, tree: bool, mask_bits: int = 0):
        super().__init__(kv, num_heads, num_kv_heads, head_dim)
        import flashinfer

        dev = kv.k.device
        self.batch, self.tokens, self.tree = batch, tokens, tree
        self.kv_capacity, self.mask_bits = kv_capacity, mask_bits
        self._out_slots = out_slots  # [tokens] view of the graph runner's static buffer
        self._fixed_qo = None  # (qo_indptr, nodes, last_page_len) of plan_fixed_trees
        i32 = {"dtype": torch.int32, "device": dev}
        self.kv_indptr = torch.zeros(batch + 1, **i32)
        self.kv_indices = torch.zeros(kv_capacity, **i32)
        self.last_page = torch.ones(batch, **i32)
        if tree:
            kw = {"backend": "fa2"} if "backend" in inspect.signature(
                flashinfer.BatchPrefillWithPagedKVCacheWrapper.__init__).parameters else {}
            self.qo_indptr = torch.zeros(batch + 1, **i32)
            self.mask = torch.zeros(mask_bits // 8 + batch + 1, dtype=torch.uint8, device=dev)
            self.mask_indptr = torch.zeros(batch + 1, **i32)
            self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self.qo_indptr, paged_kv_indptr_buf=self.kv_indptr,
                paged_kv_indices_buf=self.kv_indices, paged_kv_last_page_len_buf=self.last_page,
                custom_mask_buf=self.mask, mask_indptr_buf=self.mask_indptr, **kw)
            params = inspect.signature(self.wrapper.plan).parameters
            self._head_kw = "head_dim_qk" if "head_dim_qk" in params else "head_dim"
        else:
            self.wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, use_tensor_cores=True, paged_kv_indptr_buffer=self.kv_indptr,
                paged_kv_indices_buffer=self.kv_indices, paged_kv_last_page_len_buffer=self.last_page)

    def fits(self, fb: ForwardBatch) -> bool:
        """Whether a batch already padded to this shape fits the buffers."""
        if fb.batch_size != self.batch or fb.num_tokens != self.tokens or sum(fb.kv_lens) > self.kv_capacity:
            return False
        return not self.tree or sum(q * k for q, k in zip(fb.q_lens, fb.kv_lens)) <= self.mask_bits

    def plan(self, fb: ForwardBatch) -> None:
        """Rewrite the buffers for `fb`, which is padded to exactly this shape (see cuda_graph.py).
        The token-side inputs (ids, positions, out slots) are the graph runner's to fill."""
        dev = self.kv.k.device
        dtype = self.kv.k.dtype
        kv_indptr = _host_indptr(fb.kv_lens)
        kv_indices = fb.kv_indices.to(device=dev, dtype=torch.int32)
        last = torch.ones(fb.batch_size, dtype=torch.int32)
        if not self.tree:
            self.wrapper.plan(kv_indptr, kv_indices, last, self.num_heads, self.num_kv_heads, self.head_dim, 1,
                              q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale)
            return
        mask = full_kv_mask(fb)
        qo_indptr = _host_indptr(fb.q_lens).to(dev)
        self.wrapper.plan(qo_indptr, kv_indptr.to(dev), kv_indices, last.to(dev), self.num_heads, self.num_kv_heads,
                          page_size=1, custom_mask=mask, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale,
                          **{self._head_kw: self.head_dim})

    def plan_fixed_trees(self, nodes: int, kv_lens: list[int], kv_indices: torch.Tensor,
                         byte_indptr: torch.Tensor) -> None:
        """Plan from host metadata only: every request verifies `nodes` tokens over kv_lens keys.
        The packed mask is not given here: the step's graph builds it in `self.mask`
        (tree_mask.py) at the byte offsets `byte_indptr` (host int32, copied in)."""
        B = len(kv_lens)
        if self._fixed_qo is None or self._fixed_qo[1] != nodes:  # the same every step: build once
            self._fixed_qo = (torch.arange(0, (B + 1) * nodes, nodes, dtype=torch.int32), nodes,
                              torch.ones(B, dtype=torch.int32))
        qo, _, last = self._fixed_qo
        self.wrapper.plan(qo, _host_indptr(kv_lens), kv_indices, last, self.num_heads,
                          self.num_kv_heads, page_size=1, packed_custom_mask=self.mask[:0], q_data_type=self.kv.k.dtype,
                          kv_data_type=self.kv.k.dtype, sm_scale=self.scale, **{self._head_kw: self.head_dim})
        # plan wrote bit offsets (it is not given the mask); the kernel reads bytes
        self.mask_indptr.copy_(byte_indptr, non_blocking=True)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _store_and_attend(self, self.wrapper, layer, q, k, v)


def _store_and_attend(attn: AttentionBackend, wrapper, layer: int, q: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor) -> torch.Tensor:
    """Write the new tokens' K/V into their slots, then run the planned wrapper on the layer's pages."""
    kc, vc = attn.kv.k[layer], attn.kv.v[layer]
    if k is not None:  # else the fused RoPE kernel stored them (model/fused.py: rope_qkv_store)
        kc[attn._out_slots] = k
        vc[attn._out_slots] = v
    out = wrapper.run(q.contiguous(), (kc.unsqueeze(1), vc.unsqueeze(1)))
    return out.reshape(q.shape[0], attn.num_heads * attn.head_dim)


def _host_indptr(lens: list[int]) -> torch.Tensor:
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.tensor(lens, dtype=torch.int32).cumsum(0)
    return out


def full_kv_mask(fb: ForwardBatch) -> torch.Tensor:
    """Flat bool: per request the row-major [q_len, kv_len] mask FlashInfer's custom_mask wants:
    prefix columns all True, then the request's [q_len, q_len] block from fb.custom_mask."""
    dev = fb.custom_mask.device
    q = torch.tensor(fb.q_lens, device=dev)
    kv = torch.tensor(fb.kv_lens, device=dev)
    sizes = q * kv
    total = int(sum(a * b for a, b in zip(fb.q_lens, fb.kv_lens)))
    req = torch.repeat_interleave(torch.arange(len(fb.q_lens), device=dev), sizes, output_size=total)
    start = torch.cumsum(sizes, 0) - sizes
    block_start = torch.cumsum(q * q, 0) - q * q
    e = torch.arange(total, device=dev) - start[req]
    kv_r, q_r = kv[req], q[req]
    row, col = e // kv_r, e % kv_r
    rel = col - (kv_r - q_r)                                  # column among the new tokens (< 0: prefix)
    idx = block_start[req] + row * q_r + rel.clamp(min=0)
    return (rel < 0) | fb.custom_mask[idx]
