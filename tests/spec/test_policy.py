"""Policies: static, EntMTP with hysteresis (no flapping), confidence pruning."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from srt_entmtp.spec.library import default_library
from srt_entmtp.spec.policy import (
    TASK_FAMILIES,
    ConfidencePolicy,
    EntMTPPolicy,
    StaticPolicy,
    classify_task,
    path_confidence,
)
from srt_entmtp.spec.tree import Tree, chain

from .strategies import FAST, trees

LIB = default_library()          # edges 1.0 and 2.5 nats in every family; hysteresis 0.1, min steps 2


def choose_seq(policy, values, family="code", slot=0):
    out = []
    for h in values:
        (tree,) = policy.choose(torch.tensor([slot]), [family], torch.tensor([h]))
        out.append(int(policy.current_bucket(torch.tensor([slot]))[0]))
        assert tree is LIB.family(family).tree_for_bucket(out[-1])
    return out


OSCILLATING = [0.95, 1.05, 0.92, 1.08, 0.97, 1.09, 0.91, 1.02] * 3


def test_no_flapping_within_the_margin():
    policy = EntMTPPolicy(LIB)
    buckets = choose_seq(policy, OSCILLATING)
    assert buckets == [0] * len(OSCILLATING)
    # a real move beyond the margin switches, then oscillation around the same edge keeps it
    buckets = choose_seq(policy, [1.3] + OSCILLATING)
    assert buckets == [1] * (len(OSCILLATING) + 1)


def test_without_hysteresis_the_same_sequence_flaps():
    policy = EntMTPPolicy(LIB, hysteresis=0.0, min_steps_between_switches=0)
    buckets = choose_seq(policy, OSCILLATING)
    assert sum(a != b for a, b in itertools.pairwise(buckets)) >= len(OSCILLATING) - 2


def test_min_steps_between_switches():
    policy = EntMTPPolicy(LIB, hysteresis=0.0, min_steps_between_switches=3)
    buckets = choose_seq(policy, [0.2, 3.0, 3.0, 3.0, 0.2, 0.2, 0.2, 3.0, 3.0, 3.0])
    # first choice is free; then a switch needs 3 choices since the last switch (or the start)
    assert buckets == [0, 0, 2, 2, 2, 0, 0, 0, 2, 2]


def _f32(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float32))


def reference_policy(seq, edges, hyst, min_steps):
    """One slot's bucket sequence, written from the definition."""
    bucket, since, out = None, 0, []
    for h in seq:
        target = sum(1 for e in edges if h >= e)
        since += 1
        if bucket is None:
            bucket = target
        else:
            lo = edges[bucket - 1] if bucket > 0 else -math.inf
            hi = edges[bucket] if bucket < len(edges) else math.inf
            # the policy keeps entropies and margins in float32: compare at that precision, or an
            # entropy of float32(1.1) sits on different sides of 1.0 + 0.1 in the two
            if (_f32(h) < _f32(lo - hyst) or _f32(h) > _f32(hi + hyst)) and since >= min_steps:
                bucket, since = target, 0
        out.append(bucket)
    return out


@FAST
@given(st.lists(st.lists(st.floats(0, 4, width=32), min_size=1, max_size=25), min_size=1, max_size=3),
       st.sampled_from([0.0, 0.1, 0.4]), st.integers(0, 3))
def test_matches_reference_for_a_batch(seqs, hyst, min_steps):
    """Both forms of choose(): vectorised (SMALL_BATCH = 0) and one request at a time (the default at
    these batch sizes)."""
    from srt_entmtp.spec import policy as policy_mod

    saved = policy_mod.SMALL_BATCH
    try:
        for small in (0, saved):
            policy_mod.SMALL_BATCH = small
            _check_against_reference(seqs, hyst, min_steps)
    finally:
        policy_mod.SMALL_BATCH = saved


def test_one_at_a_time_form_makes_the_vectorised_forms_choices():
    """Random float32 entropies on and around the edges (and their margins), families that change
    and resets: the per-request form of choose() decides every step as the vectorised one does."""
    import numpy as np

    from srt_entmtp.spec import policy as policy_mod

    rng = np.random.default_rng(0)
    near = np.array([1.0, 2.5, 0.9, 1.1, 2.4, 2.6], dtype=np.float32)
    fams = ["code", "math", "chat", "writing", "general", "unknown"]
    for hyst, min_steps in ((0.1, 2), (0.0, 0), (0.4, 3)):
        a = EntMTPPolicy(LIB, hysteresis=hyst, min_steps_between_switches=min_steps)
        b = EntMTPPolicy(LIB, hysteresis=hyst, min_steps_between_switches=min_steps)
        for step in range(300):
            n = int(rng.integers(1, 12))
            slots = torch.from_numpy(rng.choice(40, n, replace=False))
            h = np.where(rng.random(n) < 0.5, rng.choice(near, n), rng.uniform(0, 4, n)).astype(np.float32)
            h = h + np.where(rng.random(n) < 0.3, np.float32(1e-7) * rng.choice([-1, 1], n), 0).astype(np.float32)
            h[rng.random(n) < 0.05] = np.nan
            fam = [fams[i] for i in rng.integers(0, len(fams) if step % 50 else 2, n)]
            policy_mod.SMALL_BATCH = 0
            want = a.choose(slots, fam, torch.from_numpy(h))
            policy_mod.SMALL_BATCH = 16
            got = b.choose(slots, fam, torch.from_numpy(h))
            assert got == want, step
            assert np.array_equal(a.bucket, b.bucket) and np.array_equal(a.since_switch, b.since_switch)
            if step % 37 == 0:
                a.reset(slots[:2])
                b.reset(slots[:2])


