"""DeviceSpecStep: the whole greedy speculative step on the device, two CUDA graphs per shape.

    host: choose trees, one input copy          -> device, draft graph: draft every tree
    host: take KV slots, plan attention, one input copy
                                                -> device, verify graph: verify forward -> accept
                                                   -> compact KV -> next hidden, root, entropy
    host: one result copy, then per-request bookkeeping

The two halves launch separately so the next step's drafts can be launched before this step's
result is read (`launch_draft` right after `launch_verify`): the draft graph reads only the
per-request pools the verify graph writes (each request's last hidden state and its next root
token), so the GPU drafts while the host collects the step and prepares the next verify.

The host path (`SpecWorker.decode`) builds a ragged batch of each request's exact tree and runs
drafting, acceptance and compaction as a few dozen eager ops with Python around them; on a GPU
that was ~5 ms of host work a step against a 1.2 ms forward. Here every request's tree is
placed in a fixed layout (spec/tree_layout.py), so all shapes depend only on the batch bucket
and the layout, and the tree itself is data gathered from a table uploaded at start-up.
Nothing inside the step reads a device value on the host.

Greedy only (temperature 0): a sampling request takes the host path, whose rejection sampling
walks each tree. The same code runs eagerly where graphs are off (CPU, SDPA), which is how the
CPU tests check it token for token against plain decoding.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from srt_entmtp.model import staging
from srt_entmtp.model.attention import tree_triton
from srt_entmtp.model.attention.tree_mask import pack_tree_mask
from srt_entmtp.model.forward_batch import ForwardBatch, _indptr
from srt_entmtp.model.staging import StagingRing
from srt_entmtp.spec.drafters import fused_draft
from srt_entmtp.spec.tree import Tree
from srt_entmtp.spec.tree_layout import LayoutTable, TreeLayout
from srt_entmtp.spec.verify_kernels import accept, verify_inputs

log = logging.getLogger(__name__)

ROOT_ONLY = Tree.from_paths([])
MAX_LAYOUTS = 4
LONE_LAYOUTS = 8  # a lone request's tree verifies in its own exact layout if the library has at most this many
# the verify graphs' attention: "auto" = tree_triton.py where Triton imports and a layout has at most 64
# slots, else FlashInfer's custom-mask prefill; "flashinfer" = always that
TREE_ATTENTIONS = ("auto", "flashinfer")


def batch_buckets(max_batch: int) -> list[int]:
    return sorted({b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_batch} | {max_batch})


def choose_layouts(trees: list[Tree], limit: int = MAX_LAYOUTS) -> list[TreeLayout]:
    """Nested layouts, smallest first, the last covering every drafted tree: the k-th covers the
    trees up to some size, so any batch of small trees fits a small layout (a batch takes the
    smallest layout all its trees fit; small trees should not pay for a large one's padding).
    Kept only where a layout grows the slot count by half, at most `limit`."""
    drafted = sorted({t for t in trees if t.num_nodes > 1}, key=lambda t: (t.num_nodes, t.name))
    if not drafted:
        return []
    nested = list(dict.fromkeys(TreeLayout.covering(drafted[: k + 1]) for k in range(len(drafted))))
    keep = [nested[-1]]
    for lay in reversed(nested[:-1]):
        if len(keep) < limit and lay.num_slots * 1.5 <= keep[-1].num_slots:
            keep.append(lay)
    return keep[::-1]


@dataclass
class DeviceStepResult:
    accept: list[int]               # accepted drafted tokens per request
    tokens: list[list[int]]         # emitted tokens per request (accepted drafts + bonus)
    entropy: np.ndarray             # [n, depth + 1] target entropy at each position; the first accept+1 are real
    slots: np.ndarray               # [n, S] the trees' KV slots per request; the first accept+1 hold the path


@dataclass
class InFlightStep:
    shape: _Shape
    reqs: list
    slots: np.ndarray               # [n * S] the trees' KV slots, request by request
    host: _HostResult | None = None  # where its result lands


@dataclass
class DraftedStep:
    """A launched draft graph, waiting for its verify half (`launch_verify`)."""
    li: int
    B: int                          # the batch bucket (padded size) both halves run at
    reqs: list


class _HostResult:
    """A pinned host copy of a shape's result buffer (accept, tokens | entropies) and its event."""

    def __init__(self, out: torch.Tensor, n_long: int, Bm: int, D: int, pin: bool):
        self.buf = torch.zeros_like(out, device="cpu", pin_memory=pin)
        self.result = self.buf[: 8 * n_long].view(torch.long).view(Bm, D + 2).numpy()  # numpy views: the host
        self.entropy = self.buf[8 * n_long:].view(torch.float32).view(Bm, D + 1).numpy()  # reads them every step
        self.done = torch.cuda.Event() if pin else None  # recorded after the copy


class _Shape:
    """Static buffers for one layout, sized for the largest batch bucket (1 for a lone layout)."""

    def __init__(self, table: LayoutTable, max_batch: int, capacity: int, device, lone: bool = False):
        lay = table.layout
        self.table, self.layout, self.lone = table, lay, lone
        S, D, Bm = lay.num_slots, lay.depth, max_batch
        long = {"dtype": torch.long, "device": device}
        pin = device.type == "cuda"
        # the draft graph's inputs: req_slot, root (-1: take the request's root from the pool), tree row.
        # Three pinned host copies in turn: with steps launched after unread ones the host stages a
        # step's drafts while the copies of the two drafts before may still wait on the stream (a
        # batch that changed adds a launch, so each copy is also fenced: model/staging.py)
        self.draft_in = torch.zeros(3 * Bm, **long)
        self.draft_host = StagingRing(self.draft_in, 3)
        self.req_slot, self.root, self.row = self.draft_in.view(3, Bm).unbind(0)
        self.tokens = torch.zeros(Bm, S, **long)  # the draft graph's output, the verify graph's input
        # the verify graph's inputs: prefix len, the slots of the step before when this one was
        # launched before that one was read (0: it was read), then out slots. Two pinned twins
        # in turn, like the drafts' (a step may be staged while the one before is still queued)
        self.verify_in = torch.zeros(2 * Bm + Bm * S, **long)
        self.verify_host = StagingRing(self.verify_in, 2)
        self.prefix, self.ahead, self.out_slots = self.verify_in[:Bm], self.verify_in[Bm:2 * Bm], self.verify_in[2 * Bm:]
        self.input_ids = torch.zeros(Bm * S, **long)
        self.positions = torch.zeros(Bm * S, **long)
        # outputs, one device-to-host copy of one byte buffer: accept, then D+1 emitted tokens
        # (-1 pad) as int64; the entropies at the path's D+1 positions as float32
        n_long, n_float = Bm * (D + 2), Bm * (D + 1)
        self.out = torch.zeros(8 * n_long + 4 * n_float, dtype=torch.uint8, device=device)
        self.result = self.out[: 8 * n_long].view(torch.long).view(Bm, D + 2)
        self.entropy = self.out[8 * n_long:].view(torch.float32).view(Bm, D + 1)
        # its host twins with their events (recorded after the copy), used in turn: two steps of
        # this shape may be in flight
        self.results = [_HostResult(self.out, n_long, Bm, D, pin) for _ in range(2)]
        self._result_turn = 0
        self.capacity = capacity  # the hidden pool's spare row, which padding requests use
        self.root_row = table.rows[ROOT_ONLY]


class DeviceSpecStep:
    def __init__(self, runner, drafter, trees: list[Tree], capacity: int, max_batch: int = 64,
                 tree_attention: str = "auto", lone_trees: list[Tree] | None = None):
        if tree_attention not in TREE_ATTENTIONS:
            raise ValueError(f"tree attention must be one of {', '.join(TREE_ATTENTIONS)}, got {tree_attention!r}")
        self.tree_attention = tree_attention
        self.runner, self.drafter = runner, drafter
        self.model, self.kv, self.dev = runner.model, runner.kv, runner.device
        self.capacity, self.max_batch = capacity, max_batch
        trees = [t.truncate(drafter.max_depth) for t in trees]
        self.layouts = choose_layouts(trees)
        self.shapes = [_Shape(LayoutTable(lay, trees + [ROOT_ONLY], self.dev), max_batch, capacity, self.dev)
                       for lay in self.layouts]
        # a lone request verifies its tree in that tree's own layout, not the covering one: at batch 1
        # the covering layout of the shipped library is 46 slots for trees of 32-33 nodes. lone_trees:
        # the trees a lone request can draft (the batch-1 library's), default all; the trees of the
        # libraries for larger batches never run alone, and counting them could pass LONE_LAYOUTS
        self._lone: dict[Tree, int] = {}
        lone = trees if lone_trees is None else [t.truncate(drafter.max_depth) for t in lone_trees]
        drafted = list(dict.fromkeys(t for t in lone if t.num_nodes > 1))
        if len(drafted) <= LONE_LAYOUTS:
            # trees of equal level widths share one exact layout: one lone shape whose table holds them all
            by_layout: dict[TreeLayout, list[Tree]] = {}
            for t in drafted:
                by_layout.setdefault(TreeLayout.covering([t]), []).append(t)
            for lay, group in by_layout.items():
                if lay in self.layouts:  # a shared layout already holds every tree that fits it
                    li = self.layouts.index(lay)
                else:
                    self.shapes.append(_Shape(LayoutTable(lay, group + [ROOT_ONLY], self.dev), 1, capacity,
                                              self.dev, lone=True))
                    self.layouts.append(lay)
                    li = len(self.shapes) - 1
                self._lone.update(dict.fromkeys(group, li))
        H = runner.config.hidden_size
        # each request's last hidden state (row = its worker slot; row `capacity` is padding's)
        self.hidden = torch.zeros(capacity + 1, H, dtype=runner.dtype, device=self.dev)
        self._pool_rows = list(self.hidden.unbind(0))
        # and the token each request's next step starts from (the verify graph writes its bonus token),
        # which a draft launched before that step is collected reads (launch_draft(pooled=True))
        self.roots = torch.zeros(capacity + 1, dtype=torch.long, device=self.dev)
        # and how many of its last step's tree slots it kept (accepted + 1): a step launched before
        # that one is read (launch_verify(after=...)) takes its prefix length from here
        self.kept = torch.zeros(capacity + 1, dtype=torch.long, device=self.dev)
        self._order = [i for i, sh in enumerate(self.shapes) if not sh.lone]  # by size (choose_layouts sorts them)
        # batch size -> its bucket (the smallest at least as big), looked up every step
        self._bucket_of = [next(b for b in batch_buckets(max_batch) if b >= n) for n in range(max_batch + 1)]
        # (layout, batch bucket) -> (attention, draft graph, verify graph)
        self.graphs: dict[tuple[int, int], tuple[object, torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]] = {}
        self._graph_ctx = None  # (pool, workspace, largest batch with a graph) once capture() ran
        self.capture_seconds = 0.0
        self.memory_bytes = 0
        self.replays = 0
        self.steps = 0
        self.pad_eager = False  # pad eager steps to their bucket too (tests the padding rows on CPU)

    # ---- selection ----------------------------------------------------------------------------
    def pick(self, trees: list[Tree], batch: int) -> int | None:
        """Index of the smallest layout holding every tree (for a lone request, its tree's own
        layout), or None (the host path takes it)."""
        if batch > self.max_batch:
            return None
        if batch == 1 and trees[0] in self._lone:
            return self._lone[trees[0]]
        for i in self._order:
            if self.shapes[i].table.holds(trees):
                return i
        return None

    def add_layout(self, trees: list[Tree]) -> int:
        """A layout for trees outside the library (calibration times many): its graphs are
        captured when first used, if this step captures graphs at all."""
        trees = [t.truncate(self.drafter.max_depth) for t in trees]
        lay = TreeLayout.covering([t for t in trees if t.num_nodes > 1] or [ROOT_ONLY])
        self.shapes.append(_Shape(LayoutTable(lay, trees + [ROOT_ONLY], self.dev), self.max_batch, self.capacity,
                                  self.dev))
        self.layouts.append(lay)
        self._order = sorted((i for i, sh in enumerate(self.shapes) if not sh.lone),
                             key=lambda i: self.shapes[i].layout.num_slots)
        return len(self.shapes) - 1

    def _buckets(self, li: int) -> list[int]:
        """The batch buckets layout li has graphs for, largest first (a lone layout: batch 1)."""
        return [1] if self.shapes[li].lone else sorted(batch_buckets(self._graph_ctx[2]), reverse=True)

    def bucket(self, batch: int) -> int:
        return self._bucket_of[batch]

    # ---- capture ------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self, max_batch: int, workspace: torch.Tensor | None = None) -> None:
        """One graph per (layout, batch bucket <= max_batch), each with its own FlashInfer wrapper
        in graph mode; bigger batches run the same step eagerly."""
        from srt_entmtp.model.attention.flashinfer import WORKSPACE_BYTES

        if workspace is None:
            workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.dev)
        self._graph_ctx = (torch.cuda.graph_pool_handle(), workspace, min(max_batch, self.max_batch))
        torch.cuda.synchronize()
        free0 = torch.cuda.mem_get_info()[0]
        t0 = time.perf_counter()
        for li in range(len(self.shapes)):
            for B in self._buckets(li):  # largest first: the pool fits all
                self._capture_one(li, B)
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - t0
        self.memory_bytes = free0 - torch.cuda.mem_get_info()[0]
        log.info("captured %d speculative-step CUDA graphs (layouts %s, batch <= %d; tree attention %s) in %.1fs, "
                 "holding %.0f MiB", len(self.graphs), ", ".join(map(str, self.layouts)), self._graph_ctx[2],
                 ", ".join(sorted(self.attention_kinds())), self.capture_seconds, self.memory_bytes / 2**20)

    def attention_kinds(self) -> set[str]:
        """Which tree attention the captured graphs use ("triton", "flashinfer")."""
        return {"triton" if isinstance(a, tree_triton.TreeAttention) else "flashinfer" for a, _, _ in self.graphs.values()}

    @torch.inference_mode()
    def capture_layout(self, li: int) -> None:
        """Capture every batch bucket of a layout added after start-up (no-op without graphs)."""
        if self._graph_ctx is None:
            return
        for B in self._buckets(li):
            if (li, B) not in self.graphs:
                self._capture_one(li, B)

    def _graph_attention(self, sh: _Shape, B: int, workspace: torch.Tensor):
        """The attention a (layout, batch) graph captures: Triton's tree kernel where it can, else
        FlashInfer's custom-mask prefill (`tree_attention` picks)."""
        from srt_entmtp.model.attention.flashinfer import GraphAttention

        cfg, ctx = self.runner.config, self.runner.context_length
        S = sh.layout.num_slots
        if self.tree_attention == "auto" and sh.table.anc is not None and tree_triton.available():
            return tree_triton.TreeAttention(self.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                             sh.out_slots[:B * S], B, S, B * (ctx + S))
        return GraphAttention(self.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, workspace,
                              sh.out_slots[:B * S], B, B * S, B * (ctx + S), True, B * S * (ctx + S))

    def _capture_one(self, li: int, B: int) -> None:
        pool, workspace, _ = self._graph_ctx
        sh = self.shapes[li]
        S = sh.layout.num_slots
        attn = self._graph_attention(sh, B, workspace)
        self._fill_draft(sh, [], [], [], B)  # all padding: touches slot 0 only
        self._fill_verify(sh, [], [], np.zeros(0, dtype=np.int64), B)
        attn.plan_fixed_trees(S, [1] * B, torch.zeros(B * (1 + S), dtype=torch.long))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, Triton and lazy inits
            for _ in range(2):
                self._draft_body(sh, B)
                self._verify_body(sh, B, attn)
        torch.cuda.current_stream().wait_stream(side)
        gd, gv = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(gd, pool=pool):
            self._draft_body(sh, B)
        with torch.cuda.graph(gv, pool=pool):
            self._verify_body(sh, B, attn)
        self.graphs[(li, B)] = (attn, gd, gv)

    # ---- one step -----------------------------------------------------------------------------
    def _graph_bucket(self, li: int, n: int) -> int:
        """The graph bucket of n requests in layout li (a lone layout's graphs are for batch 1)."""
        return 1 if self.shapes[li].lone else self.bucket(n)

    def _draft_bucket(self, li: int, n: int) -> int:
        """The batch size n requests of layout li draft and verify at: their graph's bucket, or n
        where they run eagerly (capturing a graph first for a layout added after start-up)."""
        B = self._graph_bucket(li, n)
        if (li, B) not in self.graphs and self._graph_ctx is not None and B <= self._graph_ctx[2]:
            self._capture_one(li, B)  # a layout added after start-up (calibration)
        return B if (li, B) in self.graphs or self.pad_eager else n

    @torch.inference_mode()
    def launch_draft(self, li: int, reqs, trees: list[Tree], pooled: bool | list[bool] = False) -> DraftedStep:
        """Start drafting: each request's tree from its hidden state and root (its pending
        token; a hidden state computed elsewhere, by prefill or a plain step, enters the pool).
        pooled=True: every request's last step is the device step in flight or just collected,
        whose verify graph writes both pools (hidden state, bonus token) before this graph runs
        (one stream): the roots come from there, since the host does not know them yet. A
        `joining` request's prompt chunk wrote both pools (Worker.pool_prompts): pooled too.
        A list: per request (a batch that changed since the step just collected: the requests
        that ran in it are pooled, new ones are not)."""
        sh = self.shapes[li]
        n = len(reqs)
        B = self._draft_bucket(li, n)
        if pooled is True:
            roots = [-1] * n
        else:
            from_pool = pooled if isinstance(pooled, list) else [False] * n
            roots = [-1 if p or r.joining else r.pending_token for r, p in zip(reqs, from_pool)]
            for r, p in zip(reqs, from_pool):
                if not p and not r.joining and r.last_hidden is not self._pool_rows[r.slot]:
                    self.hidden[r.slot].copy_(r.last_hidden)
        self._fill_draft(sh, [r.slot for r in reqs], roots, [sh.table.rows[t] for t in trees], B)
        entry = self.graphs.get((li, B))
        if entry is not None:
            entry[1].replay()
        else:
            self._draft_body(sh, B)
        return DraftedStep(li, B, reqs)

    def can_launch_after(self, li: int, reqs, after: InFlightStep) -> bool:
        """Whether these requests' step in layout li may verify before `after` (a step still in
        flight, holding some or all of them) is read: it replays a graph whose attention hides
        `after`'s rejected tree tail (Triton's tree kernel), and with all of `after`'s tree counted
        every request stays within the context and the keys fit the attention's buffer."""
        B = self._graph_bucket(li, len(reqs))
        entry = self.graphs.get((li, B))
        if entry is None or not isinstance(entry[0], tree_triton.TreeAttention):
            return False
        S, S0, n = self.shapes[li].layout.num_slots, after.shape.layout.num_slots, len(reqs)
        prefix = [r.num_kv for r in reqs]
        if max(prefix) + S0 + S > self.runner.context_length:
            return False
        return sum(prefix) + n * (S0 + S) + (B - n) * (1 + S) <= entry[0].kv_capacity

    @torch.inference_mode()
    def launch_verify(self, d: DraftedStep, after: InFlightStep | None = None) -> InFlightStep:
        """Take the trees' KV slots, plan attention and start verifying a drafted step; the
        result lands in pinned host memory (`collect` waits for it).

        after: a step still in flight (not read; `can_launch_after` said yes), of the same requests
        or of a batch that changed since (requests finished, or joined with their prompt chunk
        queued on the device). Each request that ran in it has for keys its prefix, all of that
        step's tree slots, then its own; the verify graph takes its prefix length from the device
        (`kept`, which that step writes) and hides that step's rejected slots, so the GPU never
        waits for the host between steps. A request that did not run in it has its prefix, then
        its own tree."""
        sh, B, reqs = self.shapes[d.li], d.B, d.reqs
        S, n = sh.layout.num_slots, len(reqs)
        slots = self.kv.alloc_array(n * S)
        prefix = [r.num_kv for r in reqs]
        own = slots.reshape(n, S)
        # per request: prefix, (the unread step's tree,) its own tree; numpy views, one concatenate
        if after is None:
            ahead = [0] * n
            parts = [x for r, s in zip(reqs, own) for x in (r.kv_array, s)]
        else:
            S0, m = after.shape.layout.num_slots, len(after.reqs)
            prev = after.slots.reshape(m, S0)
            if m == n and all(x is y for x, y in zip(after.reqs, reqs)):
                ahead = [S0] * n
                parts = [x for r, p, s in zip(reqs, prev, own) for x in (r.kv_array, p, s)]
            else:
                row = {id(r): i for i, r in enumerate(after.reqs)}
                at = [row.get(id(r)) for r in reqs]
                ahead = [0 if i is None else S0 for i in at]
                parts = [x for r, i, s in zip(reqs, at, own)
                         for x in ((r.kv_array, s) if i is None else (r.kv_array, prev[i], s))]
        self._fill_verify(sh, prefix, ahead, slots, B)
        parts.append(np.zeros((B - n) * (1 + S), dtype=np.int64))
        kv_idx = np.concatenate(parts)
        entry = self.graphs.get((d.li, B))
        padded = [p + a for p, a in zip(prefix, ahead)] + [1] * (B - n)  # padding requests: slot 0 is their one prefix key
        if entry is not None:
            attn, _, graph = entry
            attn.plan_fixed_trees(S, padded, kv_idx)
            graph.replay()
            self.replays += 1
        else:
            if after is not None:
                raise RuntimeError("a step launched after an unread one needs its verify graph (can_launch_after)")
            attn = self.runner.attn
            attn.plan(self._eager_batch(sh, B, padded, torch.from_numpy(kv_idx)))
            self._verify_body(sh, B, attn)
        self.steps += 1
        host = sh.results[sh._result_turn]
        sh._result_turn ^= 1
        host.buf.copy_(sh.out, non_blocking=True)  # the step's one device-to-host copy; `collect` waits for it
        if host.done is not None:
            staging.record(host.done)
        return InFlightStep(sh, reqs, slots, host)

    def collect(self, step: InFlightStep) -> DeviceStepResult:
        """Wait for a launched step and read its result (accept counts, tokens, entropies)."""
        sh, reqs, host = step.shape, step.reqs, step.host
        n, S = len(reqs), sh.layout.num_slots
        if host.done is not None:
            host.done.synchronize()
        accept = host.result[:n, 0].tolist()
        rows = host.result[:n, 1:].tolist()
        for r in reqs:
            r.last_hidden = self._pool_rows[r.slot]
        return DeviceStepResult(accept=accept, tokens=[row[:a + 1] for row, a in zip(rows, accept)],
                                entropy=host.entropy[:n].copy(),  # the buffer is reused two steps on
                                slots=step.slots.reshape(n, S))

    def _fill_draft(self, sh: _Shape, req_slots, roots, rows, B: int) -> None:
        """The draft graph's inputs (padded to B requests), one host-to-device copy."""
        n, Bm = len(req_slots), sh.req_slot.numel()
        host = sh.draft_host.take()
        # padding requests: the pool's spare hidden row, root token 0, a root-only tree (written
        # through numpy: a torch op per field costs more than the copy)
        h = host.numpy().reshape(3, Bm)
        h[0, :n], h[1, :n], h[2, :n] = req_slots, roots, rows
        h[0, n:B], h[1, n:B], h[2, n:B] = sh.capacity, 0, sh.root_row
        sh.draft_host.send()  # whole (1.5 KB at batch 64): one contiguous copy

    def _fill_verify(self, sh: _Shape, prefix, ahead, out_slots: np.ndarray, B: int) -> None:
        """The verify graph's inputs (padded to B requests), one host-to-device copy."""
        n, Bm, S = len(prefix), sh.prefix.numel(), sh.layout.num_slots
        host = sh.verify_host.take()
        h = host.numpy()
        h[:n], h[n:B] = prefix, 1  # padding: slot 0 is their one prefix key
        h[Bm: Bm + n], h[Bm + n: Bm + B] = ahead, 0
        o = h[2 * Bm: 2 * Bm + B * S]
        o[: n * S] = out_slots
        o[n * S:] = 0
        sh.verify_host.send()  # whole: one contiguous copy (rows past B are unused)

    def _eager_batch(self, sh: _Shape, B: int, prefix: list[int], kv_idx: torch.Tensor) -> ForwardBatch:
        """The same forward as a ForwardBatch, for backends planned eagerly (SDPA, CPU)."""
        S, dev = sh.layout.num_slots, self.dev
        rows = sh.row[:B].cpu()
        kv_lens = [p + S for p in prefix]
        return ForwardBatch(input_ids=sh.input_ids[:B * S], positions=sh.positions[:B * S],
                            out_slots=sh.out_slots[:B * S], qo_indptr=_indptr([S] * B, dev),
                            kv_indptr=_indptr(kv_lens, dev), kv_indices=kv_idx.to(dev), q_lens=[S] * B,
                            kv_lens=kv_lens, custom_mask=sh.table.mask_cpu[rows].reshape(-1).to(dev))

    def _draft_body(self, sh: _Shape, B: int) -> None:
        """Draft B requests' trees into sh.tokens; static shapes, device ops only."""
        row, req = sh.row[:B], sh.req_slot[:B]
        tab = sh.table
        if fused_draft.tree_usable(self.drafter, self.hidden, B, sh.layout):  # GPU: no torch op between kernels
            fused_draft.draft_tree(self.drafter, self.hidden, self.roots, req, sh.root[:B], tab, row, sh.tokens[:B])
            return
        root = torch.where(sh.root[:B] >= 0, sh.root[:B], self.roots[req])
        sh.tokens[:B] = self.drafter.propose_layout(self.hidden[req], root, sh.layout, tab.parent_in_level[row],
                                                    tab.rank[row])

    def _verify_body(self, sh: _Shape, B: int, attn) -> None:
        """Verify and accept the drafted trees of B requests; static shapes, device ops only."""
        tab = sh.table
        S = sh.layout.num_slots
        row, req = sh.row[:B], sh.req_slot[:B]
        # launched after a step not yet read (ahead > 0): that step's kept slots extend the prefix
        known, ahead = sh.prefix[:B], sh.ahead[:B]
        out_slots = sh.out_slots[:B * S].view(B, S)
        tokens = sh.tokens[:B]
        ids, pos = sh.input_ids[:B * S], sh.positions[:B * S]
        if isinstance(attn, tree_triton.TreeAttention):
            # ids, positions, the masks as one int64 of ancestor bits per node, and that step's
            # rejected slots hidden (spec/verify_kernels.py: one kernel on CUDA)
            verify_inputs(tokens, tab, row, req, known, ahead, self.kept, ids, pos, attn.anc, attn.skip)
        else:
            verify_inputs(tokens, tab, row, req, known, ahead, self.kept, ids, pos, None, None)
            if getattr(attn, "tree", False) and hasattr(attn, "mask_indptr"):  # FlashInfer graph mode: packed bits
                prefix = known + torch.where(ahead > 0, self.kept[req], 0)
                pack_tree_mask(attn.mask, attn.mask_indptr, prefix, tab.mask[row], attn.mask.numel())
        hidden = self.model.forward(ids, pos, attn)
        logits = self.model.lm_head_linear(hidden)  # [B*S, V] in the model's dtype
        # acceptance, KV compaction and the pools (spec/verify_kernels.py: two kernels on CUDA)
        accept(tokens, logits, hidden, tab, row, req, out_slots, self.kv, self.hidden, self.roots, self.kept,
               sh.result[:B], sh.entropy[:B])
