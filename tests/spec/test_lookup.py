"""Prompt lookup (spec/lookup.py): the n-gram index and grafting a lookup chain onto a tree."""
from __future__ import annotations

import random

import pytest
import torch

from srt_entmtp.spec.lookup import LOOKUP_RANK, LookupIndex, is_lookup_node, with_lookup
from srt_entmtp.spec.tree import Tree, chain


def brute_force(tokens: list[int], k: int, lo: int, hi: int) -> list[int]:
    """The reference rule: longest suffix (hi..lo) with an earlier occurrence; its latest one."""
    for n in range(min(hi, len(tokens)), lo - 1, -1):
        suf = tokens[-n:]
        for s in range(len(tokens) - n - 1, -1, -1):
            if tokens[s:s + n] == suf:
                return tokens[s + n:s + n + k]
    return []


def test_proposes_what_followed_the_latest_earlier_occurrence():
    idx = LookupIndex(min_match=2, max_match=3)
    idx.sync([5, 6, 7, 8, 1, 5, 6, 9, 2], [5, 6])
    assert idx.propose(3) == [9, 2, 5]  # [5, 6] last occurred at 5..6, followed by 9 2 5
    idx.sync([5, 6, 7, 8, 1, 5, 6, 9, 2], [5, 6, 7])
    assert idx.propose(4) == [8, 1, 5, 6]  # now [5, 6, 7] matches (longer beats later)
    fresh = LookupIndex(2, 3)
    fresh.sync([1, 2, 3], [4])
    assert fresh.propose(5) == []  # [3, 4] never occurred before


def test_incremental_sync_matches_the_brute_force_rule_on_random_histories():
    rng = random.Random(0)
    for trial in range(30):
        lo, hi = rng.choice([(1, 3), (2, 4), (3, 3)])
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        idx = LookupIndex(lo, hi)
        out: list[int] = []
        for _ in range(25):
            out += [rng.randrange(6) for _ in range(rng.randrange(1, 4))]  # a step emits 1-3 tokens
            idx.sync(prompt, out)
            assert idx.tokens == prompt + out
            assert idx.propose(5) == brute_force(prompt + out, 5, lo, hi), (trial, prompt, out)


def test_bad_match_lengths_are_rejected():
    with pytest.raises(ValueError, match="lookup match lengths"):
        LookupIndex(min_match=3, max_match=2)
    with pytest.raises(ValueError):
        LookupIndex(min_match=0)


def test_grafting_keeps_the_heads_nodes_and_orders_tokens_canonically():
    head = Tree.from_paths([(0,), (1,), (0, 0), (0, 0, 0)])
    out, gather = with_lookup(head, 3)
    assert out.num_nodes == head.num_nodes + 3 and out.depth == 3
    assert set(head.paths) <= set(out.paths)
    lookup = is_lookup_node(out)
    assert int(lookup.sum()) == 3 and not bool(lookup[0])
    # the lookup nodes form one chain under the root
    lk = lookup.nonzero().flatten().tolist()
    assert out.parents[lk[0]] == 0 and out.parents[lk[1]] == lk[0] and out.parents[lk[2]] == lk[1]
    # gathering [head tokens..., chain tokens...] puts every token on its own node
    head_tokens = torch.tensor([100, 101, 102, 103, 104])
    chain_tokens = torch.tensor([7, 8, 9])
    toks = torch.cat([head_tokens, chain_tokens])[gather]
    for i, p in enumerate(out.paths):
        if p and all(r == LOOKUP_RANK for r in p):
            assert toks[i] == chain_tokens[len(p) - 1]
        else:
            assert toks[i] == head_tokens[head.paths.index(p)]
    assert with_lookup(head, 3)[0] is out  # interned and cached: graphs and plans key on it
    assert with_lookup(head, 0)[0] is head


def test_grafting_onto_a_root_only_tree_gives_a_lookup_chain():
    out, gather = with_lookup(Tree.from_paths([]), 4)
    assert out.num_nodes == 5 and out.depth == 4 and gather.tolist() == [0, 1, 2, 3, 4]
    assert out.mask.equal(chain(4).mask)  # same shape as a chain of top-1 candidates
