"""Tree builders: greedy is Medusa's, optimal is exact (checked by brute force on tiny cases)."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from srt_entmtp.spec.builders import expected_accept_length, greedy_tree, node_accept_probs, optimal_tree, pareto_front
from srt_entmtp.spec.tree import Tree

from .strategies import FAST


def tables(max_depth: int = 4, max_rank: int = 4):
    dims = st.tuples(st.integers(1, max_depth), st.integers(1, max_rank))
    prob = st.one_of(st.just(0.0), st.floats(0.0, 1.0), st.just(1.0))
    return dims.flatmap(lambda dk: st.lists(st.lists(prob, min_size=dk[1], max_size=dk[1]),
                                             min_size=dk[0], max_size=dk[0])).map(
        lambda rows: torch.tensor(rows, dtype=torch.float64))


def value(paths, acc) -> float:
    """Reference: sum over nodes of the product of acc along the path (pure Python)."""
    D, K = len(acc), len(acc[0])
    total = 0.0
    for p in paths:
        prod = 1.0
        for d, r in enumerate(p):
            prod *= acc[d][r] if d < D and r < K else 0.0
        total += prod
    return total


@functools.cache
def all_trees(budget: int, depth: int, ranks: int) -> tuple[tuple[tuple[int, ...], ...], ...]:
    """Every tree (as non-root paths) with <= budget nodes, depth <= depth, ranks < ranks."""

    def forests(prefix, left):  # every set of descendants of `prefix` using <= left nodes
        if len(prefix) >= depth or left == 0:
            return [()]
        out = []

        def pick(r, left, acc):
            if r == ranks:
                out.append(acc)
                return
            pick(r + 1, left, acc)
            if left == 0:
                return
            child = prefix + (r,)
            for sub in forests(child, left - 1):
                pick(r + 1, left - 1 - len(sub), acc + (child,) + sub)

        pick(0, left, ())
        return out

    found = forests((), budget)
    assert len({frozenset(f) for f in found}) == len(found)  # enumeration has no duplicates
    return tuple(found)


def test_enumeration_is_complete_on_a_countable_case():
    # binary ranks, depth 2, <= 2 nodes: {}, {0}, {1}, {0,1}, {0,00}, {0,01}, {1,10}, {1,11}
    assert len(all_trees(2, 2, 2)) == 8


@FAST
@given(tables(), st.integers(0, 12), st.integers(1, 5))
def test_optimal_at_least_greedy(acc, budget, max_depth):
    opt = optimal_tree(acc, budget, max_depth)
    gre = greedy_tree(acc, budget, max_depth)
    assert opt.num_nodes - 1 <= budget and gre.num_nodes - 1 <= budget
    assert opt.depth <= max_depth and gre.depth <= max_depth
    assert expected_accept_length(opt, acc) >= expected_accept_length(gre, acc) - 1e-9


TYPICAL = [  # realistic shapes: top-1 dominant and decaying with depth; one flat, one with a weak first head
    [[0.8, 0.1, 0.05], [0.7, 0.1, 0.05], [0.6, 0.1, 0.05]],
    [[0.3, 0.25, 0.2], [0.3, 0.25, 0.2], [0.3, 0.25, 0.2]],
    [[0.4, 0.3, 0.1], [0.9, 0.05, 0.0], [0.95, 0.0, 0.0]],
]


@pytest.mark.parametrize("table", range(len(TYPICAL)))
@pytest.mark.parametrize("budget", range(7))
def test_optimal_equals_brute_force_on_typical_tables(table, budget):
    check_against_brute_force(torch.tensor(TYPICAL[table], dtype=torch.float64), budget, 3)


@FAST
@given(tables(max_depth=3, max_rank=3), st.integers(0, 6), st.integers(1, 3))
def test_optimal_equals_brute_force(acc, budget, max_depth):
    check_against_brute_force(acc, budget, max_depth)


def check_against_brute_force(acc, budget, max_depth):
    rows = acc.tolist()
    best = max(value(p, rows) for p in all_trees(budget, max_depth, acc.shape[1]))
    opt = optimal_tree(acc, budget, max_depth)
    assert expected_accept_length(opt, acc) == pytest.approx(best, abs=1e-9)
    assert value(opt.paths[1:], rows) == pytest.approx(best, abs=1e-9)


@FAST
@given(tables(), st.integers(0, 12), st.integers(1, 5))
def test_greedy_is_also_optimal_under_the_independence_model(acc, budget, max_depth):
    # path products never grow along a path, so the `budget` best nodes already form a tree
    opt = expected_accept_length(optimal_tree(acc, budget, max_depth), acc)
    assert expected_accept_length(greedy_tree(acc, budget, max_depth), acc) == pytest.approx(opt, abs=1e-9)


@FAST
@given(tables(), st.integers(0, 10))
def test_expected_length_matches_reference(acc, budget):
    tree = greedy_tree(acc, budget)
    assert expected_accept_length(tree, acc) == pytest.approx(value(tree.paths[1:], acc.tolist()), abs=1e-12)
    probs = node_accept_probs(tree, acc)
    assert float(probs[0]) == 1.0 and bool((probs[1:] <= probs[tree.parents[1:]] + 1e-15).all())


def test_nodes_outside_the_table_count_zero():
    acc = torch.tensor([[0.5]])
    t = Tree.from_paths([(0,), (1,), (0, 0)])
    assert expected_accept_length(t, acc) == pytest.approx(0.5)


def test_greedy_is_medusa_order():
    acc = torch.tensor([[0.9, 0.3], [0.8, 0.1]])
    # products: (0)=.9, (0,0)=.72, (1)=.3, (1,0)=.24, (0,1)=.09, (1,1)=.03
    assert greedy_tree(acc, 3).paths[1:] == ((0,), (1,), (0, 0))
    assert greedy_tree(acc, 4).paths[1:] == ((0,), (1,), (0, 0), (1, 0))
    assert greedy_tree(acc, 2, max_depth=1).paths[1:] == ((0,), (1,))


def test_optimal_handles_unsorted_ranks_and_zeros():
    acc = torch.tensor([[0.1, 0.6, 0.0], [0.5, 0.2, 0.0]])
    t = optimal_tree(acc, 2, 2)
    assert t.paths[1:] == ((1,), (1, 0))
    assert optimal_tree(torch.zeros(3, 3), 5, 3).num_nodes == 1  # nothing worth adding


def test_pareto_front_improves_strictly():
    acc = torch.tensor([[0.8, 0.1, 0.05], [0.7, 0.1, 0.0], [0.6, 0.1, 0.0]])
    front = pareto_front(acc, 12, 3)
    assert front[0][0] == 0 and front[0][1] == 0.0
    for (n0, e0, _), (n1, e1, t1) in itertools.pairwise(front):
        assert n1 > n0 and e1 > e0
        assert t1 is optimal_tree(acc, n1, 3)
        assert e1 == pytest.approx(expected_accept_length(t1, acc))


@pytest.mark.parametrize("bad", [torch.ones(3), torch.full((2, 2), 1.5), torch.full((2, 2), -0.1),
                                 torch.tensor([[float("nan")]])])
def test_bad_tables_are_rejected(bad):
    with pytest.raises(ValueError):
        optimal_tree(bad, 3, 2)
