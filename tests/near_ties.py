"""The near-tie check of the bf16 GPU tests (and scripts/check_join_ahead.py): is a first divergence
between two greedy runs a rounding tie of the reference model, or a token its logits do not pick?

bf16 batches of different shapes round differently, so speculation against plain decoding in bf16
is exact only up to ties; this measures, at the diverging position, how far rounding alone moves
the two tokens' logit difference, and calls the divergence a tie only within that. Tested on the
CPU in float32 (tests/test_near_ties.py), where the groupings must agree.
"""
from __future__ import annotations

import math

import torch

from srt_entmtp.model.forward_batch import ForwardBatch

# how the near-tie check recomputes a position: the last m tokens as one chunk over the rest
# (1: a decode step; 25: a batch-1 verify's rows), and the answer so far fed k tokens a forward
# after its prompt, as steps that accept k tokens write its KV (1: NONE's own decode steps)
TIE_LAST_CHUNKS = (1, 2, 5, 13, 25, 32)
TIE_STEPS = (1, 2, 3, 4, 5)
# (m, copies): the last m as `copies` sequences over the prefix in one forward; rows m*copies =
# 40, 80, 78, 75: the mid-size and unfused forwards a batch of trees takes
TIE_BATCHED = ((5, 8), (5, 16), (13, 6), (25, 3))


def logit_differences_across_shapes(runner, prompt, answer, a, b):
    """logit[a] - logit[b] after prompt + answer, from the runner's forwards of the same tokens
    that differ only in how the tokens are grouped into forwards: all at once; the last m over the
    rest in the KV cache (TIE_LAST_CHUNKS); the prompt, then the answer k tokens a forward (TIE_STEPS);
    the rest, then the last m as `copies` sequences over it in one forward (TIE_BATCHED; copy 0's
    logits): one sequence is at most 32 rows, the fused few-token forward, while a verify batch of
    many trees takes the mid-size and unfused forwards, which round otherwise.
    What rounding alone moves that difference by, the KV written in steps of other sizes included.
    Returns the differences (the one forward's first) and that forward's logit[a]."""
    seq = list(prompt) + list(answer)
    groupings = [[len(seq)]]
    groupings += [[len(seq) - m, m] for m in TIE_LAST_CHUNKS if m < len(seq)]
    groupings += [[len(prompt)] + [min(k, len(answer) - j) for j in range(0, len(answer), k)] for k in TIE_STEPS
                  if len(answer) > 1]
    batched = [(m, copies) for m, copies in TIE_BATCHED if m < len(seq)]
    kv, tokens, diffs, top, dev = runner.kv, torch.tensor(seq), [], None, runner.device
    # one pop: the sequence's slots, and the copies' new slots (reused by each batched grouping)
    slots, extra = kv.alloc_many([len(seq), max((m * copies for m, copies in batched), default=0)])
    try:
        for sizes in groupings:
            start = 0
            for size in sizes:  # one forward per group, over the KV the groups before wrote
                end = start + size
                fb = ForwardBatch.build([tokens[start:end]], [slots[:start]], [slots[start:end]],
                                        logits_indices=torch.tensor([size - 1]), device=dev)
                out = runner.forward(fb)
                start = end
            logits = out.logits[0].float()
            diffs.append(float(logits[a] - logits[b]))
            top = float(logits[a]) if top is None else top
        for m, copies in batched:  # the rest once, then the copies (they only read its KV) in one forward
            start = len(seq) - m
            runner.forward(ForwardBatch.build([tokens[:start]], [slots[:0]], [slots[:start]],
                                              logits_indices=torch.tensor([start - 1]), device=dev))
            fb = ForwardBatch.build([tokens[start:]] * copies, [slots[:start]] * copies,
                                    list(extra[:m * copies].split(m)), logits_indices=torch.tensor([m - 1]),
                                    device=dev)
            logits = runner.forward(fb).logits[0].float()  # rows go copy by copy: copy 0's last
            diffs.append(float(logits[a] - logits[b]))
    finally:
        kv.free(slots)
        kv.free(extra)
    return diffs, top


def first_divergence_is_near_tie(runner, prompt, ref_ids, out_ids, margin=2):
    """At the first differing position, the reference's token a and the other run's token b are a
    rounding tie: logit[a] - logit[b] from a forward of the whole sequence is at most what rounding
    alone moves it by (the spread of that difference over the groupings of
    logit_differences_across_shapes), or at most `margin` bf16 steps of logit[a]. A bug of
    speculation (a token the verifier's logits do not pick) leaves a gap well above both.
    Returns (ok, gap, spread)."""
    i = next((j for j, (x, y) in enumerate(zip(ref_ids, out_ids)) if x != y), None)
    if i is None:
        return True, 0.0, 0.0
    diffs, top = logit_differences_across_shapes(runner, prompt, ref_ids[:i], ref_ids[i], out_ids[i])
    gap, spread = diffs[0], max(diffs) - min(diffs)
    ulp = 2.0 ** (math.floor(math.log2(abs(top) + 1e-30)) - 7)  # a bf16 step at the logit's magnitude
    return gap <= max(spread, margin * ulp), gap, spread
