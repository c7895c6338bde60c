"""Tree invariants (property-based) and path-list validation."""
from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from srt_entmtp.spec.tree import Tree, TreeError, chain

from .strategies import FAST, path_lists, trees


def is_prefix(a: tuple, b: tuple) -> bool:
    return b[: len(a)] == a


@FAST
@given(trees())
def test_canonical_order_and_parents(tree: Tree):
    paths = tree.paths
    assert paths[0] == ()
    assert list(paths) == sorted(paths, key=lambda p: (len(p), p))
    assert tree.num_nodes == len(paths)
    assert tree.depth == max(len(p) for p in paths)
    for i, p in enumerate(paths):
        assert int(tree.depths[i]) == len(p)
        assert int(tree.ranks[i]) == (p[-1] if p else 0)
        if i == 0:
            assert int(tree.parents[0]) == -1
        else:
            parent = int(tree.parents[i])
            assert parents_ok(paths, parent, p)
            assert int(tree.depths[parent]) == int(tree.depths[i]) - 1


def parents_ok(paths, parent: int, p: tuple) -> bool:
    return 0 <= parent < paths.index(p) and paths[parent] == p[:-1]


@FAST
@given(trees())
def test_mask_is_ancestor_or_self(tree: Tree):
    want = torch.tensor([[is_prefix(pj, pi) for pj in tree.paths] for pi in tree.paths])
    assert torch.equal(tree.mask, want)
    assert tree.mask.dtype == torch.bool


@FAST
@given(trees())
def test_retrieve_indices_cover_every_leaf_once(tree: Tree):
    leaves = [i for i, p in enumerate(tree.paths) if not any(len(q) == len(p) + 1 and is_prefix(p, q) for q in tree.paths)]
    ri = tree.retrieve_indices
    assert ri.shape == (len(leaves), tree.depth + 1) and tree.num_leaves == len(leaves)
    ends = []
    for row in ri.tolist():
        n = sum(1 for x in row if x >= 0)
        assert all(x == -1 for x in row[n:])
        assert row[0] == 0
        for k in range(1, n):
            assert int(tree.parents[row[k]]) == row[k - 1]
        ends.append(row[n - 1])
    assert ends == leaves
    assert torch.equal(tree.is_leaf, torch.tensor([i in leaves for i in range(tree.num_nodes)]))


@FAST
@given(trees())
def test_children_table(tree: Tree):
    for i in range(tree.num_nodes):
        kids = [c for c in tree.children[i].tolist() if c >= 0]
        assert kids == [j for j in range(1, tree.num_nodes) if int(tree.parents[j]) == i]


@FAST
@given(path_lists(), st.randoms())
def test_interning_equality_and_json_roundtrip(paths, rnd):
    t = Tree.from_paths(paths)
    shuffled = list(paths)
    rnd.shuffle(shuffled)
    u = Tree.from_paths([list(p) for p in shuffled])
    assert u is t and u == t and hash(u) == hash(t)
    assert Tree.from_paths(t.to_json()) is t
    assert re.fullmatch(rf"n{t.num_nodes}d{t.depth}-[0-9a-f]{{8}}", t.name)


def test_example_tree():
    t = Tree.from_paths([(0,), (1,), (0, 0), (0, 1), (0, 0, 0)])
    assert t.paths == ((), (0,), (1,), (0, 0), (0, 1), (0, 0, 0))
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 3]
    assert t.retrieve_indices.tolist() == [[0, 2, -1, -1], [0, 1, 4, -1], [0, 1, 3, 5]]
    assert t != Tree.from_paths([(0,)]) and t != "not a tree"


def test_root_only_and_chain():
    root = Tree.from_paths([])
    assert root.num_nodes == 1 and root.depth == 0 and root.retrieve_indices.tolist() == [[0]]
    assert chain(0) is root
    c = chain(4)
    assert c.paths == ((), (0,), (0, 0), (0, 0, 0), (0, 0, 0, 0))
    assert c.num_leaves == 1 and c.retrieve_indices.tolist() == [[0, 1, 2, 3, 4]]
    with pytest.raises(TreeError):
        chain(-1)


@pytest.mark.parametrize("paths, kwargs, fragment", [
    ([(0,), (0, 0), (1, 0)], {}, "prefix (1,) is missing"),
    ([(0,), (0,)], {}, "appears twice"),
    ([(0,), [0]], {}, "appears twice"),
    ([(-1,)], {}, "must be non-negative"),
    ([(0.5,)], {}, "must be an int"),
    ([(True,)], {}, "not a bool"),
    (["01"], {}, "must be a sequence"),
    ([()], {}, "root is implicit"),
    ([(0,), (0, 0), (0, 0, 0)], {"max_depth": 2}, "depth 3 > max_depth 2"),
    ([(0,), (1,), (2,)], {"max_width": 2}, "3 children > max_width 2"),
])
def test_validation_errors(paths, kwargs, fragment):
    with pytest.raises(TreeError) as e:
        Tree.from_paths(paths, **kwargs)
    assert fragment in str(e.value)
    assert isinstance(e.value, ValueError)


@FAST
@given(trees(), st.data())
def test_restrict_keeps_an_ancestor_closed_subtree(tree: Tree, data):
    keep = torch.tensor(data.draw(st.lists(st.booleans(), min_size=tree.num_nodes, max_size=tree.num_nodes)))
    sub, index = tree.restrict(keep)
    kept = [tree.paths[i] for i in index.tolist()]
    assert kept == list(sub.paths)
    want = [p for i, p in enumerate(tree.paths)
            if all(bool(keep[j]) or j == 0 for j, q in enumerate(tree.paths) if is_prefix(q, p))]
    assert kept == want


@FAST
@given(trees(), st.integers(0, 6))
def test_truncate(tree: Tree, depth):
    cut = tree.truncate(depth)
    assert cut.paths == tuple(p for p in tree.paths if len(p) <= depth)
    assert (cut is tree) == (depth >= tree.depth)
