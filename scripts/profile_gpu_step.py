#!/usr/bin/env python3
"""Where one engine decode step spends its wall time, NONE against ENTMTP, at batch 1 and 8.

Each part of the step (tree choice, drafting, batch building, the verify forward, acceptance,
KV compaction, entropy update) is wrapped with a device sync before and after, so the parts add
up to the step; the rest is scheduler and bookkeeping. The device step (--spec-steps device)
overlaps host work with its graph, so its parts are timed on the host without syncs: "wait for
the GPU" is the time the host had nothing left to do, and the parts marked overlapped ran while
the graph did. Also reports the profiler's kernel count
and GPU-busy time for one step. Run on a CUDA machine:

    python scripts/profile_gpu_step.py [--drafter medusa] [--batch-sizes 1 8] [--out step.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.bench_prompts import benchmark_prompts
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions

FAMILIES = ("code", "math", "chat", "writing")


class PartTimer:
    def __init__(self):
        self.total = defaultdict(float)
        self.on = False

    def wrap(self, obj, attr, label, sync=True):
        """Time obj.attr under `label`; sync=False times host work only (the device step overlaps
        host work with the GPU, which a sync would serialise)."""
        fn = getattr(obj, attr)

        def timed(*a, **kw):
            if not self.on:
                return fn(*a, **kw)
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if sync:
                torch.cuda.synchronize()
            self.total[label] += time.perf_counter() - t0
            return out
        setattr(obj, attr, timed)


def profile_engine(algorithm, drafter, B, n_tokens, prompts, library=None, spec_step="auto"):
    kw = {"tree_library": library} if library and algorithm != "NONE" else {}
    eng = Engine(EngineArgs(device="cuda", speculative_algorithm=algorithm, drafter=drafter, max_running_requests=B,
                            context_length=2048, kv_slots=65536, lookup_tokens=0, spec_step=spec_step, **kw))
    pt = PartTimer()
    w = eng.worker
    pt.wrap(eng.runner, "forward", "forward (target model)")
    step = getattr(w, "device_step", None)
    if step is not None and step.shapes:  # greedy steps run as one graph per shape (spec/device_step.py)
        # host time only, no syncs: choosing trees and folding entropies overlap the step's graph
        pt.wrap(w, "_trees", "policy: choose trees (overlapped)", sync=False)
        pt.wrap(w.tracker, "update", "entropy update (overlapped)", sync=False)
        pt.wrap(step.kv, "alloc", "KV alloc", sync=False)
        pt.wrap(step.kv, "free", "KV free", sync=False)
        pt.wrap(step, "_fill_draft", "device step: inputs copy (draft)", sync=False)
        pt.wrap(step, "_fill_verify", "device step: inputs copy (verify)", sync=False)
        for attn, gd, gv in step.graphs.values():
            pt.wrap(attn, "plan_fixed_trees", "device step: attention plan", sync=False)
            pt.wrap(gd, "replay", "device step: draft graph launch", sync=False)
            pt.wrap(gv, "replay", "device step: verify graph launch", sync=False)
        pt.wrap(step, "collect", "device step: wait for the GPU, read result", sync=False)
    elif algorithm != "NONE":
        import srt_entmtp.spec.worker as sw

        pt.wrap(w, "_trees", "policy: choose trees")
        pt.wrap(w.drafter, "propose", "drafter.propose")
        pt.wrap(w, "_verify", "verify (accept)")
        pt.wrap(w.kv, "copy_slots", "KV compaction")
        pt.wrap(w.tracker, "update", "entropy update")
        pt.wrap(sw.RaggedTreeBatch, "build", "RaggedTreeBatch.build")
        pt.wrap(sw.ForwardBatch, "build", "ForwardBatch.build")
    specs = [SpecOptions(task=f) for f, _ in prompts[:B]]
    sp = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    eng.generate([p for _, p in prompts[:B]], sp, specs)  # warm-up
    reqs = [eng.make_request(p, SamplingParams(max_new_tokens=n_tokens, ignore_eos=True), s)
            for (_, p), s in zip(prompts[:B], specs)]
    for r in reqs:
        eng.scheduler.add(r, bounded=False)
    steps, times = 0, []
    # no sync between steps: the device step launches the next step before returning (it is
    # pipelined one step deep), so a step's wall time is the time between step() returns
    while not all(r.status.name == "DECODE" for r in reqs):
        eng.scheduler.step()
    torch.cuda.synchronize()
    pt.on = True
    last = time.perf_counter()
    while not all(r.finished for r in reqs):
        eng.scheduler.step()
        now = time.perf_counter()
        times.append(now - last)
        last = now
        steps += 1
    torch.cuda.synchronize()
    pt.on = False
    tokens = sum(len(r.output_ids) for r in reqs)
    # kernels and GPU-busy time of one more step
    from torch.profiler import ProfilerActivity, profile
    more = [eng.make_request(p, SamplingParams(max_new_tokens=4, ignore_eos=True), s)
            for (_, p), s in zip(prompts[:B], specs)]
    for r in more:
        eng.scheduler.add(r, bounded=False)
    while not all(r.status.name == "DECODE" for r in more):
        eng.scheduler.step()
    eng.scheduler.step()  # collects a step left in flight by the last batch, and starts this one's
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        eng.scheduler.step()
        torch.cuda.synchronize()
    ev = prof.key_averages()
    busy = sum(e.self_device_time_total for e in ev) / 1e6
    kernels = sum(e.count for e in ev if e.self_device_time_total > 0)
    top = sorted((e for e in ev if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)[:15]
    top_kernels = [{"name": e.key[:90], "calls": e.count, "us": e.self_device_time_total} for e in top]
    while not all(r.finished for r in more):
        eng.scheduler.step()
    total = sum(times)
    row = {"algorithm": algorithm, "drafter": drafter if algorithm != "NONE" else None, "batch": B, "steps": steps,
           "step_ms": 1e3 * statistics.median(times), "mean_step_ms": 1e3 * total / steps,
           "tokens_per_step": tokens / steps, "tokens_per_s": tokens / total,
           "parts_ms_per_step": {k: 1e3 * v / steps for k, v in pt.total.items()},
           "profiled_step_gpu_busy_ms": busy * 1e3, "profiled_step_kernels": kernels, "top_kernels": top_kernels,
           "graph_replays": (eng.runner.graphs.replays if eng.runner.graphs else 0) + (step.replays if step else 0),
           "library": library, "spec_step": spec_step}
    row["parts_ms_per_step"]["other (scheduler, bookkeeping)"] = row["mean_step_ms"] - sum(
        row["parts_ms_per_step"].values())
    del eng
    torch.cuda.empty_cache()
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--drafter", default="medusa")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--prompts-dir", default=None)
    ap.add_argument("--library", default=None, help="tree library for ENTMTP (default: the shipped GPU library)")
    ap.add_argument("--spec-steps", nargs="+", default=["auto"], choices=["auto", "device", "host"])
    ap.add_argument("--out", default="profile_gpu_step.json")
    ns = ap.parse_args()
    import gc

    probe = Engine(EngineArgs(device="cuda", speculative_algorithm="NONE", kv_slots=4096, cuda_graph=False))
    prompts = [(f, probe.tokenize_chat([{"role": "user", "content": p["prompt"]}]))
               for i in range(max(ns.batch_sizes)) for f in FAMILIES
               for p in benchmark_prompts(f, i + 1, prompts_dir=ns.prompts_dir)[i:i + 1]]
    del probe
    gc.collect()
    rows = []
    for B in ns.batch_sizes:
        rows.append(profile_engine("NONE", ns.drafter, B, ns.max_new_tokens, prompts))
        for st in ns.spec_steps:
            rows.append(profile_engine("ENTMTP", ns.drafter, B, ns.max_new_tokens, prompts, ns.library, st))
            gc.collect()
    Path(ns.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    for r in rows:
        print(f"\n{r['algorithm']} {r['drafter'] or ''} {r['spec_step'] if r['drafter'] else ''} batch {r['batch']}: step {r['step_ms']:.2f} ms median, "
              f"{r['tokens_per_step']:.2f} tokens/step, {r['tokens_per_s']:.0f} tok/s, GPU busy "
              f"{r['profiled_step_gpu_busy_ms']:.2f} ms, {r['profiled_step_kernels']} kernels, "
              f"{r['graph_replays']} graph replays")
        for k, v in sorted(r["parts_ms_per_step"].items(), key=lambda kv: -kv[1]):
            print(f"   {k:34s} {v:7.3f} ms")
        print("   GPU time by kernel (one step):")
        for k in r["top_kernels"][:10]:
            print(f"     {k['us']:7.1f} us {k['calls']:4d}x  {k['name'][:70]}")


if __name__ == "__main__":
    main()
