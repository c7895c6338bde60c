"""The fixed-shape device step (spec/device_step.py) and what it is built from.

Layout placement and the packed FlashInfer mask are checked against the ragged forms they
replace; `Drafter.propose_layout` against `Drafter.propose`; and the whole step, run eagerly on
this CPU with SDPA (on the GPU it is one CUDA graph; tests/gpu), against plain decoding of the
same model token for token, with different trees in one batch and padding requests included.
"""
from __future__ import annotations

import importlib.util
import random

import numpy as np
import pytest
import torch

from srt_entmtp.model.attention.flashinfer import full_kv_mask
from srt_entmtp.model.attention.tree_mask import mask_byte_indptr, pack_tree_mask_torch
from srt_entmtp.model.attention.tree_triton import ancestor_bits
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.spec.device_step import choose_layouts
from srt_entmtp.spec.ragged import RaggedTreeBatch
from srt_entmtp.spec.tree import Tree
from srt_entmtp.spec.tree_layout import LayoutTable, TreeLayout, place


def random_tree(rng: random.Random, n: int, depth: int = 4, width: int = 3) -> Tree:
    paths: set[tuple[int, ...]] = set()
    while len(paths) < n:
        p = tuple(rng.randrange(width) for _ in range(rng.randint(1, depth)))
        paths.update(p[:k] for k in range(1, len(p) + 1))
    return Tree.from_paths(sorted(paths))


TREES = [random_tree(random.Random(s), n) for s, n in [(0, 3), (1, 6), (2, 9), (3, 14)]] + [
    Tree.from_paths([]), Tree.from_paths([[0], [0, 0], [0, 0, 0]])]


def test_layout_covers_its_trees_and_rejects_wider_ones():
    lay = TreeLayout.covering(TREES)
    assert lay.widths[0] == 1 and all(lay.fits(t) for t in TREES)
    assert lay.num_slots == sum(lay.widths) and lay.depth == max(t.depth for t in TREES)
    wide = Tree.from_paths([[i] for i in range(lay.widths[1] + 1)])
    assert not lay.fits(wide)
    with pytest.raises(ValueError, match="does not fit"):
        place(lay, wide)
    deep = Tree.from_paths([[0] * k for k in range(1, lay.depth + 2)])
    assert not lay.fits(deep)


@pytest.mark.parametrize("tree", TREES, ids=lambda t: t.name)
def test_placed_tree_is_the_tree_in_other_slots(tree):
    lay = TreeLayout.covering(TREES)
    p = place(lay, tree)
    s = p.slot_of_node
    assert p.valid.sum() == tree.num_nodes and bool(p.valid[s].all())
    assert torch.equal(p.mask[s][:, s], tree.mask)                       # same ancestry among real nodes
    pad = ~p.valid
    assert torch.equal(p.mask[pad], torch.eye(lay.num_slots, dtype=torch.bool)[pad])  # padding sees itself only
    assert not p.mask[p.valid][:, pad].any()                              # and no real node sees padding
    for i in range(1, tree.num_nodes):
        assert p.parent[s[i]] == s[tree.parents[i]]
        assert p.rank[s[i]] == tree.ranks[i] and p.depth[s[i]] == tree.depths[i]
        assert p.parent_in_level[s[i]] == s[tree.parents[i]] - lay.offsets[int(tree.depths[i]) - 1]
    # a level's slots hold exactly the tree's nodes of that depth
    for d, (o, w) in enumerate(zip(lay.offsets, lay.widths)):
        assert bool((p.depth[o:o + w] == d).all())


def test_nested_layouts_put_small_trees_in_small_layouts():
    small = [Tree.from_paths([[0], [1]]), Tree.from_paths([[0], [0, 0]])]
    big = Tree.from_paths([[a] for a in range(4)] + [[a, b] for a in range(4) for b in range(3)])
    lays = choose_layouts(small + [big])
    assert lays[-1].fits(big) and all(lays[0].fits(t) for t in small)
    assert lays[0].num_slots < lays[-1].num_slots
    assert choose_layouts([Tree.from_paths([])]) == []


