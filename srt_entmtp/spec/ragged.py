"""Flat metadata for verifying B different trees in one forward pass.

Request i brings its tree of n_i nodes (root included); the root sits at absolute position
prefix_lens[i], right after the tokens whose KV is already cached. Nodes are concatenated request
by request in each tree's canonical order, described by `node_indptr` (FlashInfer's indptr
convention), not by padding. The per-request [n_i, n_i] tree masks are concatenated row-major
(`tree_mask_flat`), which is what the attention backends consume as "custom mask over the new
tokens"; the FlashInfer and dense SDPA layouts are derived from it on demand.

Building stacks the batch's distinct trees (a handful of library trees) into tables and gathers
every per-node field from them, so Python work is per distinct tree, never per token. Everything
is assembled on the CPU and moved to `device` once.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from srt_entmtp.spec.tree import Tree


def _indptr(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.long, device=counts.device)
    out[1:] = counts.cumsum(0)
    return out


@dataclass
class RaggedTreeBatch:
    trees: list[Tree]
    prefix_lens: torch.Tensor        # [B] cached tokens before each root
    node_indptr: torch.Tensor        # [B+1] cumsum of n_i
    num_tokens: int                  # sum n_i
    positions: torch.Tensor          # [T] prefix_len + depth (RoPE positions)
    depths: torch.Tensor             # [T]
    ranks: torch.Tensor              # [T] candidate rank of each node at its depth (root 0)
    parents_global: torch.Tensor     # [T] parent's index in the flat batch; -1 for roots
    request_index: torch.Tensor      # [T] which request a node belongs to
    local_index: torch.Tensor        # [T] node index inside its own tree
    tree_mask_flat: torch.Tensor     # [sum n_i^2] each request's [n_i, n_i] mask, row-major
    mask_indptr: torch.Tensor        # [B+1] cumsum of n_i^2 (offsets into tree_mask_flat)
    retrieve_indices: torch.Tensor   # [B, max_leaves, max_depth+1] local node ids root..leaf, -1 pad
    num_leaves: torch.Tensor         # [B]
    node_counts: list[int]           # host copies of n_i, so planning needs no device sync
    prefix_list: list[int]           # host copies of prefix_lens
    max_nodes: int
    max_depth: int
    _table: _TreeTable | None = field(default=None, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        return len(self.trees)

    @property
    def device(self) -> torch.device:
        return self.positions.device

    @classmethod
    def build(cls, trees: Sequence[Tree], prefix_lens: torch.Tensor | Sequence[int],
              device: torch.device | str | None = None) -> RaggedTreeBatch:
        trees = list(trees)
        if not trees:
            raise ValueError("RaggedTreeBatch needs at least one request")
        prefix_cpu = torch.as_tensor(prefix_lens, dtype=torch.long).cpu().reshape(-1)
        if prefix_cpu.numel() != len(trees):
            raise ValueError(f"{len(trees)} trees but {prefix_cpu.numel()} prefix lengths")
        if device is None:
            device = prefix_lens.device if isinstance(prefix_lens, torch.Tensor) else "cpu"
        layout = _layout(tuple(trees), torch.device(device))
        prefix = prefix_cpu.to(device)
        return cls(trees=trees, prefix_lens=prefix, positions=prefix[layout["request_index"]] + layout["depths"],
                   prefix_list=prefix_cpu.tolist(), **{k: (list(v) if isinstance(v, list) else v)
                                                         for k, v in layout.items()})

    # ---- derived layouts (computed on demand; none of them is needed by every backend) ----

    def pad_index(self) -> torch.Tensor:
        """[T] position of each flat node in a [B * max_nodes] padded layout."""
        return self.request_index * self.max_nodes + self.local_index

    def padded(self, flat: torch.Tensor, fill: float | bool = 0) -> torch.Tensor:
        """Scatter per-node values [T, ...] into [B, max_nodes, ...], `fill` elsewhere."""
        out = flat.new_full((self.batch_size * self.max_nodes, *flat.shape[1:]), fill)
        out[self.pad_index()] = flat
        return out.view(self.batch_size, self.max_nodes, *flat.shape[1:])

    def tree_mask_padded(self) -> torch.Tensor:
        """[B, max_nodes, max_nodes] tree masks; padded rows and columns are False."""
        dev, n = self.device, self.max_nodes
        counts = (self.node_indptr[1:] - self.node_indptr[:-1]).view(-1, 1, 1)
        t = torch.arange(n, device=dev).view(1, n, 1)
        s = torch.arange(n, device=dev).view(1, 1, n)
        valid = (t < counts) & (s < counts)
        idx = self.mask_indptr[:-1].view(-1, 1, 1) + t * counts + s
        idx = torch.where(valid, idx, 0)
        return self.tree_mask_flat[idx] & valid

    def children_global(self) -> torch.Tensor:
        """[T, max_children] flat indices of each node's children in canonical order, -1 pad."""
        table = self._table if self._table is not None else _TreeTable(self.trees)
        req = self.request_index.cpu()
        starts = self.node_indptr[:-1].cpu()[req]
        kids = table.children[table.node_start[table.tree_id][req] + self.local_index.cpu()]
        return torch.where(kids >= 0, kids + starts.unsqueeze(1), -1).to(self.device)

    def flashinfer_mask(self) -> torch.Tensor:
        """Flat bool: per request the row-major [n_i, prefix_i + n_i] mask (prefix all True).

        The layout of FlashInfer's `custom_mask` for BatchPrefillWithPagedKVCacheWrapper.plan.
        """
        blocks = []
        for t, p in zip(self.trees, self.prefix_list):
            prefix = torch.ones(t.num_nodes, p, dtype=torch.bool)
            blocks.append(torch.cat([prefix, t.mask], dim=1).reshape(-1))
        return torch.cat(blocks).to(self.device)

    def dense_mask(self, pad_to: int | tuple[int, int] | None = None) -> torch.Tensor:
        """[B, max_n, max_kv] bool for SDPA: keys are each request's prefix then its nodes.

        `pad_to` = kv length, or (q length, kv length), to pad to (for fixed-shape graphs).
        Padded rows and columns are False, except that a padded query row sees column 0 so
        softmax never divides by zero.
        """
        counts = self.node_indptr[1:] - self.node_indptr[:-1]
        max_kv = max(p + n for p, n in zip(self.prefix_list, self.node_counts))
        max_q = self.max_nodes
        if isinstance(pad_to, tuple):
            max_q, max_kv = max(max_q, pad_to[0]), max(max_kv, pad_to[1])
        elif pad_to is not None:
            max_kv = max(max_kv, pad_to)
        tree = self.tree_mask_padded()
        dev = self.device
        B = self.batch_size
        t = torch.arange(max_q, device=dev).view(1, max_q, 1)
        s = torch.arange(max_kv, device=dev).view(1, 1, max_kv)
        pre = self.prefix_lens.view(B, 1, 1)
        n = counts.view(B, 1, 1)
        rel = s - pre                                   # key index among the request's nodes
        row_ok = t < n
        in_tree = row_ok & (rel >= 0) & (rel < n)
        ti = t.clamp(max=self.max_nodes - 1).expand(B, max_q, max_kv)
        si = rel.clamp(0, self.max_nodes - 1).expand(B, max_q, max_kv)
        bi = torch.arange(B, device=dev).view(B, 1, 1).expand(B, max_q, max_kv)
        allowed = (row_ok & (rel < 0)) | (in_tree & tree[bi, ti, si])
        allowed[:, :, 0] |= ~row_ok[:, :, 0]
        return allowed


