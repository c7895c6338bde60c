"""Token trees as data.

A tree is the set of node paths (tuples of candidate ranks, Medusa's `medusa_choices`); the
root (empty path) is implicit and stands for the last accepted token. Everything the hot path
needs (parents, depths, the ancestor mask, retrieve indices) is derived once per tree and cached,
so a decoding step only indexes tensors. Trees are interned: `Tree.from_paths` returns the same
object for the same set of paths, which lets CUDA-graph capture and batch planning key on it.
The tensors are shared by every user of a tree: treat them as read-only.
"""
from __future__ import annotations

import functools
import hashlib
import json
import operator
from collections.abc import Iterable, Sequence

import torch

Path = tuple[int, ...]


class TreeError(ValueError):
    """A list of paths does not describe a valid token tree."""


def _canonical_key(path: Path) -> tuple[int, Path]:
    return (len(path), path)


def _as_path(p: object, i: int) -> Path:
    if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
        raise TreeError(f"path #{i} ({p!r}) must be a sequence of ranks")
    out = []
    for r in p:
        if isinstance(r, bool):
            raise TreeError(f"path #{i} {tuple(p)!r}: rank {r!r} must be an int, not a bool")
        try:
            r = operator.index(r)
        except TypeError:
            raise TreeError(f"path #{i} {tuple(p)!r}: rank {r!r} must be an int") from None
        if r < 0:
            raise TreeError(f"path #{i} {tuple(p)!r}: rank {r} must be non-negative")
        out.append(r)
    if not out:
        raise TreeError(f"path #{i} is empty; the root is implicit, leave it out")
    return tuple(out)


def canonical_paths(paths: Iterable[Sequence[int]], max_depth: int = 16, max_width: int = 64) -> tuple[Path, ...]:
    """Validate `paths` and return them (root excluded) in canonical (depth, path) order."""
    seen: set[Path] = set()
    for i, raw in enumerate(paths):
        p = _as_path(raw, i)
        if p in seen:
            raise TreeError(f"path {p!r} appears twice")
        if len(p) > max_depth:
            raise TreeError(f"path {p!r} has depth {len(p)} > max_depth {max_depth}")
        seen.add(p)
    children: dict[Path, int] = {}
    for p in seen:
        parent = p[:-1]
        if parent and parent not in seen:
            raise TreeError(f"path {p!r} has no parent: prefix {parent!r} is missing")
        children[parent] = children.get(parent, 0) + 1
    for parent, n in children.items():
        if n > max_width:
            raise TreeError(f"node {parent!r} has {n} children > max_width {max_width}")
    return tuple(sorted(seen, key=_canonical_key))


class Tree:
    """One token tree with its derived tensors (see module docstring)."""

    paths: tuple[Path, ...]
    num_nodes: int
    depth: int
    parents: torch.Tensor
    depths: torch.Tensor
    ranks: torch.Tensor
    mask: torch.Tensor
    retrieve_indices: torch.Tensor
    num_leaves: int
    children: torch.Tensor
    child_lists: list[list[int]]
    name: str

    def __init__(self, canonical: tuple[Path, ...]):
        """Use `Tree.from_paths`; this trusts `canonical` to be validated and ordered."""
        self.paths = ((),) + canonical
        n = len(self.paths)
        index = {p: i for i, p in enumerate(self.paths)}
        parents = [-1] + [index[p[:-1]] for p in canonical]
        self.num_nodes = n
        self.depth = max((len(p) for p in self.paths), default=0)
        self.parents = torch.tensor(parents, dtype=torch.long)
        self.depths = torch.tensor([len(p) for p in self.paths], dtype=torch.long)
        self.ranks = torch.tensor([p[-1] if p else 0 for p in self.paths], dtype=torch.long)

        # ancestor-or-self: row i = row of its parent plus i; parents precede children canonically
        mask = torch.eye(n, dtype=torch.bool)
        for i in range(1, n):
            mask[i] |= mask[parents[i]]
        self.mask = mask

        kids: list[list[int]] = [[] for _ in range(n)]
        for i in range(1, n):
            kids[parents[i]].append(i)
        width = max((len(k) for k in kids), default=0)
        self.children = torch.full((n, width), -1, dtype=torch.long)
        for i, k in enumerate(kids):
            self.children[i, : len(k)] = torch.tensor(k, dtype=torch.long)

        self.child_lists = kids  # the same as Python lists, for host-side walks (spec/verify.py)

        leaves = [i for i in range(n) if not kids[i]]
        self.num_leaves = len(leaves)
        ri = torch.full((len(leaves), self.depth + 1), -1, dtype=torch.long)
        for row, leaf in enumerate(leaves):
            chain_ = [leaf]
            while parents[chain_[-1]] >= 0:
                chain_.append(parents[chain_[-1]])
            ri[row, : len(chain_)] = torch.tensor(chain_[::-1], dtype=torch.long)
        self.retrieve_indices = ri
        self.is_leaf = torch.tensor([not k for k in kids], dtype=torch.bool)

        digest = hashlib.sha1(json.dumps(self.to_json()).encode()).hexdigest()[:8]
        self.name = f"n{n}d{self.depth}-{digest}"

    @classmethod
    def from_paths(cls, paths: Iterable[Sequence[int]], max_depth: int = 16, max_width: int = 64) -> Tree:
        """The (interned) tree over `paths`; raises TreeError on an invalid path list."""
        return _intern(canonical_paths(paths, max_depth, max_width))

    def to_json(self) -> list[list[int]]:
        """Non-root paths as lists, the inverse of `from_paths`."""
        return [list(p) for p in self.paths[1:]]

    def restrict(self, keep: torch.Tensor) -> tuple[Tree, torch.Tensor]:
        """The subtree of nodes in `keep` whose ancestors are all kept (root always kept).

        Returns the tree and the old index of each new node (canonical order is preserved, so
        the caller can gather per-node data such as drafted tokens with it).
        """
        keep = keep.to(torch.bool).cpu().clone()
        keep[0] = True
        closed = (~self.mask | keep[None, :]).all(dim=1)
        index = closed.nonzero().flatten()
        tree = _intern(tuple(self.paths[i] for i in index[1:].tolist()))
        return tree, index

    def truncate(self, max_depth: int) -> Tree:
        """The tree cut to depth <= max_depth (e.g. for a drafter with fewer heads)."""
        if max_depth >= self.depth:
            return self
        return self.restrict(self.depths <= max_depth)[0]

    def __hash__(self) -> int:
        return hash(self.paths)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tree) and other.paths == self.paths

    def __repr__(self) -> str:
        return f"Tree({self.name}, nodes={self.num_nodes}, depth={self.depth}, leaves={self.num_leaves})"


@functools.lru_cache(maxsize=16384)
def _intern(canonical: tuple[Path, ...]) -> Tree:
    return Tree(canonical)


def chain(depth: int) -> Tree:
    """A single path of `depth` top-1 candidates (plain multi-token prediction)."""
    if depth < 0:
        raise TreeError(f"chain depth must be >= 0, got {depth}")
    return Tree.from_paths([(0,) * d for d in range(1, depth + 1)], max_depth=max(depth, 1))


# The batch layout lives in its own module; re-exported here because callers think of it as
# part of the tree contract.
from srt_entmtp.spec.ragged import RaggedTreeBatch

__all__ = ["RaggedTreeBatch", "Tree", "TreeError", "canonical_paths", "chain"]