def test_packed_mask_matches_flashinfer_layout():
    """The bytes built on the device equal segment_packbits (little-endian, per-request byte
    boundary) of FlashInfer's per-request [S, prefix + S] mask built from the ragged batch."""
    lay = TreeLayout.covering(TREES)
    S = lay.num_slots
    table = LayoutTable(lay, TREES, "cpu")
    prefix = [5, 1, 13, 2, 7, 3]
    rows = torch.tensor([table.rows[t] for t in TREES])
    tree = table.mask[rows]
    fb = ForwardBatch(input_ids=torch.zeros(S * len(TREES), dtype=torch.long), positions=torch.zeros(1),
                      out_slots=torch.zeros(1), qo_indptr=torch.zeros(1), kv_indptr=torch.zeros(1),
                      kv_indices=torch.zeros(1), q_lens=[S] * len(TREES), kv_lens=[p + S for p in prefix],
                      custom_mask=tree.reshape(-1))
    full = full_kv_mask(fb).numpy()
    want, a = [], 0
    for p in prefix:
        n = S * (p + S)
        want.append(np.packbits(full[a:a + n], bitorder="little"))
        a += n
    ind = mask_byte_indptr(prefix, S)
    out = torch.zeros(int(ind[-1]) + 16, dtype=torch.uint8)
    pack_tree_mask_torch(out, ind, torch.tensor(prefix), tree)
    assert np.array_equal(out[: int(ind[-1])].numpy(), np.concatenate(want))
    assert not out[int(ind[-1]):].any()


@pytest.mark.parametrize("kind", ["medusa", "hydra", "mtp"])
def test_propose_layout_drafts_what_propose_drafts(runner, kind):
    from srt_entmtp.spec.drafters import load_drafter
    from srt_entmtp.spec.worker import default_heads_dir

    d = load_drafter(default_heads_dir(kind), runner)
    d.quantize_for_inference("model")  # float heads: both forms must agree exactly
    trees = [t.truncate(d.max_depth) for t in TREES]
    lay = TreeLayout.covering(trees)
    table = LayoutTable(lay, trees, "cpu")
    g = torch.Generator().manual_seed(0)
    B = len(trees)
    hidden = torch.randn(B, d.hidden_size, generator=g)
    roots = torch.randint(0, d.vocab_size, (B,), generator=g)
    rows = torch.tensor([table.rows[t] for t in trees])
    got = d.propose_layout(hidden, roots, lay, table.parent_in_level[rows], table.rank[rows])
    ref = d.propose(hidden, roots, RaggedTreeBatch.build(trees, torch.zeros(B, dtype=torch.long))).node_tokens
    starts = [0]
    for t in trees:
        starts.append(starts[-1] + t.num_nodes)
    for i, t in enumerate(trees):
        assert got[i, table.slot_of_node[table.rows[t]]].tolist() == ref[starts[i]:starts[i + 1]].tolist(), t.name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_verify_graphs_take_the_triton_tree_attention_unless_told_flashinfer(runner):
    """`tree_attention="auto"` gives every layout of at most 64 slots the Triton kernel (the
    CUDA graphs' choice, made here without capturing); an unknown setting is refused by name."""
    from srt_entmtp.model.attention.tree_triton import TreeAttention
    from srt_entmtp.spec.device_step import DeviceSpecStep
    from srt_entmtp.spec.drafters import load_drafter
    from srt_entmtp.spec.worker import default_heads_dir

    d = load_drafter(default_heads_dir("mtp"), runner)
    step = DeviceSpecStep(runner, d, TREES, capacity=8, max_batch=4)
    for sh in step.shapes:
        attn = step._graph_attention(sh, 2, None)
        assert isinstance(attn, TreeAttention) and attn.nodes == sh.layout.num_slots and attn.batch == 2
        assert torch.equal(sh.table.anc, ancestor_bits(sh.table.mask_cpu))
    with pytest.raises(ValueError, match="tree attention must be one of auto, flashinfer"):
        DeviceSpecStep(runner, d, TREES, capacity=8, max_batch=4, tree_attention="cudnn")


def test_lone_trees_of_one_layout_share_a_table_that_holds_each(runner):
    """Two different trees with the same level widths have the same exact layout; at batch 1
    each must find its own row in that layout's table (a library of many 24-node trees at
    batch 1 hit a KeyError when the second tree was mapped to a table made for the first)."""
    from srt_entmtp.spec.device_step import DeviceSpecStep
    from srt_entmtp.spec.drafters import load_drafter
    from srt_entmtp.spec.worker import default_heads_dir

    a = Tree.from_paths([[0], [1], [0, 0], [0, 0, 0]])
    b = Tree.from_paths([[0], [1], [1, 0], [1, 0, 0]])  # same widths 1-2-1-1, other parent
    wide = Tree.from_paths([[0], [1], [2], [0, 0]])  # the only shared layout: 1-3-1-1, neither of theirs
    assert a != b and TreeLayout.covering([a]) == TreeLayout.covering([b]) != TreeLayout.covering([a, b, wide])
    d = load_drafter(default_heads_dir("mtp"), runner)
    step = DeviceSpecStep(runner, d, [a, b, wide], capacity=8, max_batch=4)
    for t in (a, b):
        li = step.pick([t], 1)
        assert step.shapes[li].lone and step.shapes[li].layout == TreeLayout.covering([t])
        assert step.shapes[li].table.holds([t]), f"{t.name}'s lone layout has no row for it"
    assert step.pick([a], 1) == step.pick([b], 1)  # one shape (one graph per bucket) for both
