"""Draft-time benchmark: ms per `propose` for a tree, per drafter kind and draft-vocabulary size.

Run through `scripts/train_heads.py bench` (prints a table, writes JSON). Fresh (untrained)
heads time the same as trained ones: the work is fixed by the shapes. With a runner, the
verification forward of the same tree (the target model over its nodes after a prefix) is
timed too, so draft cost can be read against the step it serves.
"""
from __future__ import annotations

import heapq
import statistics
import time
from typing import Any

import torch

from srt_entmtp.spec.drafters import DRAFTERS, Drafter
from srt_entmtp.spec.drafters.base import as_llama
from srt_entmtp.spec.ragged import RaggedTreeBatch
from srt_entmtp.spec.tree import Tree


def bench_tree(num_nodes: int = 32, max_depth: int = 5, decay_depth: float = 0.75, decay_rank: float = 0.45) -> Tree:
    """A deterministic Medusa-style tree of `num_nodes` nodes (root included): greedy by the
    product of a synthetic acceptance acc(d, r) = decay_depth**d * decay_rank**r along the path."""
    heap = [(-1.0, (0,))]
    paths: list[tuple[int, ...]] = []
    while heap and len(paths) < num_nodes - 1:
        negv, p = heapq.heappop(heap)
        paths.append(p)
        v = -negv
        if len(p) < max_depth:
            heapq.heappush(heap, (-v * decay_depth, p + (0,)))
        heapq.heappush(heap, (-v * decay_rank, p[:-1] + (p[-1] + 1,)))
    return Tree.from_paths(paths, max_depth=max_depth)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_fn(fn, dev: torch.device, repeats: int, warmup: int) -> dict:
    for _ in range(warmup):
        fn()
    _sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        ts.append((time.perf_counter() - t0) * 1e3)
    return {"ms_median": round(statistics.median(ts), 3), "ms_mean": round(statistics.fmean(ts), 3),
            "ms_min": round(min(ts), 3)}


def benchmark(base: Any, *, kinds=("medusa", "hydra", "mtp"), vocab_sizes=(0, 16384, 8192), tree: Tree | None = None,
              batch_size: int = 1, repeats: int = 50, warmup: int = 5, drafters: dict[str, Drafter] | None = None,
              runner=None, prefix_len: int = 256) -> list[dict]:
    """Rows {kind, draft_vocab, nodes, batch, ms_*}: fresh heads of each kind at each vocabulary
    size (0 = the full LM head), then any loaded `drafters` (kind -> heads) as "<kind> (trained)"."""
    model = as_llama(base)
    dev = model.device
    tree = tree or bench_tree()
    batch = RaggedTreeBatch.build([tree] * batch_size, [prefix_len] * batch_size, device=dev)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch_size, model.cfg.hidden_size, generator=g).to(dev, model.dtype)
    roots = torch.randint(0, model.cfg.vocab_size, (batch_size,), generator=g).to(dev)
    rows = []
    cases = [(kind, nv, None) for kind in kinds for nv in vocab_sizes]
    cases += [(f"{kind} (trained)", d.draft_vocab_size, d) for kind, d in (drafters or {}).items()]
    for name, nv, d in cases:
        if d is None:
            dv = None if not nv else torch.randperm(model.cfg.vocab_size, generator=g)[:nv]
            d = DRAFTERS[name](base, draft_vocab=dv).to(dev, model.dtype).eval()
        if tree.depth > d.max_depth:
            continue
        with torch.inference_mode():
            r = time_fn(lambda d=d: d.propose(hidden, roots, batch), dev, repeats, warmup)
        rows.append({"kind": name, "draft_vocab": d.draft_vocab_size, "compressed": d.draft_vocab is not None,
                     "nodes": tree.num_nodes, "depth": tree.depth, "batch": batch_size, **r})
    if runner is not None:
        rows.append(dict(kind="verify (target forward)", draft_vocab=model.cfg.vocab_size, compressed=False,
                         nodes=tree.num_nodes, depth=tree.depth, batch=batch_size,
                         **time_verify(runner, tree, batch_size, prefix_len, repeats, warmup)))
    return rows


def time_verify(runner, tree: Tree, batch_size: int, prefix_len: int, repeats: int, warmup: int) -> dict:
    from srt_entmtp.model.forward_batch import ForwardBatch

    kv = runner.kv
    prefix = [kv.alloc(prefix_len) for _ in range(batch_size)]
    new = [kv.alloc(tree.num_nodes) for _ in range(batch_size)]
    try:
        fb = ForwardBatch.build([torch.zeros(tree.num_nodes, dtype=torch.long)] * batch_size, prefix, new,
                                positions=[prefix_len + tree.depths] * batch_size,
                                custom_masks=[tree.mask] * batch_size, device=runner.device)
        return time_fn(lambda: runner.forward(fb), runner.device, max(5, repeats // 5), 2)
    finally:
        for s in prefix + new:
            kv.free(s)


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'drafter':<24} {'draft vocab':>11} {'nodes':>5} {'batch':>5} {'ms median':>10} {'ms min':>8}"]
    for r in rows:
        lines.append(f"{r['kind']:<24} {r['draft_vocab']:>11} {r['nodes']:>5} {r['batch']:>5} "
                     f"{r['ms_median']:>10.2f} {r['ms_min']:>8.2f}")
    return "\n".join(lines)
