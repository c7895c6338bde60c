"""Prompt lookup: draft tokens copied from the request's own context.

Where the request's latest tokens (prompt + output, the pending root last) occurred before, the
tokens that followed them then are a free guess at what follows now: code restates names and
signatures, math restates the question's numbers, and a small model repeats itself. The guess
costs no model work, so it joins the heads' tree as one more branch under the root, a chain of
up to `max_tokens` nodes, and is verified with the rest of the tree (lossless like any draft:
with sampling it is a point-mass proposal, as the heads' candidates are).

`LookupIndex` keeps, per request, the latest continuation of every n-gram (n = min_match ..
max_match); `sync` folds in only the tokens added since the last step, so a step costs
O(new tokens x n), not O(context). `with_lookup` grafts the chain onto a tree: lookup nodes have
the reserved rank LOOKUP_RANK, which no drafter is ever asked for (the worker drafts the head
tree, then grafts).
"""
from __future__ import annotations

import functools

import torch

from srt_entmtp.spec.tree import Tree

LOOKUP_RANK = 999  # rank of a lookup node in a tree path: far beyond any drafter's candidates
MAX_LOOKUP_TOKENS = 16


class LookupIndex:
    """n-gram -> where its latest continuation starts, over one request's token history."""

    __slots__ = ("max_match", "min_match", "table", "tokens")

    def __init__(self, min_match: int = 2, max_match: int = 4):
        if not 1 <= min_match <= max_match:
            raise ValueError(f"lookup match lengths must satisfy 1 <= min ({min_match}) <= max ({max_match})")
        self.min_match, self.max_match = min_match, max_match
        self.tokens: list[int] = []
        self.table: dict[tuple[int, ...], int] = {}

    def sync(self, prompt: list[int], output: list[int]) -> None:
        """Index prompt + output (a request's history only grows, so only its new tail is read)."""
        have, P = len(self.tokens), len(prompt)
        if have < P:
            self._extend(prompt[have:])
            have = P
        if have - P < len(output):
            self._extend(output[have - P:])

    def _extend(self, new: list[int]) -> None:
        toks, table = self.tokens, self.table
        for tok in new:
            i = len(toks)  # tok continues every n-gram that ends at i - 1
            for n in range(self.min_match, min(self.max_match, i) + 1):
                table[tuple(toks[i - n:i])] = i
            toks.append(tok)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest earlier occurrence of the latest tokens."""
        toks = self.tokens
        for n in range(min(self.max_match, len(toks)), self.min_match - 1, -1):
            start = self.table.get(tuple(toks[-n:]))
            if start is not None:
                return toks[start:start + k]
        return []


@functools.lru_cache(maxsize=4096)
def with_lookup(tree: Tree, m: int) -> tuple[Tree, torch.Tensor]:
    """`tree` plus a chain of m lookup nodes under the root, and for each node of the result its
    index in [tree's nodes..., the m chain tokens...] (the order node tokens are gathered from)."""
    if m == 0:
        return tree, torch.arange(tree.num_nodes)
    chain = [(LOOKUP_RANK,) * d for d in range(1, m + 1)]
    out = Tree.from_paths(list(tree.paths[1:]) + chain, max_depth=max(tree.depth, m, 1))
    where = {p: i for i, p in enumerate(tree.paths)}
    where.update({p: tree.num_nodes + d for d, p in enumerate(chain)})
    return out, torch.tensor([where[p] for p in out.paths], dtype=torch.long)


def is_lookup_node(tree: Tree) -> torch.Tensor:
    """BoolTensor[n]: which nodes of `tree` are lookup nodes."""
    return (tree.ranks == LOOKUP_RANK) & (tree.depths > 0)
