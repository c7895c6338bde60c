#!/usr/bin/env python3
"""Where an offline run's wall time goes, NONE against ENTMTP: bench_gpu.py (c)'s run, step by step.

Each scheduler step of the run is timed from the end of the step before (no syncs: pipelined
steps overlap the host's work with the GPU, and a sync would undo that) and put in one class:

  prefill          a prompt chunk forward (admissions)
  decode, changed  the first decode step of a batch that changed (an admission or a finish):
                   the step launched ahead was for the old batch, so the pipeline restarts
                   (the new batch goes up once the step before is read, Worker.relaunch_changed,
                   or before it is read where the spec worker can, _launch_changed_after)
  decode, full     an unchanged batch of C requests (the steady state a cost grid measures)
  decode, partial  an unchanged batch of fewer than C (the last requests' tail)

The table gives each class's steps, share of the wall time, ms a step and tokens a step, and the
run's rate if every token had come at the full-batch steady rate. Each serial prompt chunk
(Worker.prefill, which waits for its first tokens) is split further with CUDA events: the steps
queued before it, the GPU idle while the host builds it, its forward's GPU time, and the sampling
after it (`serial_chunks`, medians). Requests as in (c): prompts of the four task families
interleaved, `max(C * waves, min_prompts)` of them, EOS ignored.
Run on a CUDA machine (on CPU it runs too, small, as the CPU test does):

    python scripts/profile_gpu_run.py --concurrency 8 64 --waves 1 2 [--out run.json]
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
from srt_entmtp.bench_prompts import BENCH_FAMILIES as FAMILIES
from srt_entmtp.bench_prompts import cycled, interleaved_chat_prompts
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions

CLASSES = ("prefill", "decode, changed", "decode, full", "decode, partial")


def timed_run(eng: Engine, prompts, n_tokens: int, concurrency: int) -> dict:
    """One offline run of `prompts`; each step's wall time, class, batch and tokens."""
    sched = eng.scheduler
    trace, prev = [], {"batch": None, "t": 0.0, "prefills": 0}

    def listener(outs, _dt):
        now = time.perf_counter()
        prefills = sched.stats["prefill_steps"]
        batch = frozenset(o.req.rid for o in outs)
        if prefills != prev["prefills"]:
            kind = "prefill"
            prev["batch"] = None  # the decode after a prefill starts a new batch
        elif batch != prev["batch"]:
            kind = "decode, changed"
        else:
            kind = "decode, full" if len(batch) >= concurrency else "decode, partial"
        if kind != "prefill":
            prev["batch"] = batch
        trace.append((kind, len(batch), now - prev["t"], sum(len(o.new_ids) for o in outs)))
        prev["t"], prev["prefills"] = now, prefills

    # host time of launching chunks that join ahead: short unless something in it waits for the GPU
    joined, w = [], eng.worker

    def timed_launch(*a, **k):
        t = time.perf_counter()
        try:
            return launch(*a, **k)
        finally:
            if k.get("join"):
                joined.append(time.perf_counter() - t)

    # a serial prompt chunk (Worker.prefill, which reads its first tokens) split in time: CUDA events
    # at its start, around its forward and at its end, so the GPU time of the chunk's forward, the
    # GPU idle before it (the host building the chunk after the steps queued before it ran out) and
    # the work queued before it (the rest of its wall time) can be told apart
    cuda = eng.runner.device.type == "cuda"
    chunks, cur = [], {}

    def mark():
        if not cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def timed_prefill(reqs, lens):
        cur.clear()
        cur.update(t0=time.perf_counter(), e0=mark(), tokens=sum(lens), requests=len(reqs))
        try:
            return prefill(reqs, lens)
        finally:
            cur.update(e3=mark(), t3=time.perf_counter())
            chunks.append(dict(cur))
            cur.clear()

    def timed_forward(fb, *a, **k):
        if "e0" not in cur or "e1" in cur:  # not a chunk's forward, or its second one
            return forward(fb, *a, **k)
        cur["e1"] = mark()
        try:
            return forward(fb, *a, **k)
        finally:
            cur["e2"] = mark()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    prev["prefills"] = sched.stats["prefill_steps"]
    eng.step_listeners.append(listener)
    launch, w.launch_prefill = w.launch_prefill, timed_launch
    prefill, w.prefill = w.prefill, timed_prefill
    forward, w.runner.forward = w.runner.forward, timed_forward
    try:
        t0 = prev["t"] = time.perf_counter()
        reqs = eng.generate([p for _, p in prompts], SamplingParams(max_new_tokens=n_tokens, ignore_eos=True),
                            [SpecOptions(task=f) for f, _ in prompts])
        sync()
        wall = time.perf_counter() - t0
    finally:
        eng.step_listeners.remove(listener)
        del w.launch_prefill, w.prefill, w.runner.forward  # the bound methods again
    out = summarize(trace, wall, sum(len(r.output_ids) for r in reqs))
    out["joined_chunks"] = len(joined)
    out["join_launch_ms"] = 1e3 * sum(joined) / len(joined) if joined else None
    out["serial_chunks"] = summarize_chunks(chunks, cuda)
    return out


