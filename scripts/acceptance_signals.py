#!/usr/bin/env python3
"""Which signal, known before a step's tree is chosen, tells how many drafts will be accepted?

For the calibration-reserve prompts of each family (greedy answers of the served model, then one
teacher-forced pass), every step root x_{t+1} gets three candidate signals:
  * the shipped estimator: the rolling (EMA) target entropy up to position t;
  * the latest target entropy alone (position t);
  * the drafter's own depth-1 top-1 probability (ConfAdapt's signal; it needs the first draft
    level computed before the tree is picked);
  * the heads' recent record: an EMA (decay 0.7) of whether the depth-1 top-1 draft was right at
    the positions already verified (up to t-1);
and two outcomes: the depth-1 top-1 draft is right, and drafts a top-1 chain of depth 3 would get
accepted. Positions are split into quartiles of each signal; a signal that separates the outcome
well would let a per-bucket tree library switch trees.

    python scripts/acceptance_signals.py [--drafter mtp] [--prompts 16] [--max-new-tokens 128]

Prints a table, writes JSON (default benchmarks/results/acceptance_signals_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.calibrate.stats import _draft_index, calibration_prompts, estimator_trace, teacher_forward
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams
from srt_entmtp.spec.drafters import load_drafter
from srt_entmtp.spec.entropy import entropy_from_logits
from srt_entmtp.spec.library import EstimatorConfig
from srt_entmtp.spec.worker import default_heads_dir

FAMILIES = ("code", "math", "chat", "writing")
SIGNALS = ("ema_target_entropy", "latest_target_entropy", "draft_top1_prob", "recent_hits_ema")
CHAIN = 3


@torch.inference_mode()
def positions(engine, drafter, prompt_ids: list[int], answer: list[int], est: EstimatorConfig) -> torch.Tensor:
    """Rows [signal x4, depth-1 hit, chain-3 accepted] for every step root of one answer."""
    seq = list(prompt_ids) + list(answer)
    P, S = len(prompt_ids), len(seq)
    t = torch.arange(P - 1, S - 1)  # position t predicts x_{t+1}, the root of the step at t
    out = teacher_forward(engine.runner, seq, t)
    ent = entropy_from_logits(out.logits).cpu()
    seq_t = torch.tensor(seq + [0] * (CHAIN + 2))
    path = torch.stack([seq_t[t + 1 + j] for j in range(CHAIN)], 1)     # x_{t+1}..x_{t+3}
    target = torch.stack([seq_t[t + 2 + j] for j in range(CHAIN)], 1)   # x_{t+2}..x_{t+4}
    reach = (t.unsqueeze(1) + 2 + torch.arange(CHAIN)) < S
    logits = drafter.path_logits(out.hidden.to(drafter.param_dtype), path.to(out.hidden.device))
    if drafter.draft_vocab is not None:
        target = _draft_index(drafter)[target]
    hit = torch.stack([lg.float().argmax(1).cpu() == target[:, d] for d, lg in enumerate(logits)], 1) & reach
    chain = hit.long().cumprod(1).sum(1)
    conf = torch.softmax(logits[0].float(), -1).max(1).values.cpu()
    recent = estimator_trace(torch.cat([torch.tensor([0.5]), hit[:-1, 0].float()]),
                             EstimatorConfig(mode="ema", ema_decay=0.7, init=0.5))  # hits known at step t
    rows = torch.stack([estimator_trace(ent, est), ent, conf, recent, hit[:, 0].float(), chain.float()], 1)
    return rows[reach[:, 0]]


def quartiles(x: torch.Tensor) -> dict:
    out = {}
    for j, name in enumerate(SIGNALS):
        col = x[:, j].contiguous()
        edges = torch.quantile(col, torch.tensor([0.25, 0.5, 0.75]))
        b = torch.bucketize(col, edges)
        out[name] = {"edges": [round(float(e), 4) for e in edges],
                     "depth1_top1": [round(float(x[b == k, -2].mean()), 4) for k in range(4)],
                     "chain3_accepted": [round(float(x[b == k, -1].mean()), 4) for k in range(4)]}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", default="mtp", choices=["medusa", "hydra", "mtp"])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--prompts", type=int, default=16, help="calibration-reserve prompts per family")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default="benchmarks/results/acceptance_signals_cpu.json")
    a = p.parse_args(argv)
    engine = Engine(EngineArgs(max_running_requests=16))
    drafter = load_drafter(default_heads_dir(a.drafter), engine.runner)
    est = EstimatorConfig()
    res = {"date": time.strftime("%Y-%m-%d"), "drafter": a.drafter, "prompts_per_family": a.prompts,
           "max_new_tokens": a.max_new_tokens, "families": {}}
    for fam in a.families:
        prompts = calibration_prompts(fam, a.prompts)
        ids = [engine.tokenize_chat([{"role": "user", "content": q.prompt}]) for q in prompts]
        reqs = engine.generate(ids, [SamplingParams(temperature=0.0, max_new_tokens=a.max_new_tokens)] * len(ids))
        x = torch.cat([positions(engine, drafter, i, r.output_ids, est) for i, r in zip(ids, reqs)])
        res["families"][fam] = {"positions": int(x.shape[0])} | quartiles(x)
    print(f"{a.drafter} heads: depth-1 top-1 rate (top-1 chain-{CHAIN} drafts accepted) by quartile of each signal")
    print(f"{'family':8s} {'signal':22s} " + " ".join(f"{'q' + str(k + 1):>13s}" for k in range(4)))
    for fam, r in res["families"].items():
        for name in SIGNALS:
            cells = [f"{h:.2f} ({c:.2f})" for h, c in zip(r[name]["depth1_top1"], r[name]["chain3_accepted"])]
            print(f"{fam:8s} {name:22s} " + " ".join(f"{c:>13s}" for c in cells))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
