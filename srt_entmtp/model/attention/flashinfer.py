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

`GraphAttention` is the same kernels in FlashInfer's CUDA-graph mode (decode, custom-mask
prefill for trees, causal prefill for prompt chunks), for one captured shape (a fixed number of
requests and tokens): its index, mask and output-slot buffers keep
their addresses for the wrapper's lifetime, and plan() rewrites their contents before a replay.
"""
from __future__ import annotations

import inspect
import logging

import numpy as np
import torch

from srt_entmtp.model.attention.base import AttentionBackend
from srt_entmtp.model.attention.tree_mask import mask_byte_offsets
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.staging import CopyFence

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
    paged prefill wrapper with a custom mask per request (ragged tree verification);
    causal=True: the paged prefill wrapper, causal (prompt chunks; FlashInfer's graph mode sizes
    its tiles by the shape's tokens, so any lengths up to them replay the captured kernel). Buffers are
    sized for the worst case the engine can send: kv_capacity slots in all, and a mask of at
    most mask_bits bits (bit-packed per request, each request rounded up to a byte).

    The per-step index buffers (kv_indptr, the mask's byte offsets, kv_indices) are views of one
    int32 device tensor with a pinned host twin, so a step's metadata goes up in one copy. After
    the first full plan, later plans of a fixed-shape step skip FlashInfer's Python plan (lists,
    `.item()`s and small copies: most of a ~0.3 ms plan on the H200 host) and call only its
    scheduler (`FastReplan`); the first plan checks that both give the same plan.
    """

    def __init__(self, kv, num_heads: int, num_kv_heads: int, head_dim: int, workspace: torch.Tensor,
                 out_slots: torch.Tensor, batch: int, tokens: int, kv_capacity: int, tree: bool, mask_bits: int = 0,
                 causal: bool = False):
        super().__init__(kv, num_heads, num_kv_heads, head_dim)
        import flashinfer

        dev = kv.k.device
        if tree and causal:
            raise ValueError("GraphAttention: a shape is a tree verify or a causal prefill, not both")
        self.batch, self.tokens, self.tree, self.causal = batch, tokens, tree, causal
        self.kv_capacity, self.mask_bits = kv_capacity, mask_bits
        self._out_slots = out_slots  # [tokens] view of the graph runner's static buffer
        i32 = {"dtype": torch.int32, "device": dev}
        # [kv_indptr (B+1) | mask byte indptr (B+1) | kv_indices (capacity)], and its host twin
        self.meta = torch.zeros(2 * (batch + 1) + kv_capacity, **i32)
        self.meta_host = torch.zeros(self.meta.numel(), dtype=torch.int32, pin_memory=dev.type == "cuda")
        # one twin, and FlashInfer's pinned plan buffer: a plan waits for the last plan's uploads
        # (a prompt chunk joining ahead is planned with the chunk before it still unread)
        self._uploaded = CopyFence(dev.type == "cuda")
        self._meta_np = self.meta_host.numpy()
        self.kv_indptr = self.meta[: batch + 1]
        self.mask_indptr = self.meta[batch + 1: 2 * (batch + 1)]
        self.kv_indices = self.meta[2 * (batch + 1):]
        self.last_page = torch.ones(batch, **i32)
        # a causal prefill has no mask: its query indptr takes the mask offsets' place, so one copy
        # stages it with the rest
        self.qo_indptr = self.mask_indptr if causal else torch.zeros(batch + 1, **i32)
        self._fixed_nodes = None  # tokens per request of plan_fixed_trees (the first plan fixes it)
        self.replan: FastReplan | None = None
        kw = {"backend": "fa2"} if "backend" in inspect.signature(
            flashinfer.BatchPrefillWithPagedKVCacheWrapper.__init__).parameters else {}
        if causal:
            self.wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                workspace, "NHD", use_cuda_graph=True, qo_indptr_buf=self.qo_indptr, paged_kv_indptr_buf=self.kv_indptr,
                paged_kv_indices_buf=self.kv_indices, paged_kv_last_page_len_buf=self.last_page, **kw)
            params = inspect.signature(self.wrapper.plan).parameters
            self._head_kw = "head_dim_qk" if "head_dim_qk" in params else "head_dim"
        elif tree:
            self.mask = torch.zeros(mask_bits // 8 + batch + 1, dtype=torch.uint8, device=dev)
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

    def _stage(self, kv_lens: np.ndarray, kv_indices: torch.Tensor, mask_rows: int = 0,
               q_lens: list[int] | None = None) -> torch.Tensor:
        """Write kv_indptr (and, for trees of `mask_rows` rows each, the mask's byte offsets; for a
        causal prefill, its query indptr) and kv_indices into the pinned twin and send them up in
        one copy; returns the host kv_indptr."""
        B, h = self.batch, self._meta_np
        h[0] = 0
        np.cumsum(kv_lens, out=h[1: B + 1])
        if mask_rows:
            mask_byte_offsets(kv_lens, mask_rows, h[B + 1: 2 * B + 2])
        if q_lens is not None:
            h[B + 1] = 0
            np.cumsum(q_lens, out=h[B + 2: 2 * B + 2])
        n = kv_indices.numel()
        top = 2 * (B + 1) + n
        if kv_indices.device.type == "cpu":
            self.meta_host[2 * (B + 1): top] = kv_indices
            self.meta[:top].copy_(self.meta_host[:top], non_blocking=True)
        else:  # already on the device (a ForwardBatch built there): the indptrs go up, the indices move over
            self.meta[: 2 * (B + 1)].copy_(self.meta_host[: 2 * (B + 1)], non_blocking=True)
            self.kv_indices[:n].copy_(kv_indices)
        return self.meta_host[: B + 1]

    def plan(self, fb: ForwardBatch) -> None:
        """Rewrite the buffers for `fb`, which is padded to exactly this shape (see cuda_graph.py).
        The token-side inputs (ids, positions, out slots) are the graph runner's to fill."""
        with self._uploaded:
            self._plan(fb)

    def _plan(self, fb: ForwardBatch) -> None:
        dtype = self.kv.k.dtype
        kv_lens = np.asarray(fb.kv_lens, dtype=np.int32)
        if self.causal:
            # staged in one pinned copy; FlashInfer's own plan would copy the indices from pageable
            # memory, which waits for the stream (so a prompt chunk waited for the step in flight)
            kv_indptr = self._stage(kv_lens, fb.kv_indices, q_lens=fb.q_lens)
            qo = self.meta_host[self.batch + 1: 2 * (self.batch + 1)]
            if self.replan is not None and self.replan.ok:
                self.replan(kv_indptr, kv_lens, qo)
                return
            self.wrapper.plan(qo.clone(), kv_indptr.clone(), fb.kv_indices.to(torch.int32),
                              torch.ones(self.batch, dtype=torch.int32), self.num_heads, self.num_kv_heads,
                              page_size=1, causal=True, q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale,
                              **{self._head_kw: self.head_dim})
            if self.replan is None:
                self.replan = FastReplan(self, qo.clone(), kv_indptr, kv_lens)
            return
        if not self.tree:
            kv_indptr = self._stage(kv_lens, fb.kv_indices)
            if self.replan is not None and self.replan.ok:
                self.replan(kv_indptr, kv_lens)
                return
            self.wrapper.plan(kv_indptr.clone(), fb.kv_indices.to(torch.int32), self.last_page.cpu(),
                              self.num_heads, self.num_kv_heads, self.head_dim, 1, q_data_type=dtype,
                              kv_data_type=dtype, sm_scale=self.scale)
            if self.replan is None:
                self.replan = FastReplan(self, torch.arange(self.batch + 1, dtype=torch.int32), kv_indptr, kv_lens)
            return
        dev = self.kv.k.device
        mask = full_kv_mask(fb)
        qo_indptr = _host_indptr(fb.q_lens).to(dev)
        kv_indices = fb.kv_indices.to(device=dev, dtype=torch.int32)
        self.wrapper.plan(qo_indptr, _host_indptr(fb.kv_lens).to(dev), kv_indices, self.last_page, self.num_heads,
                          self.num_kv_heads, page_size=1, custom_mask=mask, q_data_type=dtype, kv_data_type=dtype,
                          sm_scale=self.scale, **{self._head_kw: self.head_dim})

    def plan_fixed_trees(self, nodes: int, prefix_lens: list[int], kv_indices: torch.Tensor) -> None:
        """Plan from host metadata only: every request verifies `nodes` tokens over its prefix
        plus those nodes. kv_indices (host) holds per request its prefix slots then its tree
        slots. The packed mask is not given here: the step's graph builds it in `self.mask`
        (tree_mask.py) at the byte offsets written here. kv_indices may be a numpy array."""
        if isinstance(kv_indices, np.ndarray):
            kv_indices = torch.from_numpy(kv_indices)
        with self._uploaded:
            self._plan_fixed_trees(nodes, prefix_lens, kv_indices)

    def _plan_fixed_trees(self, nodes: int, prefix_lens: list[int], kv_indices: torch.Tensor) -> None:
        kv_lens = np.asarray(prefix_lens, dtype=np.int32) + nodes
        kv_indptr = self._stage(kv_lens, kv_indices, mask_rows=nodes)
        if self._fixed_nodes is not None and self._fixed_nodes != nodes:
            raise ValueError(f"GraphAttention planned for {self._fixed_nodes} nodes per request, got {nodes}")
        if self.replan is not None and self.replan.ok:
            self.replan(kv_indptr, kv_lens)
            return
        self._fixed_nodes = nodes
        qo = torch.arange(0, (self.batch + 1) * nodes, nodes, dtype=torch.int32)
        dtype = self.kv.k.dtype
        # FlashInfer copies these into the graph buffers and writes *bit* offsets into mask_indptr
        # (it is not given the mask): the byte offsets staged above go back over them
        byte_indptr = self.meta_host[self.batch + 1: 2 * (self.batch + 1)].clone()
        self.wrapper.plan(qo, kv_indptr.clone(), kv_indices.to(torch.int32), torch.ones(self.batch, dtype=torch.int32),
                          self.num_heads, self.num_kv_heads, page_size=1, packed_custom_mask=self.mask[:0],
                          q_data_type=dtype, kv_data_type=dtype, sm_scale=self.scale, **{self._head_kw: self.head_dim})
        self.mask_indptr.copy_(byte_indptr, non_blocking=True)
        if self.replan is None:
            self.replan = FastReplan(self, qo, kv_indptr, kv_lens)

    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return _store_and_attend(self, self.wrapper, layer, q, k, v)


class FastReplan:
    """Re-plan a graph-mode wrapper whose batch, query lengths, heads and dtypes never change.

    In graph mode a replay reuses the kernel arguments captured with it, the plan info included;
    what a new plan changes is the work split FlashInfer's scheduler writes into its int
    workspace from the host lengths. So a re-plan is only that call: the wrapper's cached
    module's `plan` (the same one the wrapper calls, for the FA2 prefill kernel and for the
    decode wrapper with tensor cores) with the host qo / kv indptrs and kv lengths; the caller
    has already staged the device index buffers. These are FlashInfer internals (SGLang
    replaces the decode wrapper's plan the same way): at construction, right after a full plan,
    the fast call must give the same plan info from the same lengths, or `ok` stays False and
    every plan goes through `wrapper.plan`.
    """

    def __init__(self, attn: GraphAttention, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, kv_lens: np.ndarray):
        self.attn, self.w = attn, attn.wrapper
        self.qo = qo_indptr
        self.ok = False
        try:
            full = list(self.w._plan_info)
            self(kv_indptr, kv_lens)
            self.ok = list(self.w._plan_info) == full
            if not self.ok:
                self.w._plan_info = full
                log.warning("FlashInfer fast re-plan gave a different plan (%s): using wrapper.plan", type(self.w).__name__)
        except (AttributeError, TypeError, RuntimeError) as e:  # another FlashInfer version's internals
            log.warning("FlashInfer fast re-plan unavailable (%s: %s): using wrapper.plan", type(e).__name__, e)

    def __call__(self, kv_indptr: torch.Tensor, kv_lens: np.ndarray, qo_indptr: torch.Tensor | None = None) -> None:
        """qo_indptr: the host query indptr where it changes between plans (causal prompt chunks)."""
        a, w = self.attn, self.w
        rows = w._max_total_num_rows if a.tree or a.causal else a.batch
        w._plan_info = w._cached_module.plan(
            w._float_workspace_buffer, w._int_workspace_buffer, w._pin_memory_int_workspace_buffer,
            self.qo if qo_indptr is None else qo_indptr, kv_indptr, torch.from_numpy(kv_lens), rows, a.batch,
            a.num_heads, a.num_kv_heads, 1, True, a.head_dim, a.head_dim, a.causal)


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
