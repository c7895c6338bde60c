#!/usr/bin/env python3
"""Does an engine configuration give NONE's tokens? Repeated greedy runs against NONE, for the
join-ahead bug (docs/gpu.md, 2026-12-07): on the H100, join ahead gave wrong tokens, 4-20 logits
below NONE's choice, in 2 of 5 runs of the GPU test's 12 prompts and never with either half off.

For each configuration an engine is built once and run `--runs` times over the same prompts
(all at once, 32 tokens, EOS ignored: the bf16 GPU test's requests); every output's first
divergence from NONE of the same process is classified with the GPU tests' near-tie check
(tests/near_ties.py: NONE's logit gap between the two tokens against the spread rounding
gives it at that position). A divergence is wrong when the gap exceeds that allowance. Prints a
table (wrong outputs per run) and writes JSON with every divergence.

    python scripts/check_join_ahead.py --runs 5 [--configs default join-ahead ...] [--out check.json]

Configurations: default (join ahead off), join-ahead (both halves on), join-chunks (chunks join
unread, changed batches wait), launch-changed (changed batches launched behind the step in
flight, chunks read first), join-ahead-synced (join ahead on, the host waiting for the device
after every launch: no host write can then overtake a queued copy, so wrong tokens there are a
bookkeeping bug, not a race). On CPU it runs too (SDPA, eager), slowly: `--device cpu --prompts 2`.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions
from tests.conftest import load_prompts
from tests.gpu.test_gpu import PRIOR_LIBRARY
from tests.near_ties import first_divergence_is_near_tie

CONFIGS = {  # name: (EngineArgs.join_ahead, then the two halves set apart where they differ, synced)
    "default": (False, None, None, False),
    "join-ahead": (True, None, None, False),
    "join-chunks": (True, True, False, False),       # Scheduler.join_ahead, SpecWorker.launch_changed
    "launch-changed": (True, False, True, False),
    "join-ahead-synced": (True, None, None, True),
}


def synced(fn):
    """fn, then wait for everything it queued on the device."""
    import torch

    def call(*a, **kw):
        out = fn(*a, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    return call


def sync_every_launch(eng: Engine) -> None:
    """The host waits for the device after every draft, verify and prompt-chunk launch."""
    ds = eng.worker.device_step
    ds.launch_draft, ds.launch_verify = synced(ds.launch_draft), synced(ds.launch_verify)
    eng.worker._launch_unread = synced(eng.worker._launch_unread)


def engine(ns, algorithm: str, join: bool = False) -> Engine:
    gpu = ns.device == "cuda"
    kw = {"device": ns.device, "kv_slots": 65536 if gpu else 8192, "context_length": 2048, "max_running_requests": 16,
          "attention_backend": "flashinfer" if gpu else "sdpa", "cuda_graph": gpu}
    if algorithm != "NONE":
        kw |= {"drafter": "mtp", "tree_library": PRIOR_LIBRARY, "lookup_tokens": 0, "join_ahead": join,
               "spec_step": "device"}
    return Engine(EngineArgs(speculative_algorithm=algorithm, **kw))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--runs", type=int, default=5, help="runs of each configuration's engine")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--prompts", type=int, default=3, help="prompts per prompt set (3: the GPU test's 12)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", default="check_join_ahead.json")
    ns = ap.parse_args()
    rows = load_prompts(per_family=ns.prompts, seed=1)
    none = engine(ns, "NONE")
    ids = [none.tokenize_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
    sp = SamplingParams(max_new_tokens=ns.max_new_tokens, ignore_eos=True)
    ref = none.generate(ids, sp)
    result = {"device": ns.device, "date": time.strftime("%Y-%m-%d"), "prompts": [r["id"] for r in rows], "runs": []}
    if ns.device == "cuda":
        import torch
        result["gpu"] = torch.cuda.get_device_name()
    for name in ns.configs:
        join, chunks, changed, sync = CONFIGS[name]
        eng = engine(ns, "ENTMTP", join)
        if chunks is not None:
            eng.scheduler.join_ahead, eng.worker.launch_changed = chunks, changed
        if sync:
            sync_every_launch(eng)
        for run in range(ns.runs):
            joined0 = eng.scheduler.stats["prefills_joined"]
            out = eng.generate(ids, sp, [SpecOptions(task=r["task"]) for r in rows])
            joined = eng.scheduler.stats["prefills_joined"] - joined0  # chunks whose requests joined ahead
            divs = []
            for p, r, o, row in zip(ids, ref, out, rows):
                i = next((j for j, (x, y) in enumerate(zip(r.output_ids, o.output_ids)) if x != y), None)
                if i is not None:
                    ok, gap, spread = first_divergence_is_near_tie(none.runner, p, r.output_ids, o.output_ids)
                    divs.append({"prompt": row["id"], "position": i, "gap": gap, "spread": spread, "wrong": not ok})
            wrong = sum(d["wrong"] for d in divs)
            result["runs"].append({"config": name, "run": run, "wrong": wrong, "chunks_joined": joined,
                                   "divergences": divs})
            print(f"{name:15s} run {run}: {wrong} wrong of {len(rows)}, {joined} chunks joined; "
                  + " ".join(f"{d['prompt']}@{d['position']}:{d['gap']:.2f}{'!' if d['wrong'] else ''}" for d in divs),
                  flush=True)
    Path(ns.out).write_text(json.dumps(result, indent=1))
    print(f"\n{'config':15s} runs with a wrong token   wrong outputs per run")
    for name in ns.configs:
        per = [r["wrong"] for r in result["runs"] if r["config"] == name]
        print(f"{name:15s} {sum(w > 0 for w in per)} of {len(per):<20d} {' / '.join(map(str, per))}")
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
