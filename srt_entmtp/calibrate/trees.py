"""Tree search (`entmtp calibrate trees`): acceptance statistics + a cost curve -> a tree library.

For each task family and entropy bucket: the acceptance table of the positions in that bucket,
the Pareto front of trees (non-root nodes vs expected accepted drafts) from the core's exact
search, and the tree on the front that maximises predicted tokens per second

    (1 + E[accepted]) / step_latency(batch, nodes)

(the 1 is the bonus token every step emits; nodes = 0 is the root-only tree, i.e. no drafting).
Buckets are quantiles of the estimator over the collected positions. Buckets whose best trees
are within `merge_tolerance` of each other's rate share one tree, so a family keeps a handful.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from srt_entmtp.calibrate.cost import step_cost_fn
from srt_entmtp.calibrate.stats import HEAD_FAMILIES, AcceptanceStats
from srt_entmtp.spec.builders import expected_accept_length, optimal_tree, pareto_front
from srt_entmtp.spec.library import EstimatorConfig, Family, PolicyConfig, TreeEntry, TreeLibrary
from srt_entmtp.spec.tree import Tree


@dataclass
class BucketChoice:
    lo: float
    hi: float
    positions: int
    acc: torch.Tensor
    front: list[tuple[int, float, float]]   # (nodes, E[accepted], predicted tokens/s)
    best: Tree
    best_rate: float


def tree_cost(tree: Tree, cost) -> float:
    """Step seconds of `tree` under a cost function of (nodes, depth)."""
    return cost(tree.num_nodes - 1, tree.depth)


def predicted_rate(tree: Tree, acc: torch.Tensor, cost) -> float:
    return (1.0 + expected_accept_length(tree, acc)) / tree_cost(tree, cost)


def quantile_edges(values: torch.Tensor, buckets: int, min_count: int) -> list[float]:
    """Edges at equal quantiles, dropping any that would leave fewer than `min_count` positions
    in a bucket (sparse data gets fewer, wider buckets)."""
    n = values.numel()
    buckets = max(1, min(buckets, n // max(min_count, 1)))
    if buckets <= 1:
        return []
    qs = torch.linspace(0, 1, buckets + 1, dtype=torch.float64)[1:-1]
    edges = sorted({round(float(e), 3) for e in torch.quantile(values, qs)})
    return [e for e in edges if math.isfinite(e)]


def depth_fronts(acc: torch.Tensor, max_nodes: int, max_depth: int) -> list[tuple[int, float, Tree]]:
    """The exact front at every depth cap 1..max_depth, merged: for each node count the best tree
    of each depth, since a sequential drafter's step costs more per level than per node."""
    seen, out = set(), []
    for d in range(1, max_depth + 1):
        for n, e, t in pareto_front(acc, max_nodes, d):
            if t.name not in seen:
                seen.add(t.name)
                out.append((n, e, t))
    return sorted(out, key=lambda x: (x[0], x[2].depth))


def search_family(stats: AcceptanceStats, family: str | None, edges: list[float], cost, max_nodes: int,
                  max_depth: int) -> list[BucketChoice]:
    bounds = [float("-inf")] + list(edges) + [float("inf")]
    out = []
    for lo, hi in itertools.pairwise(bounds):
        acc, counts = stats.table(family, lo, hi)
        front = depth_fronts(acc, max_nodes, max_depth)
        scored = [(n, e, (1.0 + e) / tree_cost(t, cost), t) for n, e, t in front]
        _, _, rate, tree = max(scored, key=lambda x: x[2])
        out.append(BucketChoice(lo, hi, int(counts[0]), acc, [(a, b, c) for a, b, c, _ in scored], tree, rate))
    return out


