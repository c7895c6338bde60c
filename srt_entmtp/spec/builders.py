"""Tree builders under the independence model of acceptance.

An acceptance table `acc[d, r]` (FloatTensor[D, K]) is the probability that the rank-r draft
candidate at depth d+1 is the accepted token, given that its parent was accepted. Under this
model (Medusa's, also Sequoia's starting point) a node is accepted with the product of `acc`
along its path, so the expected number of accepted nodes of a tree is a sum of path products.

`greedy_tree` is Medusa's construction. `optimal_tree` is exact: the best subtree below a node
depends only on the node's depth and on how many nodes it may spend, so a dynamic programme over
(depth, budget) with a 0/1 knapsack over the children's ranks finds the maximum (Sequoia's idea).
The knapsack does not assume the table decreases along ranks, so measured tables work as is.

Note: with every entry in [0, 1], a node's path product never exceeds its parent's, so the n
nodes with the largest products are already closed under prefixes and greedy is optimal too
(the tests check both against brute force). The DP is kept as the independent exact solver, as
the one that yields every budget's optimum from one pass (`pareto_front`), and as the place to
extend when the objective stops being a plain sum of path products (per-depth costs, say).
"""
from __future__ import annotations

import heapq

import torch

from srt_entmtp.spec.tree import Path, Tree


def _check_table(acc: torch.Tensor) -> torch.Tensor:
    acc = torch.as_tensor(acc, dtype=torch.float64).cpu()
    if acc.dim() != 2:
        raise ValueError(f"acceptance table must be 2-D [depth, rank], got shape {tuple(acc.shape)}")
    if not bool(torch.isfinite(acc).all()) or bool((acc < 0).any()) or bool((acc > 1).any()):
        raise ValueError("acceptance table entries must be probabilities in [0, 1]")
    return acc


def node_accept_probs(tree: Tree, acc: torch.Tensor) -> torch.Tensor:
    """FloatTensor[N] (float64): probability that each node is accepted; root = 1.

    Nodes beyond the table (deeper than D or rank >= K) are never accepted.
    """
    acc = _check_table(acc)
    D, K = acc.shape
    d, r = tree.depths, tree.ranks
    inside = (d >= 1) & (d <= D) & (r < K)
    step = torch.zeros(tree.num_nodes, dtype=torch.float64)
    step[inside] = acc[d[inside] - 1, r[inside]]
    step[0] = 1.0
    # fold parents in level by level: after level k every node of depth <= k is final
    prob = step.clone()
    for level in range(1, tree.depth + 1):
        at = d == level
        prob[at] = step[at] * prob[tree.parents[at]]
    return prob


def expected_accept_length(tree: Tree, acc: torch.Tensor) -> float:
    """Expected number of accepted non-root nodes of `tree` under table `acc`."""
    return float(node_accept_probs(tree, acc)[1:].sum())


def greedy_tree(acc: torch.Tensor, num_nodes: int, max_depth: int | None = None) -> Tree:
    """Medusa's construction: add the frontier node with the highest path product, `num_nodes` times.

    Stops early when no frontier node has a positive product.
    """
    acc = _check_table(acc)
    D, K = acc.shape
    depth_cap = D if max_depth is None else min(D, max_depth)
    chosen: list[Path] = []
    frontier: list[tuple[float, int, Path]] = []

    def push_children(path: Path, value: float) -> None:
        if len(path) >= depth_cap:
            return
        for r in range(K):
            v = value * float(acc[len(path), r])
            heapq.heappush(frontier, (-v, len(path) + 1, path + (r,)))

    push_children((), 1.0)
    while frontier and len(chosen) < num_nodes:
        neg, _, path = heapq.heappop(frontier)
        if -neg <= 0.0:
            break
        chosen.append(path)
        push_children(path, -neg)
    return Tree.from_paths(chosen, max_depth=max(depth_cap, 1), max_width=max(K, 1))


class _Plan:
    """DP tables for one acceptance table: best value and knapsack choices per (depth, budget)."""

    def __init__(self, acc: torch.Tensor, max_nodes: int, max_depth: int):
        acc = _check_table(acc)
        D, K = acc.shape
        self.depth_cap = max(0, min(D, max_depth))
        self.K = K
        M = max(0, max_nodes)
        self.M = M
        m = torch.arange(M + 1).view(-1, 1)
        b = torch.arange(M + 1).view(1, -1)
        usable = (b >= 1) & (b <= m)                   # child subtree size b (child + b-1 below)
        src = (m - b).clamp(min=0)
        # value[d][m]: best expected accepted descendants of a node at depth d with m nodes to spend
        self.value = [torch.zeros(M + 1, dtype=torch.float64) for _ in range(self.depth_cap + 1)]
        # choice[d][r][m]: size of rank-r child's subtree in the best use of ranks 0..r with budget m
        self.choice: list[list[list[int]]] = [[] for _ in range(self.depth_cap)]
        for d in range(self.depth_cap - 1, -1, -1):
            below = self.value[d + 1]
            best = torch.zeros(M + 1, dtype=torch.float64)
            for r in range(K):
                gain = torch.zeros(M + 1, dtype=torch.float64)
                gain[1:] = acc[d, r] * (1.0 + below[:-1])
                cand = torch.where(usable, best[src] + gain.view(1, -1), float("-inf"))
                top, arg = cand.max(dim=1)
                take = top > best
                self.choice[d].append(torch.where(take, arg, 0).tolist())
                best = torch.where(take, top, best)
            self.value[d] = best

    def paths(self, budget: int) -> list[Path]:
        out: list[Path] = []

        def grow(path: Path, left: int) -> None:
            d = len(path)
            if d >= self.depth_cap:
                return
            for r in range(self.K - 1, -1, -1):
                size = self.choice[d][r][left]
                if size:
                    child = path + (r,)
                    out.append(child)
                    grow(child, size - 1)
                    left -= size

        grow((), min(budget, self.M))
        return out

    def tree(self, budget: int) -> Tree:
        return Tree.from_paths(self.paths(budget), max_depth=max(self.depth_cap, 1), max_width=max(self.K, 1))


def optimal_tree(acc: torch.Tensor, num_nodes: int, max_depth: int) -> Tree:
    """The tree with at most `num_nodes` non-root nodes and depth <= `max_depth` that maximises
    `expected_accept_length` under `acc` (ties go to fewer nodes)."""
    return _Plan(acc, num_nodes, max_depth).tree(num_nodes)


def pareto_front(acc: torch.Tensor, max_nodes: int, max_depth: int) -> list[tuple[int, float, Tree]]:
    """(non-root node count, expected accepted length, tree) of the optimal tree per budget
    0..max_nodes. One DP serves every budget. A budget whose optimum is the same tree as a
    smaller budget's (the table has zeros) is listed once, so the front strictly improves."""
    plan = _Plan(acc, max_nodes, max_depth)
    front: list[tuple[int, float, Tree]] = []
    for budget in range(max_nodes + 1):
        tree = plan.tree(budget)
        if front and front[-1][2] is tree:
            continue
        front.append((tree.num_nodes - 1, expected_accept_length(tree, acc), tree))
    return front
