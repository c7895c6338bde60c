#!/usr/bin/env python3
"""Host work of one engine decode step: scheduler + worker with the model forward taken out.

On the GPU with CUDA graphs a decode forward is ~1.3 ms, so the Python around it (building the
batch, sampling bookkeeping, the speculative worker's per-request state) decides the step time.
This measures that part on any machine: each forward returns a stored output of the right shape
(computed once), and sampling returns fixed tokens, so what is timed is host work only.

    python scripts/bench_host_step.py [--batch-sizes 1 8 64] [--configs ENTMTP-device] [--quantile 20]
                                      [--steps 400] [--out host_step.json]

NONE, ENTMTP with the root-only Medusa GPU library (plain decode steps through the speculative
worker) and ENTMTP-device (the MTP batch-8 GPU library through the device step of
spec/device_step.py, with its graph bodies and the attention plan taken out and stand-in graph
entries, so steps launch behind unread ones as on a GPU: what is left is the host work around
the graphs) in one run, interleaved; median ms per decode step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import srt_entmtp.worker as worker_mod
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions
from srt_entmtp.spec.library import TreeLibrary
from tests.device_step_helpers import install_graph_stand_ins

LIBS = Path(__file__).resolve().parents[1] / "srt_entmtp" / "spec" / "libraries"
LIB = LIBS / "medusa_gpu.json"
DEVICE_LIB = LIBS / "mtp_gpu_b8.json"
# drafted tokens the stubbed device step accepts per request and step (at most the trees' depth)
ACCEPT = min(2, max(t.depth for t in TreeLibrary.load(DEVICE_LIB).all_trees()))


CONFIGS = ("NONE", "ENTMTP", "ENTMTP-device")


def stub_device_step(eng) -> None:
    """The device step without its graphs: drafting does nothing, verifying writes a fixed
    result, the plan does nothing."""
    step = eng.worker.device_step

    def verify(sh, B, attn):
        sh.result[:B, 0] = ACCEPT
        sh.result[:B, 1:] = 500
        sh.entropy[:B] = 1.0
    step._draft_body = lambda sh, B: None
    step._verify_body = verify
    eng.runner.attn.plan = lambda fb: None


def host_step_ms(config: str, B: int, steps: int, library: str, quantile: float = 50) -> float:
    algorithm = "NONE" if config == "NONE" else "ENTMTP"
    device = config == "ENTMTP-device"
    kw = {} if algorithm == "NONE" else {"tree_library": str(DEVICE_LIB) if device else library}
    if device:
        kw |= {"spec_step": "device", "lookup_tokens": 0}
    eng = Engine(EngineArgs(device="cpu", speculative_algorithm=algorithm, drafter="mtp" if device else "medusa",
                            max_running_requests=B, kv_slots=B * (64 + 16 * (steps + 8)) + 1024,
                            context_length=2048, **kw))
    per_step = ACCEPT + 1 if device else 1
    reqs = [eng.make_request(list(range(100, 164)), SamplingParams(max_new_tokens=per_step * (steps + 8),
                                                                   ignore_eos=True),
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
    if device:
        stub_device_step(eng)
        # stand-in graph entries (the tests' helper): replays run the stubbed bodies, the attention is
        # the Triton tree attention's host object, so steps launch behind unread ones as on a GPU
        install_graph_stand_ins(eng, context=2048)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        eng.scheduler.step()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.percentile(times[3:], quantile))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tree-library", default=str(LIB))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--quantile", type=float, default=50,
                    help="each run's statistic over its steps, a percentile (50: the median; a low one, such as "
                         "20, is steadier on a shared CPU)")
    ap.add_argument("--out", default="host_step.json")
    ns = ap.parse_args()
    # sampling on the host would time a CPU argmax over the vocabulary, which a GPU does on device
    worker_mod.sample = lambda logits, params, gens: torch.full((logits.shape[0],), 500, dtype=torch.long)
    rows = []
    for B in ns.batch_sizes:
        runs = {c: [] for c in ns.configs}
        for _ in range(ns.repeats):
            for alg, times in runs.items():
                times.append(host_step_ms(alg, B, ns.steps, ns.tree_library, ns.quantile))
        rows.append({"batch": B, **{f"{a}_ms": statistics.median(v) for a, v in runs.items()}, "runs": runs})
    Path(ns.out).write_text(json.dumps({"machine": "cpu host", "library": ns.tree_library, "quantile": ns.quantile,
                                        "steps": ns.steps, "rows": rows}, indent=1))
    print(f"host ms per decode step (forward and sampling taken out): percentile {ns.quantile:g} of each run's "
          f"steps, median of {ns.repeats} runs")
    print(f"{'batch':>5s}" + "".join(f" {c:>14s}" for c in ns.configs))
    for r in rows:
        print(f"{r['batch']:5d}" + "".join(f" {r[c + '_ms']:14.3f}" for c in ns.configs))
    print(f"wrote {ns.out}")


if __name__ == "__main__":
    main()