@functools.lru_cache(maxsize=256)
def _layout(trees: tuple[Tree, ...], device: torch.device) -> dict:
    """Every field of a RaggedTreeBatch that depends only on the batch's trees, on `device`.
    Cached per composition: a running batch keeps its trees for many steps, so a step then
    pays one gather for the positions instead of building and copying a dozen tensors.
    (Consumers only read these tensors, so sharing them between steps is safe.)"""
    table = _TreeTable(list(trees))
    tid = table.tree_id                                   # [B] which distinct tree
    B = len(trees)
    counts = table.num_nodes[tid]
    indptr = _indptr(counts)
    T = int(indptr[-1])
    request = torch.repeat_interleave(torch.arange(B), counts, output_size=T)
    local = torch.arange(T) - indptr[:-1][request]
    node = table.node_start[tid][request] + local         # row in the distinct trees' node table
    parents_local = table.parents[node]
    mask_counts = counts * counts
    mask_indptr = _indptr(mask_counts)
    mreq = torch.repeat_interleave(torch.arange(B), mask_counts, output_size=int(mask_indptr[-1]))
    mlocal = torch.arange(int(mask_indptr[-1])) - mask_indptr[:-1][mreq]
    return {
        "node_indptr": indptr.to(device),
        "num_tokens": T,
        "depths": table.depths[node].to(device),
        "ranks": table.ranks[node].to(device),
        "parents_global": torch.where(parents_local >= 0, parents_local + indptr[:-1][request], -1).to(device),
        "request_index": request.to(device),
        "local_index": local.to(device),
        "tree_mask_flat": table.masks[table.mask_start[tid][mreq] + mlocal].to(device),
        "mask_indptr": mask_indptr.to(device),
        "retrieve_indices": table.retrieve[tid].to(device),
        "num_leaves": table.num_leaves[tid].to(device),
        "node_counts": counts.tolist(),
        "max_nodes": int(counts.max()),
        "max_depth": int(table.depth[tid].max()),
        "_table": table,
    }


class _TreeTable:
    """The distinct trees of a batch stacked into tables, so that per-request fields are gathers.

    A batch usually repeats a handful of library trees, so this keeps building O(distinct trees)
    in Python.
    """

    def __init__(self, trees: list[Tree]):
        ids: dict[Tree, int] = {}
        tid = [ids.setdefault(t, len(ids)) for t in trees]
        uniq = list(ids)
        self.tree_id = torch.tensor(tid, dtype=torch.long)
        self.num_nodes = torch.tensor([t.num_nodes for t in uniq], dtype=torch.long)
        self.node_start = _indptr(self.num_nodes)[:-1]
        self.mask_start = _indptr(self.num_nodes * self.num_nodes)[:-1]
        self.depth = torch.tensor([t.depth for t in uniq], dtype=torch.long)
        self.num_leaves = torch.tensor([t.num_leaves for t in uniq], dtype=torch.long)
        self.depths = torch.cat([t.depths for t in uniq])
        self.ranks = torch.cat([t.ranks for t in uniq])
        self.parents = torch.cat([t.parents for t in uniq])
        self.masks = torch.cat([t.mask.reshape(-1) for t in uniq])
        max_leaves = max(t.num_leaves for t in uniq)
        max_d = max(t.depth for t in uniq)
        width = max(max(t.children.shape[1] for t in uniq), 1)
        self.retrieve = torch.full((len(uniq), max_leaves, max_d + 1), -1, dtype=torch.long)
        self.children = torch.full((int(self.num_nodes.sum()), width), -1, dtype=torch.long)
        for i, t in enumerate(uniq):
            self.retrieve[i, : t.num_leaves, : t.depth + 1] = t.retrieve_indices
            a = int(self.node_start[i])
            self.children[a : a + t.num_nodes, : t.children.shape[1]] = t.children