def merge_choices(choices: list[BucketChoice], cost, tolerance: float, max_trees: int) -> tuple[list[Tree], list[int]]:
    """A small set of trees and each bucket's index into it: repeatedly drop the tree whose
    removal costs least (each of its buckets takes the best remaining tree), while no bucket
    loses more than `tolerance` of its best rate, or while there are more than `max_trees`."""
    trees = list(dict.fromkeys(c.best for c in choices))

    def assign(pool):
        return [max(range(len(pool)), key=lambda i: predicted_rate(pool[i], c.acc, cost)) for c in choices]

    while len(trees) > 1:
        best_drop, best_loss = None, None
        for j in range(len(trees)):
            pool = trees[:j] + trees[j + 1:]
            idx = assign(pool)
            loss = max(1.0 - predicted_rate(pool[i], c.acc, cost) / c.best_rate for i, c in zip(idx, choices))
            if best_loss is None or loss < best_loss:
                best_drop, best_loss = j, loss
        if best_loss is not None and (best_loss <= tolerance or len(trees) > max_trees):
            trees.pop(best_drop)
        else:
            break
    return trees, assign(trees)


def build_library(stats: AcceptanceStats, cost: dict, batch: int, *, buckets: int = 4, min_bucket: int = 300,
                  max_nodes: int = 64, max_depth: int | None = None, merge_tolerance: float = 0.02,
                  max_trees: int = 5, hysteresis: float = 0.1, min_steps_between_switches: int = 2,
                  hardware: str | None = None, lookup_tokens: int = 0,
                  lookup_min_match: int = 2, cost_fit: str = "lower", one_tree: bool = False) -> tuple[TreeLibrary, dict]:
    """The library and a report (per family and bucket: counts, front, choice, predicted rates).
    cost_fit: how the grid's noise is taken out of the prices (`cost.step_cost_fn`). one_tree:
    every family and bucket gets the one tree, among the buckets' best, with the best rate pooled
    over all the families' positions, so that a batch mixing families verifies that tree's own
    layout and not a covering one (`layout_notes`; for libraries of batch > 1)."""
    cost_fn = step_cost_fn(cost, batch, stats.drafter, fit=cost_fit)
    depth = min(stats.depth, max_depth or stats.depth)
    node_cap = max_nodes
    fams: dict[str, Family] = {}
    report: dict = {"batch": batch, "cost_fit": cost_fit, "one_tree": one_tree, "families": {}}
    searched = {}
    for fam in list(HEAD_FAMILIES) + ["general"]:
        key = None if fam == "general" else fam
        if key is not None and (fam not in stats.families or not stats.families[fam].ranks):
            continue
        edges = quantile_edges(stats.entropies(key), buckets, min_bucket)
        searched[fam] = (key, edges, search_family(stats, key, edges, cost_fn, node_cap, depth))
    shared = None
    if one_tree:  # pooled over the head families' buckets ("general" pools the same positions again)
        pooled = [c for k, _, ch in searched.values() if k is not None for c in ch] or \
            [c for _, _, ch in searched.values() for c in ch]
        shared = max(dict.fromkeys(c.best for _, _, ch in searched.values() for c in ch),
                     key=lambda t: _mix_rate(pooled, [0] * len(pooled), [t], cost_fn))
    for fam, (key, edges, choices) in searched.items():
        if shared is not None:
            trees, idx = [shared], [0] * len(choices)
        else:
            trees, idx = merge_choices(choices, cost_fn, merge_tolerance, max_trees)
        # the pooled (single static) best for this family, for the report and the ablation
        pooled_acc, _ = stats.table(key)
        static = max((t for _, _, t in depth_fronts(pooled_acc, node_cap, depth)),
                     key=lambda t: predicted_rate(t, pooled_acc, cost_fn))
        entries = []
        for j, t in enumerate(trees):
            eal = tuple(expected_accept_length(t, c.acc) for c in choices)
            entries.append(TreeEntry(f"{fam}-{j}-n{t.num_nodes - 1}", t, eal, round(tree_cost(t, cost_fn) * 1e3, 3)))
        fams[fam] = Family(fam, tuple(entries), tuple(edges), tuple(idx))
        rep_b = []
        for c, i in zip(choices, idx):
            rep_b.append({"lo": c.lo, "hi": c.hi, "positions": c.positions,
                          "acc_top1": [round(float(x), 4) for x in c.acc[:, 0]],
                          "best_nodes": c.best.num_nodes - 1, "best_rate": c.best_rate,
                          "chosen": entries[i].name, "chosen_rate": predicted_rate(trees[i], c.acc, cost_fn),
                          "root_only_rate": 1.0 / cost_fn(0), "front": c.front})
        expected_entmtp = _mix_rate(choices, idx, trees, cost_fn)
        expected_static = _mix_rate(choices, [0] * len(choices), [static], cost_fn)
        report["families"][fam] = {"edges": edges, "buckets": rep_b, "static_best": static.to_json(),
                                   "static_best_nodes": static.num_nodes - 1,
                                   "predicted_tokens_per_s": {"entmtp": expected_entmtp, "best_static": expected_static,
                                                              "none": 1.0 / cost_fn(0)}}
    est = stats.estimator
    policy = PolicyConfig(estimator=EstimatorConfig(mode=est.mode, ema_decay=est.ema_decay, window=est.window,
                                                    init=est.init),
                          hysteresis=hysteresis, min_steps_between_switches=min_steps_between_switches,
                          lookup_tokens=lookup_tokens, lookup_min_match=lookup_min_match)
    hw = hardware or cost.get("hardware", "unknown hardware")
    desc = (f"Calibrated by `entmtp calibrate trees` for batch {batch}: acceptance statistics of "
            f"{stats.drafter} heads ({sum(len(f.ranks) for f in stats.families.values())} positions), "
            f"step costs measured on {hw} ({cost_fit} fit).")
    lib = TreeLibrary(stats.model, stats.drafter, f"{hw}, batch {batch}", policy, fams, description=desc,
                      batch_size=batch)
    return lib, report


