"""Fixed-shape placement of draft trees, so a whole speculative step can be one CUDA graph.

A `TreeLayout` is a number of node slots per depth (`widths`, the root's level holding 1).
Any tree with at most widths[d] nodes at each depth d fits: its depth-d nodes take the first
slots of level d, the rest are padding. Every request of a step then brings exactly
`num_slots` nodes, laid out level by level, whatever its tree, so drafting, verification and
acceptance have static shapes; which tree a request uses is data (a row of a `LayoutTable`),
not shape. Padding slots are drafted and verified like real nodes but can never be accepted:
they see only themselves (and the prefix) and are marked invalid.

The engine builds one table per layout at start-up from the library's trees (they are all
known), uploads it once, and a step gathers its requests' rows on the device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from srt_entmtp.model.attention.tree_triton import MAX_NODES, ancestor_bits
from srt_entmtp.spec.tree import Tree


@dataclass(frozen=True)
class TreeLayout:
    widths: tuple[int, ...]   # slots per depth; widths[0] == 1 (the root)
    ks: tuple[int, ...]       # candidates drafted per level: 1 + the largest rank at depth L+1

    @classmethod
    def covering(cls, trees: list[Tree]) -> TreeLayout:
        """The smallest layout every one of `trees` fits."""
        depth = max(t.depth for t in trees)
        widths, ks = [1] + [0] * depth, [1] * depth
        for t in trees:
            d = t.depths.tolist()
            r = t.ranks.tolist()
            for lvl in range(1, t.depth + 1):
                widths[lvl] = max(widths[lvl], d.count(lvl))
                ks[lvl - 1] = max(ks[lvl - 1], 1 + max(rk for rk, dd in zip(r, d) if dd == lvl))
        return cls(tuple(widths), tuple(ks))

    @property
    def depth(self) -> int:
        return len(self.widths) - 1

    @property
    def num_slots(self) -> int:
        return sum(self.widths)

    @property
    def offsets(self) -> tuple[int, ...]:
        """First slot of each level."""
        out, a = [], 0
        for w in self.widths:
            out.append(a)
            a += w
        return tuple(out)

    def fits(self, tree: Tree) -> bool:
        if tree.depth > self.depth:
            return False
        d, r = tree.depths.tolist(), tree.ranks.tolist()
        return all(d.count(lvl) <= self.widths[lvl] and
                   all(rk < self.ks[lvl - 1] for rk, dd in zip(r, d) if dd == lvl)
                   for lvl in range(1, tree.depth + 1))

    def __str__(self) -> str:
        return "x".join(map(str, self.widths))


@dataclass
class PlacedTree:
    """One tree in a layout's slots (all [num_slots] long/bool tensors, `mask` [S, S])."""
    node: torch.Tensor          # tree node index of each slot, -1 for padding
    slot_of_node: torch.Tensor  # [tree.num_nodes] the slot each node took
    parent: torch.Tensor        # slot of the parent (root and padding: 0)
    parent_in_level: torch.Tensor  # the parent's index within its own level (root and padding: 0)
    rank: torch.Tensor          # candidate rank (root and padding: 0)
    depth: torch.Tensor         # depth of the slot's level
    valid: torch.Tensor         # bool: a real node
    mask: torch.Tensor          # bool: row s sees column j iff j is s or an ancestor of s (padding: itself only)


@functools.lru_cache(maxsize=1024)
def place(layout: TreeLayout, tree: Tree) -> PlacedTree:
    if not layout.fits(tree):
        raise ValueError(f"tree {tree.name} does not fit layout {layout}")
    S, offs = layout.num_slots, layout.offsets
    node = [-1] * S
    slot_of = [0] * tree.num_nodes
    used = [0] * len(layout.widths)
    for i, p in enumerate(tree.paths):  # canonical order: a level's nodes keep their order
        lvl = len(p)
        s = offs[lvl] + used[lvl]
        used[lvl] += 1
        node[s], slot_of[i] = i, s
    parents = tree.parents.tolist()
    ranks = tree.ranks.tolist()
    parent, pil, rank, depth, valid = [0] * S, [0] * S, [0] * S, [0] * S, [False] * S
    for lvl, (o, w) in enumerate(zip(offs, layout.widths)):
        for s in range(o, o + w):
            depth[s] = lvl
            i = node[s]
            if i < 0:
                continue
            valid[s] = True
            rank[s] = ranks[i]
            if parents[i] >= 0:
                parent[s] = slot_of[parents[i]]
                pil[s] = parent[s] - offs[lvl - 1]
    mask = torch.eye(S, dtype=torch.bool)
    sl = torch.tensor(slot_of)
    mask[sl.unsqueeze(1), sl.unsqueeze(0)] = tree.mask  # tree.mask[i, j]: j is i or an ancestor of i
    t = functools.partial(torch.tensor, dtype=torch.long)
    return PlacedTree(node=t(node), slot_of_node=sl, parent=t(parent), parent_in_level=t(pil), rank=t(rank),
                      depth=t(depth), valid=torch.tensor(valid), mask=mask)


class LayoutTable:
    """Every placeable tree of one layout stacked into device tensors; `rows[tree]` is its row."""

    FIELDS = ("parent", "parent_in_level", "rank", "depth", "valid", "mask")

    def __init__(self, layout: TreeLayout, trees: list[Tree], device: torch.device | str):
        self.layout = layout
        uniq = list(dict.fromkeys(t for t in trees if layout.fits(t)))
        if not uniq:
            raise ValueError(f"no tree fits layout {layout}")
        self.trees = uniq
        self.rows = {t: i for i, t in enumerate(uniq)}
        placed = [place(layout, t) for t in uniq]
        for f in self.FIELDS:
            setattr(self, f, torch.stack([getattr(p, f) for p in placed]).to(device))
        self.mask_cpu = torch.stack([p.mask for p in placed])
        # the mask rows as ancestor bits, for the Triton tree attention (layouts of up to 64 slots)
        self.anc = ancestor_bits(self.mask_cpu).to(device) if layout.num_slots <= MAX_NODES else None
        self.slot_of_node = [p.slot_of_node for p in placed]
        # per slot: its level's first slot, its level's width, the width of the level above (1 for
        # the root's), 0: what fused_draft.draft_tree's first kernel needs to lay out a step's state rows
        lv = [(o, w, layout.widths[d - 1] if d else 1, 0) for d, (o, w) in enumerate(zip(layout.offsets, layout.widths))
              for _ in range(w)]
        self.level_slots = torch.tensor(lv, dtype=torch.long).to(device)

    def holds(self, trees: list[Tree]) -> bool:
        return all(t in self.rows for t in trees)

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-request fields of `rows` (a device LongTensor [B])."""
        return {f: getattr(self, f)[rows] for f in self.FIELDS}
