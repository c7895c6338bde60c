"""The bf16 GPU tests' near-tie check (tests/near_ties.py), on the real model in float32 on the CPU.

Its groupings recompute one position's logits from the same tokens split into forwards in other
ways. In float32 they must all agree with transformers' forward of the whole sequence: a grouping
that read the wrong KV or the wrong row would show there as a spread, and on the GPU it
would widen what the check forgives. And the check must tell a tie from a token the logits do not
pick.
"""
from __future__ import annotations

import torch

from tests.near_ties import (
    TIE_BATCHED,
    TIE_LAST_CHUNKS,
    TIE_STEPS,
    first_divergence_is_near_tie,
    logit_differences_across_shapes,
)

PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May? Answer step by step.")
ANSWER = " In April she sold 48"


def _hf_last_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0, -1].float()


def test_every_grouping_recomputes_the_same_logits_and_frees_its_kv(runner, hf_model, tokenizer):
    prompt, answer = tokenizer(PROMPT)["input_ids"], tokenizer(ANSWER)["input_ids"]
    assert len(prompt) + len(answer) > max(TIE_LAST_CHUNKS + tuple(m for m, _ in TIE_BATCHED)), "every grouping runs"
    ref = _hf_last_logits(hf_model, prompt + answer)
    a, b = int(ref.argmax()), int(ref.argsort()[-2])  # the top two
    free = runner.kv.num_free
    diffs, top = logit_differences_across_shapes(runner, prompt, answer, a, b)
    assert runner.kv.num_free == free
    assert len(diffs) == 1 + len(TIE_LAST_CHUNKS) + len(TIE_STEPS) + len(TIE_BATCHED)
    want = float(ref[a] - ref[b])
    assert abs(top - float(ref[a])) < 1e-3
    assert max(abs(d - want) for d in diffs) < 1e-3, f"groupings disagree in float32: {diffs} against {want}"


def test_the_check_forgives_a_tie_and_not_a_token_the_logits_do_not_pick(runner, hf_model, tokenizer):
    prompt = tokenizer(PROMPT)["input_ids"] + tokenizer(ANSWER)["input_ids"]  # diverging at the answer's first token
    logits = _hf_last_logits(hf_model, prompt)
    best, worst = int(logits.argmax()), int(logits.argmin())
    right, wrong = [best, 13], [worst, 13]
    assert first_divergence_is_near_tie(runner, prompt, right, right) == (True, 0.0, 0.0)
    ok, gap, spread = first_divergence_is_near_tie(runner, prompt, right, wrong)
    assert not ok and gap > 5 and spread < 1e-3, (gap, spread)  # the other run took a token far below the best
    ok, gap, _ = first_divergence_is_near_tie(runner, prompt, wrong, right)
    assert ok and gap < 0  # the other run took a better token than the reference: no fault of its own
