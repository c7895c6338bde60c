"""Greedy verification against a brute-force pure-Python reference on random trees and logits."""
from __future__ import annotations

import functools
import operator

import torch
from hypothesis import given
from hypothesis import strategies as st

from srt_entmtp.spec.tree import RaggedTreeBatch, Tree, chain
from srt_entmtp.spec.verify import greedy_verify

from .strategies import FAST, batches


def reference(trees, tokens: list[list[int]], logits: list[torch.Tensor]):
    """Per request: (accepted local path, bonus) by walking every node in Python."""
    out = []
    for t, tok, lg in zip(trees, tokens, logits):
        pred = [int(torch.argmax(row)) for row in lg]      # first index of the max
        ok = [True] + [tok[i] == pred[int(t.parents[i])] for i in range(1, t.num_nodes)]

        def path(i, t=t):
            p = [i]
            while p[-1] != 0:
                p.append(int(t.parents[p[-1]]))
            return p[::-1]

        accepted = [i for i in range(t.num_nodes) if all(ok[j] for j in path(i))]
        best = max(accepted, key=lambda i: (len(t.paths[i]), -i))  # deepest, then first canonically
        out.append((path(best), pred[best]))
    return out


@st.composite
def problems(draw):
    trees, prefix = draw(batches(max_requests=4, max_nodes=14))
    vocab = draw(st.integers(2, 5))                  # tiny vocab: duplicate sibling drafts happen
    seed = draw(st.integers(0, 2**31 - 1))
    agree = draw(st.floats(0.0, 1.0))
    return trees, prefix, vocab, seed, agree


def make_inputs(trees, vocab, seed, agree):
    g = torch.Generator().manual_seed(seed)
    tokens, logits = [], []
    for t in trees:
        lg = torch.randn(t.num_nodes, vocab, generator=g)
        tok = torch.randint(0, vocab, (t.num_nodes,), generator=g)
        # make many drafts right so that deep paths get accepted
        right = lg.argmax(-1)[t.parents.clamp(min=0)]
        use = torch.rand(t.num_nodes, generator=g) < agree
        tok = torch.where(use, right, tok)
        tokens.append(tok.tolist())
        logits.append(lg)
    return tokens, logits


@FAST
@given(problems())
def test_greedy_matches_reference(problem):
    trees, prefix, vocab, seed, agree = problem
    tokens, logits = make_inputs(trees, vocab, seed, agree)
    batch = RaggedTreeBatch.build(trees, torch.tensor(prefix))
    res = greedy_verify(batch, torch.tensor(functools.reduce(operator.iadd, tokens, [])), torch.cat(logits))
    ref = reference(trees, tokens, logits)
    B = len(trees)
    assert res.accept_len.tolist() == [len(p) - 1 for p, _ in ref]
    assert res.bonus_tokens.tolist() == [b for _, b in ref]
    assert res.accepted_nodes.shape == (B, batch.max_depth + 1)
    flat, off = [], 0
    for i, (p, bonus) in enumerate(ref):
        assert res.accepted_nodes[i].tolist() == p + [-1] * (batch.max_depth + 1 - len(p))
        flat += [off + j for j in p]
        off += trees[i].num_nodes
        assert res.accepted_tokens[i] == [tokens[i][j] for j in p[1:]] + [bonus]
    assert res.accepted_flat.tolist() == flat
    assert res.accepted_indptr.tolist() == [sum(len(p) for p, _ in ref[:i]) for i in range(B + 1)]


def test_duplicate_sibling_drafts_pick_the_first_canonical_path():
    # root predicts 2 at every node; both children draft 2; only the second has an accepted child
    t = Tree.from_paths([(0,), (1,), (1, 0)])
    logits = torch.tensor([[0.0, 0.0, 5.0]] * 4)
    tokens = torch.tensor([7, 2, 2, 1])        # node (1,0) drafts 1 != 2: rejected
    res = greedy_verify(RaggedTreeBatch.build([t], [3]), tokens, logits)
    assert res.accepted_nodes.tolist() == [[0, 1, -1]] and res.bonus_tokens.tolist() == [2]
    tokens = torch.tensor([7, 2, 2, 2])        # now (1,0) is accepted: the deeper path wins
    res = greedy_verify(RaggedTreeBatch.build([t], [3]), tokens, logits)
    assert res.accepted_nodes.tolist() == [[0, 2, 3]] and res.accepted_tokens == [[2, 2, 2]]


def test_low_precision_logits_and_plain_decoding():
    batch = RaggedTreeBatch.build([chain(0), chain(2)], [5, 1])
    logits = torch.tensor([[0, 3, 1], [1, 0, 9], [9, 0, 0], [0, 9, 0]], dtype=torch.bfloat16)
    res = greedy_verify(batch, torch.tensor([4, 4, 2, 0]), logits)
    assert res.accept_len.tolist() == [0, 2]
    assert res.accepted_tokens == [[1], [2, 0, 1]]
    assert res.accepted_flat.tolist() == [0, 1, 2, 3] and res.accepted_indptr.tolist() == [0, 1, 4]
