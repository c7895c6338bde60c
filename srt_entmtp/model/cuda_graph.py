"""CUDA graphs of the target model's forward: decode steps and ragged tree verification.

At batch 1 an eager forward of a small model is ~1,100 kernel launches and almost no GPU work;
a graph replays them in one launch. Graphs need fixed shapes, so forwards are captured per
bucket and a live batch is padded up to the nearest one:

  * decode (every engine): B requests x 1 token, for B in `decode_batches` (1, 2, 4, 8, 16, ...);
  * verify (speculative engines): B requests + 1 padding request, N tokens in all, tree masks,
    for B in powers of two and N in powers of two from B + 1 up to B x the largest tree;
  * prefill (prompt chunks, causal): B requests + 1 padding request, N tokens, for B in 1, 2, 4,
    8, 16 and N in powers of two from 16 up to the chunk size, plus one bucket of the chunk size
    and 16 more (a full chunk and its padding request). Only the rows that want logits (each
    finished prompt's last token) go through the final norm and the LM head. Eagerly a prefill
    is ~450 launches, ~20 ms of host time on the H200's host for 100 or 900 tokens alike.

Padding is dummy requests that read and write only the KV pool's reserved slot 0 (one token
each, the last one taking every spare token, each with slot 0 as its one key; in a causal
prefill as many keys as tokens, all slot 0, since a causal row needs its own key), so the real
rows attend to exactly the keys they attend to eagerly. (FlashInfer's graph mode tiles by the
bucket's size, so a replay may round differently from an eager forward in bf16.) Everything
else (shapes beyond the buckets; prompt chunks with --disable-prefill-cuda-graph) runs eagerly.

All graphs share one memory pool and write their outputs into one pair of static buffers
(hidden [N, d] and float32 logits [N, vocab]): the outputs of a replay are views, valid until
the next forward, which is how the workers use them.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from srt_entmtp.model import staging
from srt_entmtp.model.forward_batch import ForwardBatch, _indptr

log = logging.getLogger(__name__)


def decode_batches(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return sorted(set(sizes) | {max_batch})


def verify_shapes(max_batch: int, max_nodes: int) -> list[tuple[int, int]]:
    """(requests incl. the padding one, tokens) for every verify graph."""
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch] + [max_batch]
    shapes = []
    for b in batches:
        lo, hi = b + 1, b * max_nodes + 1
        n = 1 << (lo - 1).bit_length()
        while True:
            shapes.append((b + 1, n))
            if n >= hi:
                break
            n *= 2
    return shapes


PREFILL_REQUESTS = (1, 2, 4, 8, 16)  # real requests a prefill graph holds (plus one padding request)


def prefill_shapes(max_batch: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """(requests incl. the padding one, tokens) for every prefill graph."""
    reqs = [b for b in PREFILL_REQUESTS if b < max_batch] + [min(max_batch, PREFILL_REQUESTS[-1])]
    toks, n = [], 16
    while n < chunk_tokens:
        toks.append(n)
        n *= 2
    toks.append(chunk_tokens + PREFILL_REQUESTS[-1])  # a full chunk, and a token for each padding request
    return sorted({(b + 1, n) for b in reqs for n in toks if n > b})


def pad_batch(fb: ForwardBatch, batch: int, tokens: int, causal: bool = False) -> ForwardBatch:
    """fb plus dummy requests up to `batch` requests and `tokens` tokens (fb's rows come first).
    Dummies attend to and write only slot 0; each has one token, the last all spare tokens, and
    one key (slot 0) however many tokens it has; with `causal` (a prompt chunk) as many keys as
    tokens, all slot 0."""
    pad_reqs, pad_toks = batch - fb.batch_size, tokens - fb.num_tokens
    if pad_reqs < 0 or pad_toks < pad_reqs or (pad_toks and not pad_reqs):
        raise ValueError(f"cannot pad {fb.batch_size} requests / {fb.num_tokens} tokens to {batch} / {tokens}")
    if pad_reqs == 0:
        return fb
    pad_q = [1] * pad_reqs
    pad_q[-1] += pad_toks - pad_reqs
    dev = fb.input_ids.device
    # every dummy attends to one key: a sink of q tokens over q keys would cost q^2 attention
    q_lens, kv_lens = fb.q_lens + pad_q, fb.kv_lens + (pad_q if causal else [1] * pad_reqs)

    def zeros(t: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([t, torch.zeros(n, dtype=t.dtype, device=t.device)])

    mask = fb.custom_mask
    if mask is not None:  # ForwardBatch's [q, q] block per request; a dummy's only key is its block's last column
        mask = torch.cat([mask, torch.ones(sum(q * q for q in pad_q), dtype=torch.bool, device=mask.device)])
    return ForwardBatch(
        input_ids=zeros(fb.input_ids, pad_toks), positions=zeros(fb.positions, pad_toks),
        out_slots=zeros(fb.out_slots, pad_toks), qo_indptr=_indptr(q_lens, dev), kv_indptr=_indptr(kv_lens, dev),
        kv_indices=zeros(fb.kv_indices, sum(kv_lens) - sum(fb.kv_lens)), q_lens=q_lens, kv_lens=kv_lens,
        custom_mask=mask, logits_indices=fb.logits_indices)


@dataclass
class CapturedForward:
    attn: object                 # GraphAttention (FlashInfer) or DecodeAttention (Triton): the shape's buffers
    graph: torch.cuda.CUDAGraph


class CudaGraphRunner:
    """Captures the runner's model for every bucket at start-up; `forward` replays or says None."""

    def __init__(self, runner, max_batch: int, max_tree_nodes: int = 0, decode: bool = True,
                 decode_attention: str = "auto", prefill_tokens: int = 0, prefill_beside: bool = False):
        self.runner = runner
        self.prefill_beside = prefill_beside  # prompt-chunk graphs isolated from the others (capture)
        # decode graphs' attention: auto = the Triton tree kernel (one node a request) where Triton
        # imports, flashinfer = FlashInfer's decode wrapper
        from srt_entmtp.model.attention import tree_triton

        if decode_attention not in ("auto", "flashinfer"):
            raise ValueError(f"decode attention must be auto or flashinfer, got {decode_attention!r}")
        self.triton_decode = decode_attention == "auto" and tree_triton.available()
        self.model = runner.model
        self.max_batch = max_batch
        self.max_tree_nodes = max_tree_nodes
        dev = runner.device
        cfg = runner.config
        self.shapes = [(b, b, False) for b in decode_batches(max_batch)] if decode else []
        if max_tree_nodes:
            self.shapes += [(b, n, True) for b, n in verify_shapes(max_batch, max_tree_nodes)]
        # prompt chunks of up to prefill_tokens tokens (the scheduler's chunk size); 0 = eager
        self.prefill_shapes = prefill_shapes(max_batch, prefill_tokens) if prefill_tokens else []
        if not self.shapes and not self.prefill_shapes:
            raise ValueError("CudaGraphRunner: nothing to capture (no decode graphs, tree size or prefill chunk)")
        n_max = max([n for _, n, _ in self.shapes] + [1])
        # the token-side inputs, rows of one buffer with pinned host twins: one copy per replay.
        # Two twins, used in turn: a step may be launched while the one before is still queued
        # (Worker's device-fed plain steps), whose copy must not read the next step's inputs
        self.token_inputs = torch.zeros(3, n_max, dtype=torch.long, device=dev)
        self._token_inputs_host = [torch.zeros(3, n_max, dtype=torch.long, pin_memory=dev.type == "cuda")
                                   for _ in range(2)]
        self._host_turn = 0
        self.input_ids, self.positions, self.out_slots = self.token_inputs.unbind(0)
        self.hidden = torch.zeros(n_max, cfg.hidden_size, dtype=runner.dtype, device=dev)
        self.logits = torch.zeros(n_max, cfg.vocab_size, dtype=torch.float32, device=dev)
        # prefill graphs' own inputs: ids, positions, out slots, and (first `batch` entries) the
        # rows that want logits; outputs are those rows only
        p_max = max([n for _, n in self.prefill_shapes] + [1])
        b_max = max([b for b, _ in self.prefill_shapes] + [1])
        self.prefill_inputs = torch.zeros(4, p_max, dtype=torch.long, device=dev)
        self._prefill_inputs_host = torch.zeros(4, p_max, dtype=torch.long, pin_memory=dev.type == "cuda")
        self._prefill_copied = None  # event after the last upload from the pinned twin (reused only then)
        self.prefill_hidden = torch.zeros(b_max, cfg.hidden_size, dtype=runner.dtype, device=dev)
        self.prefill_logits = torch.zeros(b_max, cfg.vocab_size, dtype=torch.float32, device=dev)
        self.prefill_graphs: dict[tuple[int, int], CapturedForward] = {}
        self.prefill_replays = 0
        self.workspace = None  # FlashInfer's float workspace, allocated at capture
        self.prefill_workspace = None  # the prefill graphs' (their own with prefill_beside)
        # keyed by (requests, tokens, tree): decode (2, 2) and the one-request verify (2, 2) differ
        self.graphs: dict[tuple[int, int, bool], CapturedForward] = {}
        self.capture_seconds = 0.0
        self.memory_bytes = 0
        self.replays = 0  # forwards served by a graph (the rest ran eagerly)

    # ---- capture -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        from srt_entmtp.model.attention.flashinfer import WORKSPACE_BYTES, GraphAttention
        from srt_entmtp.model.attention.tree_triton import DecodeAttention

        r, cfg = self.runner, self.runner.config
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=r.device)
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        ctx = r.context_length
        for batch, tokens, tree in sorted(self.shapes, key=lambda s: -s[1]):  # largest first: the pool fits all
            kv_cap = batch * ctx + tokens
            bits = tokens * (ctx + tokens) if tree else 0
            if self.triton_decode and not tree:
                attn = DecodeAttention(r.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.out_slots[:tokens],
                                       batch, kv_cap)
            else:
                attn = GraphAttention(r.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.workspace,
                                      self.out_slots[:tokens], batch, tokens, kv_cap, tree, bits)
            attn.plan(self._dummy(batch, tokens, tree))
            self.input_ids[:tokens].zero_()
            self.positions[:tokens].zero_()
            self.out_slots[:tokens].zero_()
            graph = self._capture_one(lambda a=attn, n=tokens: self._forward(a, n), pool)
            self.graphs[(batch, tokens, tree)] = CapturedForward(attn, graph)
        # with prefill_beside, prompt chunks may run on a side stream beside decode and verify graphs
        # (Worker.launch_prefill), so their graphs share nothing with those: their own pool, FlashInfer
        # float workspace, and capture stream (cuBLAS keys its workspace by stream). Otherwise (the
        # default) they share the others' and hold no more memory than before
        prefill_pool, prefill_stream, self.prefill_workspace = pool, None, self.workspace
        if self.prefill_beside and self.prefill_shapes:
            prefill_pool, prefill_stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream()
            self.prefill_workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=r.device)
        for batch, tokens in sorted(self.prefill_shapes, key=lambda s: -s[1]):
            # real requests' prefixes (up to the context each) and every new token, a dummy's keys included
            attn = GraphAttention(r.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, self.prefill_workspace,
                                  self.prefill_inputs[2, :tokens], batch, tokens, (batch - 1) * ctx + tokens,
                                  tree=False, causal=True)
            attn.plan(self._dummy(batch, tokens, False, causal=True))
            self.prefill_inputs[:, :tokens].zero_()
            self.prefill_graphs[(batch, tokens)] = CapturedForward(attn, self._capture_one(
                lambda a=attn, b=batch, n=tokens: self._forward_prefill(a, b, n), prefill_pool, prefill_stream))
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.memory_bytes = free0 - torch.cuda.mem_get_info()[0]
        log.info("captured %d CUDA graphs (batch <= %d, trees <= %d nodes, %d prefill shapes) in %.1fs, holding "
                 "%.0f MiB", len(self.graphs) + len(self.prefill_graphs), self.max_batch, self.max_tree_nodes,
                 len(self.prefill_graphs), self.capture_seconds, self.memory_bytes / 2**20)

    @staticmethod
    def _capture_one(run, pool, stream: torch.cuda.Stream | None = None) -> torch.cuda.CUDAGraph:
        side = stream or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, lazy inits
            for _ in range(2):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool, stream=stream):
            run()
        return graph

    def _forward_prefill(self, attn, batch: int, tokens: int) -> None:
        ids, pos, _, rows = self.prefill_inputs[:, :tokens].unbind(0)
        hidden = self.model.forward(ids, pos, attn, hidden_indices=rows[:batch])
        self.prefill_hidden[:batch].copy_(hidden)
        self.prefill_logits[:batch].copy_(self.model.logits(hidden))

    def _forward(self, attn, tokens: int) -> None:
        hidden = self.model.forward(self.input_ids[:tokens], self.positions[:tokens], attn)
        self.hidden[:tokens].copy_(hidden)
        self.logits[:tokens].copy_(self.model.logits(hidden))

    def _dummy(self, batch: int, tokens: int, tree: bool, causal: bool = False) -> ForwardBatch:
        """An all-padding batch of this shape (what capture plans with)."""
        empty = torch.empty(0, dtype=torch.long, device=self.runner.device)
        fb = ForwardBatch(input_ids=empty, positions=empty, out_slots=empty, qo_indptr=_indptr([], "cpu"),
                          kv_indptr=_indptr([], "cpu"), kv_indices=empty, q_lens=[], kv_lens=[],
                          custom_mask=torch.empty(0, dtype=torch.bool, device=self.runner.device) if tree else None)
        return pad_batch(fb, batch, tokens, causal)

    # ---- replay ------------------------------------------------------------------------------------
    def _pick_prefill(self, fb: ForwardBatch) -> tuple[int, int] | None:
        """The smallest prefill shape that holds fb's requests, its tokens and a padding request."""
        b, n = fb.batch_size, fb.num_tokens
        fits = [(tokens, batch) for batch, tokens in self.prefill_shapes if batch > b and tokens >= n + batch - b]
        return None if not fits else min(fits)[::-1]

    def _prefill_entry(self, fb: ForwardBatch):
        """(graph entry, its shape, fb padded to it) for a prompt-chunk batch built on the host,
        or None: it runs eagerly."""
        rows = fb.logits_indices
        shape = self._pick_prefill(fb) if fb.custom_mask is None else None
        entry = self.prefill_graphs.get(shape) if shape else None
        if entry is None or rows is None or fb.input_ids.device.type != "cpu" or rows.device.type != "cpu":
            return None
        fbp = pad_batch(fb, *shape, causal=True)
        return (entry, shape, fbp) if entry.attn.fits(fbp) else None

    def can_prefill_beside(self, fb: ForwardBatch) -> bool:
        """Whether this prompt chunk may run on a side stream: it replays a prefill graph, and those
        were captured apart from the step graphs (prefill_beside: their own memory pool, FlashInfer
        workspace and cuBLAS capture stream)."""
        return self.prefill_beside and self._prefill_entry(fb) is not None

    def _forward_prefill_graph(self, fb: ForwardBatch):
        """Replay the prefill graph that fits a prompt-chunk batch (built on the host) and return
        (hidden, logits) of its logits_indices rows; None = run eagerly."""
        picked = self._prefill_entry(fb)
        if picked is None:
            return None
        entry, (batch, N), fbp = picked
        rows, attn = fb.logits_indices, entry.attn
        attn.plan(fbp)
        if self._prefill_copied is not None:  # the pinned twin's last upload must have been read
            self._prefill_copied.synchronize()
        host, k = self._prefill_inputs_host, rows.numel()
        host[0, :N], host[1, :N], host[2, :N] = fbp.input_ids, fbp.positions, fbp.out_slots
        host[3, :batch] = 0
        host[3, :k] = rows
        self.prefill_inputs[:, :N].copy_(host[:, :N], non_blocking=True)
        self._prefill_copied = torch.cuda.Event()
        staging.record(self._prefill_copied)
        entry.graph.replay()
        self.prefill_replays += 1
        return self.prefill_hidden[:k], self.prefill_logits[:k]

    def _pick(self, fb: ForwardBatch) -> CapturedForward | None:
        b, n = fb.batch_size, fb.num_tokens
        tree = fb.custom_mask is not None
        if fb.logits_indices is not None or (not tree and n != b):
            return None
        best = None
        for batch, tokens, is_tree in self.shapes:
            if is_tree != tree or batch < b + tree:  # verify shapes always hold one dummy request
                continue
            if tokens < n + (batch - b):  # each dummy request needs a token
                continue
            if best is None or (tokens, batch) < (best[1], best[0]):
                best = (batch, tokens, tree)
        return None if best is None else self.graphs.get(best)

    def queue_safe_decode(self, batch: int, kv_tokens: int) -> bool:
        """Whether a decode step of `batch` requests with kv_tokens keys in all replays a graph
        that may be launched while the forward before it is still queued: one whose per-step
        inputs all go up through buffers used in turn (the Triton decode attention's; FlashInfer's
        plan keeps host state of its own)."""
        sizes = [b for b, _, tree in self.shapes if not tree and b >= batch]
        entry = self.graphs.get((min(sizes), min(sizes), False)) if sizes else None
        if entry is None or not getattr(entry.attn, "plans_in_turn", False):
            return False
        return kv_tokens + (entry.attn.batch - batch) <= entry.attn.kv_capacity  # a dummy has one key

    def forward(self, fb: ForwardBatch, input_ids: torch.Tensor | None = None):
        """Replay the graph that fits `fb` and return (hidden, logits) views; None = run eagerly.
        input_ids: the real rows' token ids as a device tensor, in place of fb's (a step fed by
        the one before it on the device)."""
        if fb.logits_indices is not None:  # a prompt chunk: its logits rows only
            return None if input_ids is not None else self._forward_prefill_graph(fb)
        entry = self._pick(fb)
        if entry is None:
            return None
        attn = entry.attn
        fbp = pad_batch(fb, attn.batch, attn.tokens)
        if not attn.fits(fbp):
            return None
        attn.plan(fbp)
        N, n = attn.tokens, fb.num_tokens
        if fbp.input_ids.device.type == "cpu":  # built on the host (decode steps): one pinned copy
            host = self._token_inputs_host[self._host_turn]
            self._host_turn ^= 1
            host[0, :N], host[1, :N], host[2, :N] = fbp.input_ids, fbp.positions, fbp.out_slots
            self.token_inputs[:, :N].copy_(host[:, :N], non_blocking=True)
        else:
            self.input_ids[:N].copy_(fbp.input_ids)
            self.positions[:N].copy_(fbp.positions)
            self.out_slots[:N].copy_(fbp.out_slots)
        if input_ids is not None:
            self.input_ids[:n].copy_(input_ids)
        entry.graph.replay()
        self.replays += 1
        return self.hidden[:n], self.logits[:n]