def layout_notes(lib: TreeLibrary, batch: int) -> list[str]:
    """What the search does not price about how the device step will verify this library's trees
    (spec/device_step.py): at batch 1, each tree gets its own layout only while the batch-1 library
    holds at most LONE_LAYOUTS distinct drafted trees; at larger batches, a batch mixing families
    verifies every request in the covering layout of its trees, so one family's deeper or wider
    tree widens every request's verify (a fused matmul takes at most small_linear.SMALL_M rows)."""
    from srt_entmtp.spec.device_step import LONE_LAYOUTS
    from srt_entmtp.spec.tree_layout import TreeLayout

    drafted = [t for t in lib.all_trees() if t.num_nodes > 1]
    if not drafted:
        return []
    if batch == 1:
        if len(drafted) > LONE_LAYOUTS:
            return [(f"{len(drafted)} distinct drafted trees, more than LONE_LAYOUTS = {LONE_LAYOUTS}: a lone "
                     "request will verify in a covering layout, not its tree's own (cap --max-trees)")]
        return []
    own = {TreeLayout.covering([t]).num_slots for t in drafted}
    cover = TreeLayout.covering(drafted).num_slots
    if cover <= max(own):
        return []
    return [(f"a batch mixing families verifies the covering layout of {cover} slots ({batch} x {cover} = "
             f"{batch * cover} rows at batch {batch}), against {max(own)} for the largest tree alone: the "
             "search priced each tree alone; --one-tree gives every family one tree")]


def _mix_rate(choices: list[BucketChoice], idx: list[int], trees: list[Tree], cost) -> float:
    """Predicted tokens/s over a family's positions when bucket b verifies trees[idx[b]]: total
    tokens over total time, weighting each bucket by its share of positions (steps)."""
    tok = tim = 0.0
    for c, i in zip(choices, idx):
        t = trees[i]
        w = c.positions
        tok += w * (1.0 + expected_accept_length(t, c.acc))
        tim += w * tree_cost(t, cost)
    return tok / tim if tim else 0.0


def medusa_style_tree(stats: AcceptanceStats, num_nodes: int = 63, max_depth: int = 5) -> Tree:
    """A Medusa-style default: the best `num_nodes`-node tree for the drafter's pooled statistics
    over every family (how Medusa derived mc_sim_7b_63 from its heads' accuracies)."""
    acc, _ = stats.table(None)
    return optimal_tree(acc, num_nodes, min(max_depth, stats.depth))