def summarize_chunks(chunks: list[dict], cuda: bool) -> dict | None:
    """Medians over the serial prompt chunks of a run: wall ms (host, from the call to its first
    tokens read), forward_ms (the chunk's forward: GPU time on CUDA, host time elsewhere),
    idle_before_ms (GPU time from the call to the forward's start: the GPU idle while the host
    built the chunk, where nothing was queued before it), after_ms (from the forward's end to the
    first tokens: sampling and entropy), queued_ms (wall minus all of that: the steps queued before
    the chunk, and host time the events do not see), tokens and requests."""
    rows = [c for c in chunks if "e2" in c]
    if not rows:
        return None

    def ms(a, b):
        return a.elapsed_time(b) if cuda else 1e3 * (b - a)

    per = [{"wall_ms": 1e3 * (c["t3"] - c["t0"]), "forward_ms": ms(c["e1"], c["e2"]),
            "idle_before_ms": ms(c["e0"], c["e1"]), "after_ms": ms(c["e2"], c["e3"]),
            "tokens": c["tokens"], "requests": c["requests"]} for c in rows]
    for p in per:
        p["queued_ms"] = p["wall_ms"] - p["idle_before_ms"] - p["forward_ms"] - p["after_ms"]
    return {"count": len(per), **{k: statistics.median(p[k] for p in per) for k in per[0]}}


def summarize(trace, wall: float, tokens: int) -> dict:
    classes = {}
    for c in CLASSES:
        rows = [t for t in trace if t[0] == c]
        s = sum(t[2] for t in rows)
        toks = sum(t[3] for t in rows)
        classes[c] = {"steps": len(rows), "seconds": s, "share": s / wall, "ms_per_step": 1e3 * s / max(len(rows), 1),
                      "tokens": toks, "tokens_per_step": toks / max(len(rows), 1),
                      "mean_batch": sum(t[1] for t in rows) / max(len(rows), 1)}
    full = classes["decode, full"]
    steady = full["tokens"] / full["seconds"] if full["seconds"] else None
    return {"seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "classes": classes,
            "steady_full_tokens_per_s": steady, "trace": [list(t) for t in trace]}


