"""Sampling verification is lossless: emitted tokens follow the target distribution exactly.

The statistical harness draws N independent speculative steps (one batch of N identical
requests), then a second step for requests that emitted only one token, and compares the
empirical distribution of the first one and the first two emitted tokens with the target's
(chi-square). The same harness is run on deliberately wrong samplers, which it must reject:
that is what shows the test has power.
"""
from __future__ import annotations

import itertools
import random
import zlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from srt_entmtp.spec.sampling import apply_sampling_filters, sample_from
from srt_entmtp.spec.tree import RaggedTreeBatch, Tree
from srt_entmtp.spec.verify import greedy_verify, sample_verify

from .strategies import FAST, batches

V = 6
N = 8000
TREE = Tree.from_paths([(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])


# ---------------------------------------------------------------- a toy target and drafter

def _noise(kind: str, ctx: tuple[int, ...]) -> torch.Tensor:
    seed = zlib.crc32(repr((kind, ctx)).encode())      # stable across processes, unlike hash()
    return torch.randn(V, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def target_logits(ctx):
    return _noise("target", ctx) * 1.2


def draft_tokens(ctx, duplicates: bool) -> list[int]:
    """A decent drafter: its ranking is the target's, perturbed; `duplicates` repeats its top-1."""
    order = torch.argsort(target_logits(ctx) + 0.8 * _noise("draft", ctx), descending=True).tolist()
    return [order[0], order[0], order[1]] if duplicates else order


def tree_inputs(ctx: tuple[int, ...], duplicates: bool):
    """Node tokens [n] and target logits [n, V] of TREE drafted after context ctx."""
    tokens, logits, node_ctx = [], [], {(): ctx}
    for p in TREE.paths:
        if p:
            parent_ctx = node_ctx[p[:-1]]
            tok = draft_tokens(parent_ctx, duplicates)[p[-1]]
            node_ctx[p] = parent_ctx + (tok,)
            tokens.append(tok)
        else:
            tokens.append(99)              # the root's token is never checked
        logits.append(target_logits(node_ctx[p]))
    return torch.tensor(tokens), torch.stack(logits).float()


def reference_filter(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[float]:
    """Target distribution after the filters, in plain Python (independent of the library)."""
    x = [float(v) / temperature for v in logits]
    order = sorted(range(len(x)), key=lambda i: -x[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    z = sum(pow(2.718281828459045, x[i]) for i in keep)
    probs = {i: pow(2.718281828459045, x[i]) / z for i in keep}
    if top_p < 1:
        mass, nucleus = 0.0, set()
        for i in sorted(keep, key=lambda i: -x[i]):
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += probs[i]
        keep = nucleus
    z = sum(probs[i] for i in keep)
    return [probs[i] / z if i in keep else 0.0 for i in range(len(x))]


# ---------------------------------------------------------------- samplers under test

def library_sampler(cfg):
    def run(node_tokens: torch.Tensor, node_logits: torch.Tensor, seed: int) -> list[list[int]]:
        n = node_tokens.shape[0]
        batch = RaggedTreeBatch.build([TREE] * n, torch.zeros(n, dtype=torch.long))
        g = torch.Generator().manual_seed(seed)
        res = sample_verify(batch, node_tokens.reshape(-1), node_logits.reshape(-1, V),
                            torch.full((n,), cfg["temperature"]), torch.full((n,), cfg["top_p"]),
                            torch.full((n,), cfg["top_k"], dtype=torch.long), g)
        return res.accepted_tokens
    return run


def python_sampler(cfg, renormalise: bool = True, zero_rejected: bool = True, bonus_from_residual: bool = True):
    """Tree rejection sampling in plain Python; the flags switch on classic bugs."""
    def run(node_tokens: torch.Tensor, node_logits: torch.Tensor, seed: int) -> list[list[int]]:
        rng = random.Random(seed)
        kids = [[c for c in row if c >= 0] for row in TREE.children.tolist()]
        cache: dict = {}
        out = []
        for toks, lgs in zip(node_tokens.tolist(), node_logits):
            emitted, node = [], 0
            while True:
                key = (node, tuple(lgs[node].tolist()))
                if key not in cache:
                    cache[key] = reference_filter(lgs[node], cfg["temperature"], cfg["top_k"], cfg["top_p"])
                p = list(cache[key])
                full = list(p)
                moved = False
                for c in kids[node]:
                    x = toks[c]
                    mass = sum(p) if renormalise else 1.0
                    if rng.random() * mass < p[x]:
                        emitted.append(x)
                        node, moved = c, True
                        break
                    if zero_rejected:
                        p[x] = 0.0
                if not moved:
                    w = p if bonus_from_residual else full
                    emitted.append(rng.choices(range(V), weights=w if sum(w) > 0 else None)[0])
                    break
            out.append(emitted)
        return out
    return run


# ---------------------------------------------------------------- the harness

def chi_square_pvalue(counts: dict, probs: dict, n: int) -> float:
    """Pearson chi-square; cells with expected count < 5 are pooled; impossible cells must be empty."""
    if any(k not in probs or probs[k] == 0 for k in counts):
        return 0.0
    stat, dof, pool_obs, pool_exp = 0.0, -1, 0.0, 0.0
    for k, p in probs.items():
        e, o = p * n, counts.get(k, 0)
        if e < 5:
            pool_obs, pool_exp = pool_obs + o, pool_exp + e
            continue
        stat += (o - e) ** 2 / e
        dof += 1
    if pool_exp > 0:
        stat += (pool_obs - pool_exp) ** 2 / pool_exp
        dof += 1
    dof = max(dof, 1)
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def first_two_tokens(sampler, duplicates: bool, seed: int) -> list[tuple[int, int]]:
    toks, lgs = tree_inputs((), duplicates)
    step1 = sampler(toks.expand(N, -1), lgs.expand(N, -1, -1), seed)
    # second step, drafted after each request's first token (only used where step 1 emitted one)
    per_first = [tree_inputs((v,), duplicates) for v in range(V)]
    first = torch.tensor([e[0] for e in step1])
    toks2 = torch.stack([per_first[v][0] for v in range(V)])[first]
    lgs2 = torch.stack([per_first[v][1] for v in range(V)])[first]
    step2 = sampler(toks2, lgs2, seed + 1)
    return [(a[0], a[1] if len(a) > 1 else b[0]) for a, b in zip(step1, step2)]


def pvalues(sampler, cfg, duplicates=False, seed=1234) -> tuple[float, float]:
    pairs = first_two_tokens(sampler, duplicates, seed)
    f = lambda ctx: reference_filter(target_logits(ctx), cfg["temperature"], cfg["top_k"], cfg["top_p"])
    p1 = f(())
    joint = {(a, b): p1[a] * f((a,))[b] for a in range(V) for b in range(V)}
    c1, c2 = {}, {}
    for a, b in pairs:
        c1[a] = c1.get(a, 0) + 1
        c2[(a, b)] = c2.get((a, b), 0) + 1
    return chi_square_pvalue(c1, dict(enumerate(p1)), N), chi_square_pvalue(c2, joint, N)


CONFIGS = {
    "plain": {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    "cold": {"temperature": 0.6, "top_k": 0, "top_p": 1.0},
    "hot_topk3": {"temperature": 1.4, "top_k": 3, "top_p": 1.0},
    "topp": {"temperature": 1.0, "top_k": 0, "top_p": 0.8},
}
ALPHA = 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sample_verify_is_lossless(name):
    cfg = CONFIGS[name]
    first, pair = pvalues(library_sampler(cfg), cfg)
    print(f"\n{name}: p(first token)={first:.3g} p(first two)={pair:.3g}")
    assert first > ALPHA and pair > ALPHA


def test_sample_verify_is_lossless_with_duplicate_sibling_drafts():
    cfg = CONFIGS["plain"]
    first, pair = pvalues(library_sampler(cfg), cfg, duplicates=True)
    assert first > ALPHA and pair > ALPHA


def test_harness_accepts_an_independent_correct_sampler():
    cfg = CONFIGS["hot_topk3"]
    first, pair = pvalues(python_sampler(cfg), cfg)
    assert first > ALPHA and pair > ALPHA


@pytest.mark.parametrize("bug", ["no_renormalise", "no_zeroing", "bonus_from_full_target"])
def test_harness_rejects_wrong_samplers(bug):
    cfg = CONFIGS["hot_topk3"]
    wrong = python_sampler(cfg, renormalise=bug != "no_renormalise", zero_rejected=bug != "no_zeroing",
                           bonus_from_residual=bug != "bonus_from_full_target")
    first, pair = pvalues(wrong, cfg)
    print(f"\n{bug}: p(first token)={first:.3g} p(first two)={pair:.3g}")
    assert min(first, pair) < ALPHA


# ---------------------------------------------------------------- structure and greedy rows

@FAST
@given(batches(max_requests=4, max_nodes=12), st.integers(0, 2**31 - 1))
def test_sampled_paths_are_valid_and_greedy_rows_match_greedy(args, seed):
    trees, prefix = args
    batch = RaggedTreeBatch.build(trees, torch.tensor(prefix))
    g = torch.Generator().manual_seed(seed)
    vocab = 5
    logits = torch.randn(batch.num_tokens, vocab, generator=g) * 2
    tokens = torch.randint(0, vocab, (batch.num_tokens,), generator=g)
    B = len(trees)
    temp = (torch.rand(B, generator=g) < 0.5).float() * 1.2     # about half the rows greedy
    res = sample_verify(batch, tokens, logits, temp, torch.ones(B), torch.zeros(B, dtype=torch.long), g)
    ref = greedy_verify(batch, tokens, logits)
    for i, t in enumerate(trees):
        path = [j for j in res.accepted_nodes[i].tolist() if j >= 0]
        assert path[0] == 0 and len(path) == int(res.accept_len[i]) + 1
        off = int(batch.node_indptr[i])
        for a, b in itertools.pairwise(path):
            assert int(t.parents[b]) == a
        assert res.accepted_tokens[i][:-1] == [int(tokens[off + j]) for j in path[1:]]
        if temp[i] == 0:
            assert res.accepted_nodes[i].tolist() == ref.accepted_nodes[i].tolist()
            assert int(res.bonus_tokens[i]) == int(ref.bonus_tokens[i])
        else:
            # every child of the last node was tried and rejected, so the bonus is none of them
            last = path[-1]
            kids = [off + c for c in t.children[last].tolist() if c >= 0]
            assert int(res.bonus_tokens[i]) not in tokens[kids].tolist()
    assert res.accepted_flat.numel() == int(res.accepted_indptr[-1])


def test_apply_sampling_filters_matches_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 9, generator=g)
    temp = torch.tensor([1.0, 0.5, 1.5, 1.0, 0.7, 0.0])
    top_k = torch.tensor([0, 3, 0, 1, 4, 2])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.9, 0.5, 0.3])
    probs = apply_sampling_filters(logits.to(torch.float16), temp, top_p, top_k)
    assert probs.dtype == torch.float32
    for i in range(5):
        want = reference_filter(logits[i].to(torch.float16).float(), float(temp[i]), int(top_k[i]), float(top_p[i]))
        assert probs[i].tolist() == pytest.approx(want, abs=1e-5)
    assert probs[5].tolist() == [1.0 if j == int(logits[5].to(torch.float16).argmax()) else 0.0 for j in range(9)]
    same = apply_sampling_filters(logits, 1.0)
    assert torch.allclose(same, logits.softmax(-1))


def test_sample_from_skips_zero_weights_and_survives_zero_rows():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.0, 1.0, 0.0, 3.0]] * 4000 + [[0.0, 0.0, 0.0, 0.0]])
    s = sample_from(w, g)
    assert set(s[:-1].tolist()) == {1, 3}
    assert abs(float((s[:-1] == 3).float().mean()) - 0.75) < 0.03
    assert 0 <= int(s[-1]) < 4
