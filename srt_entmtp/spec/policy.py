"""Tree policies: which tree each request verifies at this step.

All policies answer `choose(slots, families, entropy) -> list[Tree]` for a batch (one tree per
request; requests may differ) and `reset(slots)` when a slot gets a new request. EntMTPPolicy is
the paper's: a per-family tree library indexed by the request's rolling entropy, with hysteresis
so that an entropy hovering near a bucket edge does not flip the tree every step (each flip
changes the batch's shape, which costs graph replays and planning, and gains nothing).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch

from srt_entmtp.spec.classify import TASK_FAMILIES, classify_task
from srt_entmtp.spec.library import TreeLibrary
from srt_entmtp.spec.tree import Tree

__all__ = [
    "TASK_FAMILIES",
    "ConfidencePolicy",
    "EntMTPPolicy",
    "StaticPolicy",
    "TreePolicy",
    "classify_task",
    "path_confidence",
]


class TreePolicy(Protocol):
    def choose(self, slots: torch.Tensor, families: Sequence[str], entropy: torch.Tensor) -> list[Tree]: ...

    def reset(self, slots: torch.Tensor) -> None: ...


class StaticPolicy:
    """The same tree for every request at every step (the Medusa / fixed-tree baseline)."""

    def __init__(self, tree: Tree):
        self.tree = tree

    def choose(self, slots: torch.Tensor, families: Sequence[str], entropy: torch.Tensor) -> list[Tree]:
        return [self.tree] * len(families)

    def reset(self, slots: torch.Tensor) -> None:
        pass


class EntMTPPolicy:
    """Entropy-bucketed trees per task family, with hysteresis per request.

    A request keeps its current bucket until its entropy leaves that bucket's interval by more
    than `hysteresis` nats (below its lower edge minus the margin, or above its upper edge plus
    the margin) and at least `min_steps_between_switches` choices passed since its last switch; then it
    moves to the bucket its entropy falls in. A slot's first choice (after reset, or when its
    family changes) takes the entropy's bucket directly and does not count as a switch.
    """

    def __init__(self, library: TreeLibrary, capacity: int = 1024, hysteresis: float | None = None,
                 min_steps_between_switches: int | None = None):
        self.library = library
        self.hysteresis = library.policy.hysteresis if hysteresis is None else float(hysteresis)
        self.min_steps = (library.policy.min_steps_between_switches if min_steps_between_switches is None
                          else int(min_steps_between_switches))
        names = list(library.families)
        self._family_id = {n: i for i, n in enumerate(names)}
        self._general = self._family_id["general"]
        F = len(names)
        nb = max(f.num_buckets for f in library.families.values())
        # host numpy state: chosen every step, where torch's per-op CPU overhead would dominate
        self.edges = np.full((F, nb), np.inf, dtype=np.float32)  # edge i = upper edge of bucket i
        self.num_buckets = np.zeros(F, dtype=np.int64)
        self.trees: list[Tree] = []
        self.tree_id = np.zeros((F, nb), dtype=np.int64)          # (family, bucket) -> self.trees index
        for fi, name in enumerate(names):
            fam = library.families[name]
            self.edges[fi, : len(fam.bucket_edges)] = fam.bucket_edges
            self.num_buckets[fi] = fam.num_buckets
            for b in range(fam.num_buckets):
                self.tree_id[fi, b] = len(self.trees)
                self.trees.append(fam.tree_for_bucket(b))
        self.bucket = np.full(capacity, -1, dtype=np.int64)
        self.family = np.full(capacity, -1, dtype=np.int64)
        self.since_switch = np.zeros(capacity, dtype=np.int64)
        self._thr = self._thresholds()

    def reset(self, slots) -> None:
        s = _host_long(slots)
        self.bucket[s] = -1
        self.family[s] = -1
        self.since_switch[s] = 0

    def family_ids(self, families: Sequence[str]) -> np.ndarray:
        return np.array([self._family_id.get(f, self._general) for f in families], dtype=np.int64)

    def choose(self, slots, families: Sequence[str], entropy) -> list[Tree]:
        s = _host_long(slots)
        h = entropy.detach().float().cpu().numpy() if isinstance(entropy, torch.Tensor) else np.asarray(entropy)
        h = np.where(np.isnan(h), self.library.policy.estimator.init, h).astype(np.float32)  # no estimate: the prior
        if len(s) <= SMALL_BATCH:
            return self._choose_each(s.tolist(), families, h.tolist())
        f = self.family_ids(families)
        edges = self.edges[f]                                         # [B, nb]
        target = (h[:, None] >= edges).sum(axis=1)                    # bucketize(right=True)
        cur = self.bucket[s]
        fresh = (cur < 0) | (self.family[s] != f)
        c = np.maximum(cur, 0)
        rows = np.arange(len(s))
        lo = np.where(c > 0, edges[rows, np.maximum(c - 1, 0)], -np.inf)
        hi = np.where(c < self.num_buckets[f] - 1, edges[rows, c], np.inf)
        outside = (h < lo - self.hysteresis) | (h > hi + self.hysteresis)
        since = self.since_switch[s] + 1
        switch = ~fresh & outside & (since >= self.min_steps) & (target != cur)
        new = np.where(fresh | switch, target, cur)
        self.bucket[s] = new
        self.family[s] = f
        self.since_switch[s] = np.where(switch, 0, since)
        return [self.trees[i] for i in self.tree_id[f, new].tolist()]

    def _thresholds(self) -> tuple[list, list, list]:
        """Per family, as Python floats: the edges, and per current bucket the entropy below / above
        which it is left (hysteresis applied), computed with choose()'s numpy ops so that both
        forms compare the very same float32 values (built once, in __init__)."""
        F, nb = self.edges.shape
        c = np.arange(nb)[None, :].repeat(F, 0)
        lo = np.where(c > 0, self.edges[:, np.maximum(c[0] - 1, 0)], -np.inf) - self.hysteresis
        hi = np.where(c < self.num_buckets[:, None] - 1, self.edges, np.inf) + self.hysteresis
        return self.edges.tolist(), lo.tolist(), hi.tolist()

    def _choose_each(self, slots: list[int], families: Sequence[str], h: list[float]) -> list[Tree]:
        """choose() for a few requests, one at a time: the same decisions (tested), in Python, where
        ~25 numpy calls on arrays of 1-16 values cost ~60 us a step and this ~2 us a request."""
        edges, lo, hi = self._thr
        bucket, family, since_sw, tree_id = self.bucket, self.family, self.since_switch, self.tree_id
        fid, general, min_steps, trees = self._family_id, self._general, self.min_steps, self.trees
        out = []
        for s, name, x in zip(slots, families, h):
            f = fid.get(name, general)
            target = sum(1 for e in edges[f] if x >= e)
            cur = int(bucket[s])
            since = int(since_sw[s]) + 1
            if cur < 0 or family[s] != f:
                new, since_new = target, since
            else:
                switch = (x < lo[f][cur] or x > hi[f][cur]) and since >= min_steps and target != cur
                new, since_new = (target, 0) if switch else (cur, since)
            bucket[s], family[s], since_sw[s] = new, f, since_new
            out.append(trees[tree_id[f, new]])
        return out

    def current_bucket(self, slots) -> torch.Tensor:
        """LongTensor[B]: each slot's bucket (-1 before its first choice), e.g. for metrics."""
        return torch.from_numpy(self.bucket[_host_long(slots)].copy())