def _check_against_reference(seqs, hyst, min_steps):
    policy = EntMTPPolicy(LIB, hysteresis=hyst, min_steps_between_switches=min_steps)
    fams = ["code", "writing", "unknown"][: len(seqs)]
    got = [[] for _ in seqs]
    for t in range(max(len(s) for s in seqs)):
        live = [i for i, s in enumerate(seqs) if t < len(s)]
        slots = torch.tensor([10 + i for i in live])
        h = torch.tensor([seqs[i][t] for i in live])
        chosen = policy.choose(slots, [fams[i] for i in live], h)
        for i, tree, b in zip(live, chosen, policy.current_bucket(slots).tolist()):
            got[i].append(b)
            assert tree is LIB.family(fams[i]).tree_for_bucket(b)
    for i, s in enumerate(seqs):
        assert got[i] == reference_policy(s, [1.0, 2.5], hyst, min_steps)


def test_reset_family_change_and_nan():
    policy = EntMTPPolicy(LIB)
    choose_seq(policy, [0.1], slot=3)
    policy.reset(torch.tensor([3]))
    assert policy.current_bucket(torch.tensor([3])).tolist() == [-1]
    assert choose_seq(policy, [3.0], slot=3) == [2]                 # fresh: no hysteresis, no wait
    assert choose_seq(policy, [0.1], family="math", slot=3) == [0]  # new family: fresh choice
    (tree,) = policy.choose(torch.tensor([5]), ["chat"], torch.tensor([float("nan")]))
    assert tree is LIB.choose("chat", LIB.policy.estimator.init)


def test_static_policy():
    t = chain(3)
    p = StaticPolicy(t)
    assert p.choose(torch.tensor([0, 1]), ["code", "chat"], torch.tensor([0.0, 9.0])) == [t, t]
    p.reset(torch.tensor([0]))


def test_families_constant_and_classifier_range():
    assert TASK_FAMILIES == ("code", "math", "chat", "writing", "general")
    for prompt in ["", "hi", "Write a poem about rain", "What is 17 * 3 + 4?", "```python\nprint(1)\n```"]:
        assert classify_task(prompt) in TASK_FAMILIES


# ---------------------------------------------------------------- confidence pruning

@FAST
@given(trees(max_nodes=14), st.data(), st.floats(0.05, 0.95))
def test_prune_removes_low_confidence_subtrees(tree: Tree, data, threshold):
    probs = torch.tensor(data.draw(st.lists(st.floats(0.0, 1.0), min_size=tree.num_nodes, max_size=tree.num_nodes)),
                         dtype=torch.float64)
    conf = path_confidence(tree, probs)
    for i, p in enumerate(tree.paths):      # product of draft probabilities along the path
        want, node = 1.0, i
        while node > 0:
            want *= float(probs[node])
            node = int(tree.parents[node])
        assert float(conf[i]) == pytest.approx(want, abs=1e-12)
    policy = ConfidencePolicy(StaticPolicy(tree), threshold)
    pruned, index = policy.prune_with_index(tree, conf)
    assert pruned is policy.prune(tree, conf)
    kept = {tree.paths[i] for i in index.tolist()}
    assert () in kept
    for i, p in enumerate(tree.paths[1:], start=1):
        assert (p in kept) == (float(conf[i]) >= threshold)  # path products only shrink: closure is free
    assert set(pruned.paths) == kept


def test_prune_never_removes_root_and_checks_shape():
    t = Tree.from_paths([(0,), (1,), (0, 0)])
    policy = ConfidencePolicy(StaticPolicy(t), 0.5)
    # node order: (), (0,), (1,), (0, 0); the root's own confidence (0 here) never matters
    assert policy.prune(t, torch.tensor([0.0, 0.9, 0.1, 0.6])).paths == ((), (0,), (0, 0))
    assert policy.prune(t, torch.tensor([0.0, 0.1, 0.9, 0.6])).paths == ((), (1,))   # (0, 0) lost its parent
    with pytest.raises(ValueError):
        policy.prune(t, torch.ones(3))
    with pytest.raises(ValueError):
        ConfidencePolicy(StaticPolicy(t), 1.5)
    assert policy.choose(torch.tensor([0]), ["code"], torch.tensor([1.0])) == [t]
