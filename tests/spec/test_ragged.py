"""The ragged verification layout: every mask layout agrees with each tree's own mask."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given

from srt_entmtp.spec.tree import RaggedTreeBatch, Tree, chain

from .strategies import FAST, batches


def build(trees, prefix):
    return RaggedTreeBatch.build(trees, torch.tensor(prefix))


@FAST
@given(batches())
def test_flat_fields(args):
    trees, prefix = args
    b = build(trees, prefix)
    counts = [t.num_nodes for t in trees]
    assert b.node_indptr.tolist() == [sum(counts[:i]) for i in range(len(counts) + 1)]
    assert b.num_tokens == sum(counts) == b.positions.numel()
    off = 0
    for i, (t, p) in enumerate(zip(trees, prefix)):
        sl = slice(off, off + t.num_nodes)
        assert torch.equal(b.positions[sl], p + t.depths)
        assert torch.equal(b.depths[sl], t.depths)
        assert torch.equal(b.ranks[sl], t.ranks)
        assert b.request_index[sl].tolist() == [i] * t.num_nodes
        assert b.local_index[sl].tolist() == list(range(t.num_nodes))
        assert torch.equal(b.parents_global[sl], torch.where(t.parents >= 0, t.parents + off, -1))
        m0 = int(b.mask_indptr[i])
        assert torch.equal(b.tree_mask_flat[m0 : m0 + t.num_nodes ** 2].view(t.num_nodes, t.num_nodes), t.mask)
        r = b.retrieve_indices[i]
        assert torch.equal(r[: t.num_leaves, : t.depth + 1], t.retrieve_indices)
        assert (r[t.num_leaves :] == -1).all() and (r[:, t.depth + 1 :] == -1).all()
        kids = b.children_global()[sl]
        assert torch.equal(kids[:, : t.children.shape[1]], torch.where(t.children >= 0, t.children + off, -1))
        assert (kids[:, t.children.shape[1] :] == -1).all()
        off += t.num_nodes
    assert b.num_leaves.tolist() == [t.num_leaves for t in trees]
    assert b.max_depth == max(t.depth for t in trees)


@FAST
@given(batches())
def test_flashinfer_and_dense_masks_agree_with_tree_masks(args):
    trees, prefix = args
    b = build(trees, prefix)
    fi = b.flashinfer_mask()
    dense = b.dense_mask()
    padded = b.tree_mask_padded()
    max_kv = max(p + t.num_nodes for t, p in zip(trees, prefix))
    assert fi.dtype == dense.dtype == torch.bool
    assert dense.shape == (len(trees), b.max_nodes, max_kv)
    off = 0
    for i, (t, p) in enumerate(zip(trees, prefix)):
        n = t.num_nodes
        block = fi[off : off + n * (p + n)].view(n, p + n)
        off += n * (p + n)
        assert block[:, :p].all() and torch.equal(block[:, p:], t.mask)
        assert torch.equal(dense[i, :n, : p + n], block)           # the two layouts agree
        assert not dense[i, :n, p + n :].any()
        assert torch.equal(dense[i, n:, 0], torch.ones(b.max_nodes - n, dtype=torch.bool))
        assert not dense[i, n:, 1:].any()
        assert torch.equal(padded[i, :n, :n], t.mask) and not padded[i, n:].any() and not padded[i, :, n:].any()
    assert off == fi.numel()


def test_dense_mask_pad_to():
    b = build([chain(2), Tree.from_paths([(0,), (1,)])], [1, 4])
    assert b.dense_mask().shape == (2, 3, 7)
    assert b.dense_mask(pad_to=10).shape == (2, 3, 10)
    big = b.dense_mask(pad_to=(5, 12))
    assert big.shape == (2, 5, 12)
    assert torch.equal(big[:, :3, :7], b.dense_mask())
    assert big[:, 3:, 0].all() and not big[:, 3:, 1:].any()


def test_padded_helper_and_device_default():
    b = build([chain(1), chain(3)], [0, 2])
    vals = torch.arange(b.num_tokens)
    assert b.padded(vals, -1).tolist() == [[0, 1, -1, -1], [2, 3, 4, 5]]
    assert b.device == torch.device("cpu")
    assert RaggedTreeBatch.build([chain(1)], [3]).positions.tolist() == [3, 4]


def test_build_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        RaggedTreeBatch.build([], torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError):
        RaggedTreeBatch.build([chain(1)], torch.tensor([1, 2]))
