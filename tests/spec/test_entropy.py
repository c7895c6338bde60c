"""Entropy and the rolling tracker against float64 pure-Python references."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from srt_entmtp.spec.entropy import EntropyTracker, entropy_from_logits

from .strategies import FAST


def ref_entropy(row: list[float]) -> float:
    m = max(row)
    z = sum(math.exp(x - m) for x in row if x != -math.inf)
    h = 0.0
    for x in row:
        if x == -math.inf:
            continue
        p = math.exp(x - m) / z
        h -= p * (x - m - math.log(z))
    return h


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_entropy_matches_float64_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(2, 3, 50, generator=g) * torch.tensor([0.1, 3.0, 20.0]).view(1, 3, 1)).to(dtype)
    logits[0, 0, :10] = float("-inf")
    h = entropy_from_logits(logits)
    assert h.shape == (2, 3) and h.dtype == torch.float32
    for idx in [(i, j) for i in range(2) for j in range(3)]:
        row = logits[idx].double().tolist()   # the reference sees exactly the rounded inputs
        assert float(h[idx]) == pytest.approx(ref_entropy(row), abs=tol, rel=tol)
    assert torch.isfinite(h).all()


def test_entropy_edge_cases():
    assert float(entropy_from_logits(torch.zeros(8))) == pytest.approx(math.log(8))
    onehot = torch.full((5,), float("-inf"))
    onehot[2] = 0.0
    assert float(entropy_from_logits(onehot)) == 0.0
    big = torch.tensor([1e4, 0.0, -1e4], dtype=torch.bfloat16)
    assert float(entropy_from_logits(big)) == pytest.approx(0.0, abs=1e-6)


class RefTracker:
    """The tracker's definition, one value at a time, in float64."""

    def __init__(self, capacity, decay, window, init, mode, draft_mix):
        self.decay, self.W, self.init, self.mode, self.mix = decay, window, init, mode, draft_mix
        self.ema = [init] * capacity
        self.hist: list[list[float]] = [[] for _ in range(capacity)]
        self.draft: list[float | None] = [None] * capacity

    def reset(self, s):
        self.ema[s], self.hist[s], self.draft[s] = self.init, [], None

    def update(self, s, values):
        for h in values:
            self.ema[s] = self.decay * self.ema[s] + (1 - self.decay) * h
            self.hist[s].append(h)

    def value(self, s):
        win = self.hist[s][-self.W :]
        mean = sum(win) / len(win) if win else self.init
        est = {"ema": self.ema[s], "window": mean, "max": max(self.ema[s], mean)}[self.mode]
        if self.mix and self.draft[s] is not None:
            est = (1 - self.mix) * est + self.mix * self.draft[s]
        return est


ops = st.lists(st.one_of(
    st.tuples(st.just("update"),
              st.lists(st.tuples(st.integers(0, 5), st.lists(st.floats(0, 10), max_size=11)),
                       min_size=1, max_size=4, unique_by=lambda t: t[0])),
    st.tuples(st.just("reset"), st.lists(st.integers(0, 5), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("draft"), st.lists(st.tuples(st.integers(0, 5), st.floats(0, 10)),
                                         min_size=1, max_size=3, unique_by=lambda t: t[0])),
), max_size=12)


@FAST
@given(ops, st.sampled_from(["ema", "window", "max"]), st.floats(0.0, 0.95), st.integers(1, 6),
       st.floats(0, 5), st.sampled_from([0.0, 0.3]))
def test_tracker_matches_reference(sequence, mode, decay, window, init, mix):
    tr = EntropyTracker(6, mode=mode, ema_decay=decay, window=window, init=init, draft_mix=mix)
    ref = RefTracker(6, decay, window, init, mode, mix)
    all_slots = torch.arange(6)
    for kind, arg in sequence:
        if kind == "update":
            slots = torch.tensor([s for s, _ in arg])
            flat = torch.tensor([h for _, vals in arg for h in vals], dtype=torch.float32)
            indptr = torch.tensor([0] + [len(v) for _, v in arg]).cumsum(0)
            tr.update(slots, flat, indptr)
            for s, vals in arg:
                ref.update(s, [float(torch.tensor(h, dtype=torch.float32)) for h in vals])
        elif kind == "reset":
            tr.reset(torch.tensor(arg))
            for s in arg:
                ref.reset(s)
        else:
            tr.update_draft(torch.tensor([s for s, _ in arg]), torch.tensor([h for _, h in arg]))
            for s, h in arg:
                ref.draft[s] = float(torch.tensor(h, dtype=torch.float32))
        got = tr.value(all_slots).tolist()
        want = [ref.value(s) for s in range(6)]
        assert got == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_value_before_any_observation_is_init_and_slots_are_independent():
    tr = EntropyTracker(4, init=1.5)
    assert tr.value(torch.arange(4)).tolist() == [1.5] * 4
    tr.update(torch.tensor([2]), torch.tensor([0.0, 0.0]), torch.tensor([0, 2]))
    v = tr.value(torch.arange(4))
    assert v[[0, 1, 3]].tolist() == [1.5] * 3
    assert float(v[2]) == pytest.approx(1.5 * 0.7 ** 2)
    tr.reset(torch.tensor([2]))
    assert float(tr.value(torch.tensor([2]))) == 1.5


@pytest.mark.parametrize("kwargs", [{"mode": "median"}, {"ema_decay": 1.0}, {"window": 0}, {"draft_mix": 2.0}])
def test_bad_config(kwargs):
    with pytest.raises(ValueError):
        EntropyTracker(2, **kwargs)


def test_one_request_at_a_time_update_equals_the_closed_forms_to_the_bit():
    """EntropyTracker.update's two forms (vectorised closed forms past SMALL_BATCH requests, a
    Python loop up to it) leave the same EMA, window and counts, exactly, over random ragged
    updates of 1-12 values (past the window) with lists or tensors as inputs."""
    import numpy as np

    from srt_entmtp.spec import entropy as entropy_mod

    rng = np.random.default_rng(1)
    a, b = EntropyTracker(40, ema_decay=0.7, window=5), EntropyTracker(40, ema_decay=0.7, window=5)
    saved = entropy_mod.SMALL_BATCH
    try:
        for step in range(200):
            n = int(rng.integers(1, 10))
            slots = rng.choice(40, n, replace=False)
            k = rng.integers(1, 13, n)
            flat = rng.uniform(0, 6, int(k.sum())).astype(np.float32)
            ind = np.concatenate([[0], np.cumsum(k)])
            entropy_mod.SMALL_BATCH = 0
            a.update(torch.from_numpy(slots), torch.from_numpy(flat), torch.from_numpy(ind))
            entropy_mod.SMALL_BATCH = 16
            if step % 2:
                b.update(slots.tolist(), flat.tolist(), ind.tolist())
            else:
                b.update(torch.from_numpy(slots), torch.from_numpy(flat), torch.from_numpy(ind))
            assert np.array_equal(a.ema, b.ema) and np.array_equal(a.window, b.window), step
            assert np.array_equal(a.count, b.count)
    finally:
        entropy_mod.SMALL_BATCH = saved
