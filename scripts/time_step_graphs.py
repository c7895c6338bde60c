#!/usr/bin/env python3
"""GPU time of each captured graph of a decode step, replayed back to back: NONE's decode graph,
and ENTMTP's draft and verify graphs (spec/device_step.py) for the layouts the shipped library
uses at that batch. The host is out of the picture (CUDA events around 200 replays), so this is
the floor each step's wall time sits on. Run on a CUDA machine after a short generation has
planned every graph with real lengths:

    python scripts/time_step_graphs.py [--batch-sizes 1 8] [--kernels] [--out step_graphs.json]

--kernels adds each graph's kernels under the profiler (us and calls per replay, by name): the
profiler serialises what PDL overlaps, so their sum is above the graph's time, but it shows
which kernels grow with the tree.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.bench_prompts import benchmark_prompts
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions

FAMILIES = ("code", "math", "chat", "writing")


def gpu_ms(replays, n=200) -> float:
    """Mean GPU time of one call of every function in `replays`, in order, repeated n times."""
    for _ in range(10):
        for r in replays:
            r()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        for r in replays:
            r()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


def kernels(replay, n=20) -> list[dict]:
    """Kernels of one replay by name, under the profiler: calls and us per replay, largest first."""
    from torch.profiler import ProfilerActivity, profile
    replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            replay()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if e.self_device_time_total > 0]
    ev.sort(key=lambda e: -e.self_device_time_total)
    return [{"name": e.key[:80], "calls": e.count / n, "us": e.self_device_time_total / n} for e in ev]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompts-dir", default=None)
    ap.add_argument("--kernels", action="store_true", help="also each graph's kernels under the profiler")
    ap.add_argument("--out", default="step_graphs.json")
    ns = ap.parse_args()
    rows = []
    for B in ns.batch_sizes:
        for algo in ("NONE", "ENTMTP"):
            eng = Engine(EngineArgs(device="cuda", speculative_algorithm=algo, drafter="mtp", max_running_requests=B,
                                    context_length=2048, kv_slots=65536))
            prompts = [(f, eng.tokenize_chat([{"role": "user", "content": p["prompt"]}]))
                       for i in range(B) for f in FAMILIES[i % 4:i % 4 + 1]
                       for p in benchmark_prompts(f, i // 4 + 1, prompts_dir=ns.prompts_dir)[i // 4:i // 4 + 1]]
            reqs = eng.generate([p for _, p in prompts], SamplingParams(max_new_tokens=64, ignore_eos=True),
                                [SpecOptions(task=f) for f, _ in prompts])
            steps = sum(r.verify_ct for r in reqs)
            tokens_per_step = sum(r.accepted_tokens + r.verify_ct for r in reqs) / steps if steps else 1.0
            g = eng.runner.graphs
            dec = g.graphs[min(k for k in g.graphs if not k[2] and k[0] >= B)].graph
            row = {"batch": B, "algorithm": algo, "decode_graph_ms": gpu_ms([dec.replay])}
            if ns.kernels and algo == "NONE":
                row["decode_kernels"] = kernels(dec.replay)
            step = getattr(eng.worker, "device_step", None)
            if step is not None:
                row["tokens_per_step"] = tokens_per_step
                row["layouts"] = {}
                for (li, b), (_, gd, gv) in step.graphs.items():
                    if b != step.bucket(B) or not step.shapes[li].layout.num_slots > 1:
                        continue
                    lay = str(step.layouts[li]) if li < len(step.layouts) else str(step.shapes[li].layout)
                    row["layouts"][f"{lay} (slots {step.shapes[li].layout.num_slots}, batch {b})"] = {
                        "draft_ms": gpu_ms([gd.replay]), "verify_ms": gpu_ms([gv.replay]),
                        "step_ms": gpu_ms([gd.replay, gv.replay])}
                    if ns.kernels:
                        row["layouts"][f"{lay} (slots {step.shapes[li].layout.num_slots}, batch {b})"].update(
                            draft_kernels=kernels(gd.replay), verify_kernels=kernels(gv.replay))
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "decode_kernels"}))
            del eng, g, dec, step
            gc.collect()
            torch.cuda.empty_cache()
    Path(ns.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print(f"\n{torch.cuda.get_device_name()}: GPU ms per replay")
    for r in rows:
        print(f"batch {r['batch']} {r['algorithm']:6s} decode graph {r['decode_graph_ms']:.3f}")
        for k, v in r.get("layouts", {}).items():
            print(f"   {k:40s} draft {v['draft_ms']:.3f}  verify {v['verify_ms']:.3f}  both {v['step_ms']:.3f}")
            for part in ("draft_kernels", "verify_kernels"):
                for kr in v.get(part, [])[:12]:
                    print(f"      {part[:6]} {kr['us']:8.1f} us  {kr['calls']:5.1f} calls  {kr['name']}")


if __name__ == "__main__":
    main()
