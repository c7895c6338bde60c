"""DeviceSpecStep: the whole greedy speculative step on the device, one CUDA graph per shape.

    host: choose trees, take KV slots, plan attention, one input copy
    device (one graph per batch bucket x tree layout):
        draft -> build mask -> verify forward -> accept -> compact KV -> next hidden, entropy
    host: one result copy, then per-request bookkeeping

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
import os
import time
from dataclasses import dataclass

import torch

from srt_entmtp.model.attention import tree_triton
from srt_entmtp.model.attention.tree_mask import pack_tree_mask
from srt_entmtp.model.forward_batch import ForwardBatch, _indptr
from srt_entmtp.spec.entropy import entropy_from_logits
from srt_entmtp.spec.tree import Tree
from srt_entmtp.spec.tree_layout import LayoutTable, TreeLayout

log = logging.getLogger(__name__)

ROOT_ONLY = Tree.from_paths([])
MAX_LAYOUTS = 4
LONE_LAYOUTS = 8  # a lone request's tree verifies in its own exact layout if the library has at most this many
# the verify graphs' attention: "triton" (tree_triton.py, where Triton imports and a layout has at most 64
# slots) or "flashinfer" (its custom-mask prefill); read at capture
TREE_ATTENTION = os.environ.get("ENTMTP_TREE_ATTENTION", "triton")


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
    entropy: list[list[float]]      # target entropy at each accepted position (root first)
    slots: list[torch.Tensor]       # the tree's KV slots per request; the first accept+1 hold the path


@dataclass
class InFlightStep:
    shape: _Shape
    reqs: list
    slots: torch.Tensor             # [n * S] the trees' KV slots, request by request


class _Shape:
    """Static buffers for one layout, sized for the largest batch bucket (1 for a lone layout)."""

    def __init__(self, table: LayoutTable, max_batch: int, capacity: int, device, lone: bool = False):
        lay = table.layout
        self.table, self.layout, self.lone = table, lay, lone
        S, D, Bm = lay.num_slots, lay.depth, max_batch
        long = {"dtype": torch.long, "device": device}
        # inputs, one host-to-device copy a step: req_slot, root, tree row, prefix len, then out slots
        self.inputs = torch.zeros(4 * Bm + Bm * S, **long)
        self.host = torch.zeros_like(self.inputs, device="cpu").pin_memory() if device.type == "cuda" else None
        self.req_slot, self.root, self.row, self.prefix = self.inputs[:4 * Bm].view(4, Bm).unbind(0)
        self.out_slots = self.inputs[4 * Bm:]
        self.input_ids = torch.zeros(Bm * S, **long)
        self.positions = torch.zeros(Bm * S, **long)
        # outputs, one device-to-host copy of one byte buffer: accept, then D+1 emitted tokens
        # (-1 pad) as int64; the entropies at the path's D+1 positions as float32
        pin = device.type == "cuda"
        n_long, n_float = Bm * (D + 2), Bm * (D + 1)
        self.out = torch.zeros(8 * n_long + 4 * n_float, dtype=torch.uint8, device=device)
        self.out_host = torch.zeros_like(self.out, device="cpu", pin_memory=pin)
        self.result = self.out[: 8 * n_long].view(torch.long).view(Bm, D + 2)
        self.entropy = self.out[8 * n_long:].view(torch.float32).view(Bm, D + 1)
        self.result_host = self.out_host[: 8 * n_long].view(torch.long).view(Bm, D + 2)
        self.entropy_host = self.out_host[8 * n_long:].view(torch.float32).view(Bm, D + 1)
        self.done = torch.cuda.Event() if pin else None  # recorded after the result copy
        self.capacity = capacity  # the hidden pool's spare row, which padding requests use
        self.root_row = table.rows[ROOT_ONLY]


class DeviceSpecStep:
    def __init__(self, runner, drafter, trees: list[Tree], capacity: int, max_batch: int = 64):
        self.runner, self.drafter = runner, drafter
        self.model, self.kv, self.dev = runner.model, runner.kv, runner.device
        self.capacity, self.max_batch = capacity, max_batch
        trees = [t.truncate(drafter.max_depth) for t in trees]
        self.layouts = choose_layouts(trees)
        self.shapes = [_Shape(LayoutTable(lay, trees + [ROOT_ONLY], self.dev), max_batch, capacity, self.dev)
                       for lay in self.layouts]
        # a lone request verifies its tree in that tree's own layout, not the covering one: at batch 1
        # the covering layout of the shipped library is 46 slots for trees of 32-33 nodes
        self._lone: dict[Tree, int] = {}
        drafted = list(dict.fromkeys(t for t in trees if t.num_nodes > 1))
        if len(drafted) <= LONE_LAYOUTS:
            for t in drafted:
                lay = TreeLayout.covering([t])
                if lay in self.layouts:
                    self._lone[t] = self.layouts.index(lay)
                    continue
                self.shapes.append(_Shape(LayoutTable(lay, [t, ROOT_ONLY], self.dev), 1, capacity, self.dev, lone=True))
                self.layouts.append(lay)
                self._lone[t] = len(self.shapes) - 1
        H = runner.config.hidden_size
        # each request's last hidden state (row = its worker slot; row `capacity` is padding's)
        self.hidden = torch.zeros(capacity + 1, H, dtype=runner.dtype, device=self.dev)
        self._pool_rows = list(self.hidden.unbind(0))
        self._order = [i for i, sh in enumerate(self.shapes) if not sh.lone]  # by size (choose_layouts sorts them)
        self.graphs: dict[tuple[int, int], tuple[object, torch.cuda.CUDAGraph]] = {}
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
        return next(b for b in batch_buckets(self.max_batch) if b >= batch)

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
        return {"triton" if isinstance(a, tree_triton.TreeAttention) else "flashinfer" for a, _ in self.graphs.values()}

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
        FlashInfer's custom-mask prefill (the ENTMTP_TREE_ATTENTION setting picks)."""
        from srt_entmtp.model.attention.flashinfer import GraphAttention

        cfg, ctx = self.runner.config, self.runner.context_length
        S = sh.layout.num_slots
        if TREE_ATTENTION not in ("triton", "flashinfer"):
            raise ValueError(f"ENTMTP_TREE_ATTENTION must be triton or flashinfer, got {TREE_ATTENTION!r}")
        if TREE_ATTENTION == "triton" and sh.table.anc is not None and tree_triton.available():
            return tree_triton.TreeAttention(self.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                             sh.out_slots[:B * S], B, S, B * (ctx + S))
        return GraphAttention(self.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, workspace,
                              sh.out_slots[:B * S], B, B * S, B * (ctx + S), True, B * S * (ctx + S))

    def _capture_one(self, li: int, B: int) -> None:
        pool, workspace, _ = self._graph_ctx
        sh = self.shapes[li]
        S = sh.layout.num_slots
        attn = self._graph_attention(sh, B, workspace)
        self._fill(sh, [], [], [], [], torch.zeros(0, dtype=torch.long), B)  # all padding: touches slot 0 only
        attn.plan_fixed_trees(S, [1] * B, torch.zeros(B * (1 + S), dtype=torch.long))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside capture: cuBLAS handles, Triton and lazy inits
            for _ in range(2):
                self._body(sh, B, attn)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool):
            self._body(sh, B, attn)
        self.graphs[(li, B)] = (attn, g)

    # ---- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, li: int, reqs, trees: list[Tree], roots: list[int] | None = None) -> InFlightStep:
        """Start the step for `reqs` (each verifying its tree from `trees`, rooted at `roots`,
        default each request's pending token) and return without waiting for the device: the
        caller may do host work until `collect`. Slots for the trees are taken here; the step's
        result lands in pinned host memory."""
        sh = self.shapes[li]
        S, n = sh.layout.num_slots, len(reqs)
        B = 1 if sh.lone else self.bucket(n)
        if (li, B) not in self.graphs and self._graph_ctx is not None and B <= self._graph_ctx[2]:
            self._capture_one(li, B)  # a layout added after start-up (calibration)
        if (li, B) not in self.graphs and not self.pad_eager:
            B = n  # eager: no padding needed
        for r in reqs:  # hidden states computed elsewhere (prefill, plain steps) enter the pool
            if r.last_hidden is not self._pool_rows[r.slot]:
                self.hidden[r.slot].copy_(r.last_hidden)
        slots = self.kv.alloc(n * S)
        prefix = [int(r.kv_slots.numel()) for r in reqs]
        self._fill(sh, [r.slot for r in reqs], roots if roots is not None else [r.pending_token for r in reqs],
                   [sh.table.rows[t] for t in trees], prefix, slots, B)
        kv_idx = torch.cat([x for r, s in zip(reqs, slots.view(n, S)) for x in (r.kv_slots, s)]
                           + [torch.zeros((B - n) * (1 + S), dtype=torch.long)])
        entry = self.graphs.get((li, B))
        padded = prefix + [1] * (B - n)  # padding requests: slot 0 is their one prefix key
        if entry is not None:
            attn, graph = entry
            attn.plan_fixed_trees(S, padded, kv_idx)
            graph.replay()
            self.replays += 1
        else:
            attn = self.runner.attn
            attn.plan(self._eager_batch(sh, B, padded, kv_idx))
            self._body(sh, B, attn)
        self.steps += 1
        sh.out_host.copy_(sh.out, non_blocking=True)  # the step's one device-to-host copy; `collect` waits for it
        if sh.done is not None:
            sh.done.record()
        return InFlightStep(sh, reqs, slots)

    def collect(self, step: InFlightStep) -> DeviceStepResult:
        """Wait for a launched step and read its result (accept counts, tokens, entropies)."""
        sh, reqs = step.shape, step.reqs
        n, S = len(reqs), sh.layout.num_slots
        if sh.done is not None:
            sh.done.synchronize()
        accept = sh.result_host[:n, 0].tolist()
        rows = sh.result_host[:n, 1:].tolist()
        ents = sh.entropy_host[:n].tolist()
        for r in reqs:
            r.last_hidden = self._pool_rows[r.slot]
        return DeviceStepResult(accept=accept, tokens=[row[:a + 1] for row, a in zip(rows, accept)],
                                entropy=[e[:a + 1] for e, a in zip(ents, accept)], slots=list(step.slots.view(n, S)))

    def _fill(self, sh: _Shape, req_slots, roots, rows, prefix, out_slots: torch.Tensor, B: int) -> None:
        """Write the step's inputs (padded to B requests) with one host-to-device copy."""
        n, Bm, S = len(req_slots), sh.req_slot.numel(), sh.layout.num_slots
        pad = B - n
        host = sh.host if sh.host is not None else torch.empty_like(sh.inputs)
        v = host[:4 * Bm].view(4, Bm)
        # padding requests: the pool's spare hidden row, a root-only tree, slot 0 as their one prefix key
        v[:, :B] = torch.tensor([req_slots + [sh.capacity] * pad, roots + [0] * pad, rows + [sh.root_row] * pad,
                                 prefix + [1] * pad], dtype=torch.long)
        o = host[4 * Bm: 4 * Bm + B * S]
        o[: n * S] = out_slots
        o[n * S:] = 0
        sh.inputs[:4 * Bm + B * S].copy_(host[:4 * Bm + B * S], non_blocking=True)

    def _eager_batch(self, sh: _Shape, B: int, prefix: list[int], kv_idx: torch.Tensor) -> ForwardBatch:
        """The same forward as a ForwardBatch, for backends planned eagerly (SDPA, CPU)."""
        S, dev = sh.layout.num_slots, self.dev
        rows = sh.row[:B].cpu()
        kv_lens = [p + S for p in prefix]
        return ForwardBatch(input_ids=sh.input_ids[:B * S], positions=sh.positions[:B * S],
                            out_slots=sh.out_slots[:B * S], qo_indptr=_indptr([S] * B, dev),
                            kv_indptr=_indptr(kv_lens, dev), kv_indices=kv_idx.to(dev), q_lens=[S] * B,
                            kv_lens=kv_lens, custom_mask=sh.table.mask_cpu[rows].reshape(-1).to(dev))

    def _body(self, sh: _Shape, B: int, attn) -> None:
        """Draft, verify and accept for B requests; only static shapes and device ops."""
        lay, tab = sh.layout, sh.table
        S, D = lay.num_slots, lay.depth
        dev = self.dev
        row = sh.row[:B]
        par, pil, rank = tab.parent[row], tab.parent_in_level[row], tab.rank[row]
        depth, valid, mask = tab.depth[row], tab.valid[row], tab.mask[row]
        prefix = sh.prefix[:B]
        out_slots = sh.out_slots[:B * S].view(B, S)

        tokens = self.drafter.propose_layout(self.hidden[sh.req_slot[:B]], sh.root[:B], lay, pil, rank)
        ids, pos = sh.input_ids[:B * S], sh.positions[:B * S]
        ids.copy_(tokens.view(-1))
        pos.copy_((prefix.unsqueeze(1) + depth).view(-1))
        if isinstance(attn, tree_triton.TreeAttention):  # the masks as one int64 of ancestor bits per node
            attn.set_trees(tab.anc[row])
        elif getattr(attn, "tree", False) and hasattr(attn, "mask_indptr"):  # FlashInfer graph mode: packed bits
            pack_tree_mask(attn.mask, attn.mask_indptr, prefix, mask, attn.mask.numel())
        hidden = self.model.forward(ids, pos, attn)
        logits = self.model.logits(hidden)                       # [B*S, V] float32
        pred = logits.argmax(-1).view(B, S)

        # greedy acceptance: a node is right if its token is its parent's argmax; accepted if it
        # and every ancestor are right (mask rows are ancestor-or-self)
        ok = valid & (tokens == pred.gather(1, par))
        ok[:, 0] = True
        acc = (~mask | ok.unsqueeze(1)).all(-1)
        slot = torch.arange(S, device=dev)
        leaf = torch.where(acc, depth * (S + 1) + (S - slot), -1).argmax(1)  # deepest; first on a tie
        a = depth.gather(1, leaf.unsqueeze(1)).squeeze(1)
        on_path = mask[torch.arange(B, device=dev), leaf]                  # [B, S]
        d = torch.arange(D + 1, device=dev)
        sel = on_path.unsqueeze(1) & (depth.unsqueeze(1) == d.view(1, -1, 1))  # [B, D+1, S]
        path = torch.where(sel.any(-1), sel.to(torch.uint8).argmax(-1), leaf.unsqueeze(1))  # slot at depth d
        bonus = pred.gather(1, leaf.unsqueeze(1))
        drafted = torch.cat([tokens.gather(1, path[:, 1:]), bonus], 1)      # [B, D+1]
        emitted = torch.where(d < a.unsqueeze(1), drafted, torch.where(d == a.unsqueeze(1), bonus, -1))

        # the accepted path's KV moves to the first a+1 slots of the request's tree slots
        dst = out_slots[:, : D + 1]
        src = torch.where(d <= a.unsqueeze(1), out_slots.gather(1, path), dst)
        self.kv.copy_slots(src.reshape(-1), dst.reshape(-1))

        H = hidden.shape[-1]
        self.hidden[sh.req_slot[:B]] = hidden.view(B, S, H)[torch.arange(B, device=dev), leaf]
        ent = entropy_from_logits(logits).view(B, S).gather(1, path)
        sh.result[:B, 0] = a
        sh.result[:B, 1:] = emitted
        sh.entropy[:B] = ent