def build_prompts(eng: Engine, n: int, prompts_dir: str | None):
    """bench_gpu.py part c's requests for one concurrency: n prompts, families interleaved."""
    return cycled(interleaved_chat_prompts(eng.tokenize_chat, n // len(FAMILIES) + 1, prompts_dir, FAMILIES), n)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--waves", type=int, nargs="+", default=[1],
                    help="requests per run = max(C x waves, --min-prompts); one entry per concurrency, or one for all")
    ap.add_argument("--min-prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="runs per engine, round-robin; the median's breakdown is kept")
    ap.add_argument("--drafter", default="mtp")
    ap.add_argument("--library-dir", default=None, help="<drafter>_gpu_b<C>.json per concurrency (default: shipped)")
    ap.add_argument("--prompts-dir", default=None)
    ap.add_argument("--kv-slots", type=int, default=131072)
    ap.add_argument("--join-ahead-ab", action="store_true",
                    help="also ENTMTP with join ahead on (EngineArgs.join_ahead; experimental, off by default)")
    ap.add_argument("--out", default="profile_gpu_run.json")
    ns = ap.parse_args()
    waves = ns.waves * len(ns.concurrency) if len(ns.waves) == 1 else ns.waves
    if len(waves) != len(ns.concurrency):
        ap.error("--waves: one value, or one per --concurrency")
    rows = []
    for C, w in zip(ns.concurrency, waves):
        common = {"device": ns.device, "max_running_requests": C, "context_length": 2048, "kv_slots": ns.kv_slots}
        engines = {"NONE": Engine(EngineArgs(speculative_algorithm="NONE", **common))}
        lib = str(Path(ns.library_dir) / f"{ns.drafter}_gpu_b{C}.json") if ns.library_dir else None
        for name in ("ENTMTP",) + (("ENTMTP-join-ahead",) if ns.join_ahead_ab else ()):
            engines[name] = Engine(EngineArgs(speculative_algorithm="ENTMTP", drafter=ns.drafter, lookup_tokens=0,
                                              join_ahead=name == "ENTMTP-join-ahead", **({"tree_library": lib} if lib else {}),
                                              **common))
        prompts = build_prompts(engines["NONE"], max(C * w, ns.min_prompts), ns.prompts_dir)
        for eng in engines.values():  # warm-up: kernels compiled, caches allocated
            timed_run(eng, prompts[:1], 8, C)
        runs = {k: [] for k in engines}
        for _ in range(ns.repeats):
            for k, eng in engines.items():
                runs[k].append(timed_run(eng, prompts, ns.max_new_tokens, C))
        for k, res in runs.items():
            res.sort(key=lambda r: r["tokens_per_s"])
            med = res[len(res) // 2]
            rows.append({"concurrency": C, "waves": w, "requests": len(prompts), "config": k, "library": lib,
                         "tokens_per_s_runs": [r["tokens_per_s"] for r in res], **med})
        del engines
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    dev = torch.cuda.get_device_name() if ns.device == "cuda" else "cpu"
    Path(ns.out).write_text(json.dumps({"device": dev, "args": vars(ns), "rows": rows}))
    print(f"device: {dev}")
    for r in rows:
        print(f"\nC={r['concurrency']} {r['config']}, {r['requests']} requests: {r['tokens_per_s']:,.0f} tok/s "
              f"(runs {min(r['tokens_per_s_runs']):,.0f}-{max(r['tokens_per_s_runs']):,.0f}); at the full-batch "
              f"steady rate {r['steady_full_tokens_per_s'] or 0:,.0f}"
              + (f"; {r['joined_chunks']} chunks joined ahead, {r['join_launch_ms']:.3f} ms host each"
                 if r.get("joined_chunks") else ""))
        print(f"  {'class':18s} {'steps':>6s} {'share':>6s} {'ms/step':>8s} {'tok/step':>9s} {'batch':>6s}")
        for c, v in r["classes"].items():
            print(f"  {c:18s} {v['steps']:6d} {v['share']:6.1%} {v['ms_per_step']:8.3f} {v['tokens_per_step']:9.2f} "
                  f"{v['mean_batch']:6.1f}")
        sc = r.get("serial_chunks")
        if sc:
            print(f"  serial prompt chunks ({sc['count']}, medians): {sc['wall_ms']:.3f} ms wall; "
                  f"{sc['queued_ms']:.3f} queued before it + {sc['idle_before_ms']:.3f} GPU idle before its forward "
                  f"+ {sc['forward_ms']:.3f} forward + {sc['after_ms']:.3f} to its first tokens "
                  f"({sc['tokens']:.0f} tokens, {sc['requests']:.0f} requests)")
    print(f"\nwrote {ns.out}")


if __name__ == "__main__":
    main()
