#!/usr/bin/env python3
"""Where a prompt prefill spends its time, eager (no CUDA graph) against a replayed prefill
graph: prefills of the benchmark's prompts at batch 1 and 8, and one decode token (eager), on
the engine's own runner, each batch built on the host as Worker.prefill builds it.

For each case: wall time with a sync, the host time until forward() returns (no sync), the GPU
time between CUDA events, the kernel count, and the profiler's top host ops by self CPU time.
When the host time is close to the wall time and far above the GPU time, the forward is bound
by launches, not by the GPU. Run on a CUDA machine:

    python scripts/profile_gpu_prefill.py [--out prefill.json]
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
from srt_entmtp.bench_prompts import benchmark_prompts
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.model.forward_batch import ForwardBatch

FAMILIES = ("code", "math", "chat", "writing")


def time_case(runner, seqs, reps, graph=False):
    """seqs: token lists prefilled together (or one token each on a prefix, for decode).
    graph: replay the prefill graph (the case must fit one), else run eagerly."""
    graphs = runner.graphs
    if not graph:
        runner.graphs = None
    cuda = runner.device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def build():
        slots = [runner.kv.alloc(len(s)) for s in seqs]
        ends = torch.tensor([len(s) for s in seqs]).cumsum(0) - 1
        fb = ForwardBatch.build([torch.tensor(s) for s in seqs], [torch.empty(0, dtype=torch.long)] * len(seqs),
                                slots, logits_indices=ends)
        return fb, slots

    try:
        walls, hosts, gpus = [], [], []
        replays0 = graphs.prefill_replays if graphs is not None else 0
        for i in range(reps + 2):
            fb, slots = build()
            sync()
            e0, e1 = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
            t0 = time.perf_counter()
            if cuda:
                e0.record()
            runner.forward(fb)
            t1 = time.perf_counter()
            if cuda:
                e1.record()
            sync()
            t2 = time.perf_counter()
            for s in slots:
                runner.kv.free(s)
            if i >= 2:  # two warm-ups: Triton and FlashInfer compile on first use
                walls.append(t2 - t0)
                hosts.append(t1 - t0)
                gpus.append(e0.elapsed_time(e1) / 1e3 if cuda else float("nan"))
        from torch.profiler import ProfilerActivity, profile
        fb, slots = build()
        sync()
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            runner.forward(fb)
            sync()
        for s in slots:
            runner.kv.free(s)
        import cProfile
        import io
        import pstats
        fb, slots = build()
        sync()
        cp = cProfile.Profile()
        cp.enable()
        runner.forward(fb)
        cp.disable()
        sync()
        for s in slots:
            runner.kv.free(s)
        buf = io.StringIO()
        pstats.Stats(cp, stream=buf).sort_stats("tottime").print_stats(20)
        replayed = (graphs.prefill_replays if graphs is not None else 0) - replays0
        if graph and replayed == 0:
            raise RuntimeError("no prefill graph replayed: the case does not fit a captured shape")
    finally:
        runner.graphs = graphs
    ev = prof.key_averages()
    kernels = sum(e.count for e in ev if e.self_device_time_total > 0)
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:25]
    return {"tokens": sum(len(s) for s in seqs), "requests": len(seqs), "graph": graph, "graph_replays": replayed,
            "wall_ms": 1e3 * statistics.median(walls), "host_ms": 1e3 * statistics.median(hosts),
            "gpu_ms": 1e3 * statistics.median(gpus), "kernels": kernels,
            "top_host_ops": [{"name": e.key[:90], "calls": e.count, "self_cpu_us": e.self_cpu_time_total,
                              "device_us": e.self_device_time_total} for e in top],
            "python_profile": buf.getvalue()}


def chunk(seqs, budget):
    """The scheduler's first prefill chunk of these prompts: up to `budget` tokens, in order."""
    out = []
    for s in seqs:
        if budget <= 0:
            break
        out.append(s[:budget])
        budget -= len(out[-1])
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts-dir", default=None)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default="profile_gpu_prefill.json")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only checks that the script runs")
    ns = ap.parse_args()
    eng = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", max_running_requests=8,
                            context_length=2048, kv_slots=65536))
    prompts = [eng.tokenize_chat([{"role": "user", "content": p["prompt"]}])
               for i in range(2) for f in FAMILIES for p in benchmark_prompts(f, i + 1, prompts_dir=ns.prompts_dir)[i:i + 1]]
    cases = {"decode token (1 request, eager)": [prompts[0][:1]],
             "prefill 1 request": [prompts[0]],
             "prefill 8 requests, one 512-token chunk": chunk(prompts[:8], 512)}
    rows = {k: time_case(eng.runner, v, ns.reps) for k, v in cases.items()}
    if eng.runner.graphs is not None:
        for k in ("prefill 1 request", "prefill 8 requests, one 512-token chunk"):
            rows[k + ", graph"] = time_case(eng.runner, cases[k], ns.reps, graph=True)
    Path(ns.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name() if ns.device == "cuda" else "cpu", "cases": rows}, indent=1))
    for k, r in rows.items():
        print(f"\n{k}: {r['tokens']} tokens, wall {r['wall_ms']:.2f} ms, host until return {r['host_ms']:.2f} ms, "
              f"GPU {r['gpu_ms']:.2f} ms, {r['kernels']} kernels")
        for o in r["top_host_ops"][:15]:
            print(f"   {o['self_cpu_us']:8.0f} us host {o['calls']:4d}x  {o['name'][:70]}")
        print("\n".join(r["python_profile"].splitlines()[:40]))


if __name__ == "__main__":
    main()
