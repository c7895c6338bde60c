#!/usr/bin/env python3
"""Accepted tokens per verify step of each drafter, per task family, at temperature 0, with real
verification by the model: under a 1-node-per-depth chain of depth 4 and under a 32-node tree.

    python scripts/bench_heads.py [--prompts 3] [--max-new-tokens 64] [--out benchmarks/results/heads_cpu.json]

The 32-node tree is the exact optimum (spec/builders.optimal_tree, 31 drafted nodes, depth <= 4)
under a fixed geometric acceptance prior, acc[d, r] = 0.7 * 0.6**d * 0.45**r, the same tree for
every drafter so that drafters are compared on equal terms. Prompts are the benchmark/held-out
ones (srt_entmtp/bench_prompts.py). Accept length counts accepted drafts plus the bonus token.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.bench_prompts import benchmark_prompts
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions
from srt_entmtp.spec.builders import optimal_tree
from srt_entmtp.spec.policy import StaticPolicy
from srt_entmtp.spec.tree import chain

FAMILIES = ("code", "math", "chat", "writing")


def tree32():
    d, k = torch.arange(4).view(4, 1).float(), torch.arange(8).view(1, 8).float()
    return optimal_tree(0.7 * 0.6 ** d * 0.45 ** k, 31, 4)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafters", nargs="+", default=["medusa", "hydra", "mtp"])
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="benchmarks/results/heads_cpu.json")
    a = p.parse_args(argv)
    trees = {"chain4": chain(4), "tree32": tree32()}
    res = {"date": time.strftime("%Y-%m-%d"), "device": a.device, "max_new_tokens": a.max_new_tokens,
           "prompts_per_family": a.prompts, "trees": {k: [list(x) for x in t.paths[1:]] for k, t in trees.items()},
           "results": {}}
    for drafter in a.drafters:
        eng = Engine(EngineArgs(device=a.device, kv_slots=16384, context_length=2048, max_running_requests=16,
                                speculative_algorithm="STATIC", drafter=drafter))
        enc = {f: [eng.tokenize_chat([{"role": "user", "content": r["prompt"]}])
                   for r in benchmark_prompts(f, a.prompts)] for f in FAMILIES}
        res["results"][drafter] = {}
        for name, tree in trees.items():
            eng.worker.policy = StaticPolicy(tree)
            eng.worker.max_nodes = max(eng.worker.max_nodes, tree.num_nodes)
            for f in FAMILIES:
                reqs = eng.generate(enc[f], SamplingParams(max_new_tokens=a.max_new_tokens),
                                    [SpecOptions(task=f)] * len(enc[f]))
                steps = sum(r.verify_ct for r in reqs)
                acc = sum(r.accepted_tokens for r in reqs)
                res["results"][drafter].setdefault(f, {})[name] = {
                    "accept_length": (acc + steps) / steps, "accepted_drafts_per_step": acc / steps, "steps": steps}
        del eng
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"\naccepted tokens per verify step (drafts + bonus), temperature 0, {a.prompts} prompts x "
          f"{a.max_new_tokens} tokens per family, {a.device}")
    print(f"{'drafter':<8} " + " ".join(f"{f + ' ' + t:>14}" for f in FAMILIES for t in trees))
    for drafter, block in res["results"].items():
        print(f"{drafter:<8} " + " ".join(f"{block[f][t]['accept_length']:>14.2f}" for f in FAMILIES for t in trees))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
