#!/usr/bin/env python3
"""Host work of one engine decode step: scheduler + worker with the model forward taken out.

On the GPU with CUDA graphs a decode forward is ~1.3 ms, so the Python around it (building the
batch, sampling bookkeeping, the speculative worker's per-request state) decides the step time.
This measures that part on any machine: each forward returns a stored output of the right shape
(computed once), and sampling returns fixed tokens, so what is timed is host work only.

    python scripts/bench_host_step.py [--batch-sizes 1 8 64] [--out host_step.json]

NONE and ENTMTP (with the root-only GPU library by default, the path a GPU takes today) in one
run, interleaved; median ms per decode step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import srt_entmtp.worker as worker_mod
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions

LIB = Path(__file__).resolve().parents[1] / "srt_entmtp" / "spec" / "libraries" / "medusa_gpu.json"


def host_step_ms(algorithm: str, B: int, steps: int, library: str) -> float:
    kw = {"tree_library": library} if algorithm != "NONE" else {}
    eng = Engine(EngineArgs(device="cpu", speculative_algorithm=algorithm, drafter="medusa", max_running_requests=B,
                            kv_slots=B * (64 + steps + 16) + 1024, context_length=2048, **kw))
    reqs = [eng.make_request(list(range(100, 164)), SamplingParams(max_new_tokens=steps + 8, ignore_eos=True),
                             SpecOptions(task="code")) for _ in range(B)]
    for r in reqs:
        eng.scheduler.add(r, bounded=False)
    while not all(r.status.name == "DECODE" for r in reqs):
        eng.scheduler.step()
    real, stored = eng.runner.forward, {}

    def stored_forward(fb):
        if fb.num_tokens not in stored:
            stored[fb.num_tokens] = real(fb)
        return stored[fb.num_tokens]
    eng.runner.forward = stored_forward
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.scheduler.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times[3:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree-library", default=str(LIB))
    ap.add_argument("--out", default="host_step.json")
    ns = ap.parse_args()
    # sampling on the host would time a CPU argmax over the vocabulary, which a GPU does on device
    worker_mod.sample = lambda logits, params, gens: torch.full((logits.shape[0],), 500, dtype=torch.long)
    rows = []
    for B in ns.batch_sizes:
        runs = {"NONE": [], "ENTMTP": []}
        for _ in range(ns.repeats):
            for alg, times in runs.items():
                times.append(host_step_ms(alg, B, ns.steps, ns.tree_library))
        rows.append({"batch": B, **{f"{a}_ms": statistics.median(v) for a, v in runs.items()}, "runs": runs})
    Path(ns.out).write_text(json.dumps({"machine": "cpu host", "library": ns.tree_library, "rows": rows}, indent=1))
    print("host ms per decode step (forward and sampling taken out), median of", ns.repeats)
    print(f"{'batch':>5s} {'NONE':>8s} {'ENTMTP':>8s}")
    for r in rows:
        print(f"{r['batch']:5d} {r['NONE_ms']:8.3f} {r['ENTMTP_ms']:8.3f}")
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