# batches up to this size choose one request at a time (EntMTPPolicy._choose_each), larger ones vectorised
SMALL_BATCH = 16


def _host_long(x) -> np.ndarray:
    return x.detach().cpu().numpy().astype(np.int64, copy=False) if isinstance(x, torch.Tensor) else np.asarray(x, np.int64)


T = TypeVar("T")


def for_batch(by_size: list[tuple[int, T]], batch: int) -> T:
    """From (batch_size, x) pairs sorted by size: the x with the largest batch_size not above
    `batch`, else the smallest one's (how libraries calibrated per batch size are picked)."""
    best = by_size[0][1]
    for size, x in by_size:
        if size <= batch:
            best = x
    return best


class LoadAwarePolicy:
    """Several libraries calibrated at different batch sizes: each step the running batch picks
    the one with the largest batch_size not above it (the smallest one's below that). Trees that
    pay at batch 1 cost several times a plain step at batch 64, where a library calibrated there
    shrinks them toward a chain or nothing; this is how ENTMTP stays no slower under load."""

    def __init__(self, policies: list[tuple[int, TreePolicy]]):
        if not policies:
            raise ValueError("LoadAwarePolicy needs at least one (batch_size, policy)")
        self.policies = sorted(policies, key=lambda p: p[0])

    def for_batch(self, batch: int) -> TreePolicy:
        return for_batch(self.policies, batch)

    def choose(self, slots, families: Sequence[str], entropy) -> list[Tree]:
        return self.for_batch(len(families)).choose(slots, families, entropy)

    def reset(self, slots) -> None:
        for _, pol in self.policies:
            pol.reset(slots)


def path_confidence(tree: Tree, node_probs: torch.Tensor) -> torch.Tensor:
    """Product of the drafter's probabilities along each node's path ([n]; the root's own is ignored)."""
    logp = node_probs.detach().double().cpu().clamp(min=1e-300).log()
    logp[0] = 0.0
    return (tree.mask.double() @ logp).exp().to(node_probs.dtype)


class ConfidencePolicy:
    """Wraps a policy and lets the worker prune drafted nodes the drafter itself doubts.

    Pruning happens after drafting (the confidences come from the draft), so `choose` delegates
    and `prune` is called per request with the drafted path confidences.
    """

    def __init__(self, base_policy: TreePolicy, threshold: float):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"confidence threshold must be in [0, 1], got {threshold}")
        self.base, self.threshold = base_policy, float(threshold)

    def choose(self, slots: torch.Tensor, families: Sequence[str], entropy: torch.Tensor) -> list[Tree]:
        return self.base.choose(slots, families, entropy)

    def reset(self, slots: torch.Tensor) -> None:
        self.base.reset(slots)

    def prune_with_index(self, tree: Tree, node_path_confidence: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        """The pruned tree and, per kept node, its index in `tree` (to gather drafted tokens)."""
        if node_path_confidence.shape[0] != tree.num_nodes:
            raise ValueError(f"{node_path_confidence.shape[0]} confidences for a tree of {tree.num_nodes} nodes")
        return tree.restrict(node_path_confidence.detach().cpu() >= self.threshold)

    def prune(self, tree: Tree, node_path_confidence: torch.Tensor) -> Tree:
        """Drop nodes whose path confidence is below the threshold, with their descendants."""
        return self.prune_with_index(tree, node_path_confidence)[0]
