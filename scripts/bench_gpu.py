#!/usr/bin/env python3
"""GPU benchmark, one run end to end (issue 6):

  (a) forward latency vs new tokens per request and batch size (the cost curve calibration
      reads; `--cost-out` writes it in calibrate's format); T = 1 is a decode forward, T > 1 a
      tree-verify forward, each replaying its CUDA graph (captured first, unless --eager);
  (b) autoregressive decode step at batch 1, 8, 64: our engine (forward with the CUDA graph,
      forward eager, and the whole engine step) beside transformers' eager forward with its KV
      cache, and beside the memory-bandwidth floor measured in the same run (weight + KV bytes
      read per step over a measured device-to-device copy rate);
  (c) offline throughput at concurrency 1, 8, 64 over prompts of all four task families:
      tokens/s and accepted tokens per step for NONE, the best single STATIC tree and ENTMTP, per
      drafter. With --library-dir, the library for concurrency C is <dir>/<drafter>_gpu_b<C>.json
      (from `entmtp calibrate trees --batch-size C`), and STATIC uses that library's pooled best
      single tree (its report's general.static_best); else the shipped library.

    python scripts/bench_gpu.py --out bench_gpu.json [--parts a b c] [--library-dir DIR]

Prints a table last, writes JSON (with date and GPU name).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.bench_prompts import BENCH_FAMILIES as FAMILIES
from srt_entmtp.bench_prompts import cycled, interleaved_chat_prompts
from srt_entmtp.calibrate.cost import measure_step_latency
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions
from srt_entmtp.spec.drafters import fused_draft


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync(dev)
        t0 = time.perf_counter()
        fn()
        sync(dev)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


# ---- (a) -------------------------------------------------------------------------------------------

def part_a(eng, ns):
    rows = measure_step_latency(eng.runner, ns.tokens, ns.batch_sizes, context_len=ns.context, repeats=ns.repeats)
    return rows


# ---- (b) -------------------------------------------------------------------------------------------

def copy_rate(dev) -> float:
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    n = 512 * 2**20 if dev.type == "cuda" else 64 * 2**20
    a = torch.empty(n, dtype=torch.uint8, device=dev)
    b = torch.empty_like(a)
    t = timed(lambda: b.copy_(a), dev, repeats=10)
    return 2 * n / t


def graph_gpu_time(runner, fb, replays=200) -> float | None:
    """GPU seconds of one replay of the decode graph fb takes, from CUDA events around `replays`
    back-to-back replays (no host work between them): the kernels' time alone, the number a
    kernel A/B compares (host time and launch jitter vary more between engines than the kernels)."""
    graphs = runner.graphs
    if graphs is None or not torch.cuda.is_available():
        return None
    runner.forward(fb)  # plans the graph's attention and copies fb's inputs
    entry = graphs._pick(fb)
    if entry is None:
        return None
    for _ in range(10):
        entry.graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        entry.graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / replays


def ours_decode(eng, B, ctx, dev, gpu_time: dict | None = None):
    """(forward seconds, eager forward seconds, whole engine step seconds) for one decode token
    of B requests; the first replays the CUDA graph when the engine captured one. gpu_time: a
    dict that gets the graph's GPU seconds per replay (graph_gpu_time) under "graph_gpu_s"."""
    from srt_entmtp.model.forward_batch import ForwardBatch

    r = eng.runner
    slots = [r.kv.alloc(ctx + 1) for _ in range(B)]
    try:
        r.forward(ForwardBatch.build([torch.randint(100, 1000, (ctx,)) for _ in range(B)],
                                     [torch.empty(0, dtype=torch.long)] * B, [s[:ctx] for s in slots], device=dev,
                                     logits_indices=torch.tensor([0])))
        # built on the host, as the engine's decode steps are (the graph runner sends it up in two copies)
        fb = ForwardBatch.build([torch.randint(100, 1000, (1,)) for _ in range(B)], [s[:ctx] for s in slots],
                                [s[ctx:] for s in slots], device="cpu")
        fwd = timed(lambda: r.forward(fb), dev)
        if gpu_time is not None:
            gpu_time["graph_gpu_s"] = graph_gpu_time(r, fb)
        graphs, r.graphs = r.graphs, None
        fwd_eager = timed(lambda: r.forward(fb), dev)
        r.graphs = graphs
    finally:
        for s in slots:
            r.kv.free(s)
    return fwd, fwd_eager, engine_step_time(eng, B, ctx, dev)


def engine_step_time(eng, B, ctx, dev, launch_ahead=None):
    """The whole engine step (scheduler + ForwardBatch + forward + sampling + bookkeeping) of B
    requests at context ctx: the median time between step() returns (greedy plain steps are
    pipelined, so there is no sync between steps). launch_ahead=False: each plain step launched
    only after the one before is read (the A/B of Worker.launch_ahead)."""
    eng.worker.launch_ahead = launch_ahead
    try:
        reqs = [eng.make_request(torch.randint(100, 1000, (ctx,)).tolist(),
                                 SamplingParams(max_new_tokens=40, ignore_eos=True)) for _ in range(B)]
        for q in reqs:
            eng.scheduler.add(q, bounded=False)
        while not all(q.status.name == "DECODE" for q in reqs):
            eng.scheduler.step()
        sync(dev)
        times, last = [], time.perf_counter()
        while not all(q.finished for q in reqs):
            eng.scheduler.step()
            now = time.perf_counter()
            times.append(now - last)
            last = now
        sync(dev)
        return statistics.median(times[3:] or times)
    finally:
        eng.worker.launch_ahead = None


def hf_decode(model_dir, B, ctx, dev, dtype):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), torch_dtype=dtype).to(dev).eval()
    ids = torch.randint(100, 1000, (B, ctx), device=dev)
    with torch.inference_mode():
        out = m(ids, use_cache=True)
        past = out.past_key_values
        nxt = torch.randint(100, 1000, (B, 1), device=dev)

        def step():
            # one token on top of the same cache (the cache grows by one each call; negligible at ctx)
            m(nxt, past_key_values=past, use_cache=True)
        t = timed(step, dev, repeats=10)
    return t


def model_weight_bytes(runner) -> int:
    """Bytes of weights one forward reads: every checkpoint tensor once, in the runtime dtype."""
    from safetensors import safe_open

    n = 0
    for f in sorted(Path(runner.model_dir).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                n += math.prod(st.get_slice(k).get_shape())
    return n * torch.tensor([], dtype=runner.dtype).element_size()


def _switches():
    from srt_entmtp.model import pdl, small_linear
    from srt_entmtp.model.attention import tree_triton
    from srt_entmtp.spec import entropy, policy, verify_kernels

    return {"small_linear": (small_linear, "ENABLED"), "pdl": (pdl, "ENABLED"),
            "rope_in_qkv": (small_linear, "ROPE_IN_QKV"), "merge_last": (tree_triton, "MERGE_LAST"),
            "fused_accept": (verify_kernels, "ENABLED"), "fused_draft_inputs": (fused_draft, "FUSED_INPUTS"),
            "split_argmax": (verify_kernels, "SPLIT_ARGMAX"), "policy_small_batch": (policy, "SMALL_BATCH"),
            "entropy_small_batch": (entropy, "SMALL_BATCH")}


@contextlib.contextmanager
def switched(values: dict):
    """Kernel switches (name -> bool, names of _switches) set for the block, then restored."""
    sw = _switches()
    saved = {k: getattr(*sw[k]) for k in values}
    for k, v in values.items():
        setattr(*sw[k], v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(*sw[k], v)


def kernel_ab(ns, dev) -> list[dict]:
    """(b)'s graph forward and engine step with one kernel choice undone at a time: FlashInfer's
    decode wrapper as the decode graphs' attention; the unfused matmuls (cuBLAS + norm / SiLU
    kernels) in place of model/small_linear.py; kernels launched without PDL (model/pdl.py);
    RoPE and the KV store in a kernel of their own, not in the q/k/v kernel; the attention's key
    splits merged by the last split (tree_triton.MERGE_LAST), not by the merge kernel; and no PDL
    with RoPE in its own kernel (the previous round's kernels). Each variant is its own engine
    (graphs capture the path taken at capture); the switches stay set while it is measured
    (eager forwards read them)."""
    variants = [("flashinfer-decode-attention", {"tree_attention": "flashinfer"}, {}),
                ("unfused-matmuls", {}, {"small_linear": False}), ("no-pdl", {}, {"pdl": False}),
                ("rope-kernel", {}, {"rope_in_qkv": False}), ("merge-last", {}, {"merge_last": True}),
                ("no-pdl+rope-kernel", {}, {"pdl": False, "rope_in_qkv": False})]
    rows = []
    for name, kw, values in variants:
        with switched(values):
            eng = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", context_length=2048,
                                    max_running_requests=max(ns.batch_sizes), kv_slots=ns.kv_slots, **kw))
            for B in ns.batch_sizes:
                g = {}
                fwd, _, step = ours_decode(eng, B, ns.context, dev, g)
                rows.append({"variant": name, "batch": B, "forward_s": fwd, "engine_step_s": step, **g})
        del eng
        free_memory()
    return rows


def part_b(ns, dev):
    eng = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", max_running_requests=max(ns.batch_sizes),
                            context_length=2048, kv_slots=ns.kv_slots, cuda_graph=not ns.eager))
    cfg = eng.runner.config
    rate = copy_rate(dev)
    weight_bytes = model_weight_bytes(eng.runner)
    rows = []
    for B in ns.batch_sizes:
        g = {}
        fwd, fwd_eager, step = ours_decode(eng, B, ns.context, dev, g)
        kv_bytes = B * (ns.context + 1) * cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * eng.runner.kv.k.element_size()
        floor = (weight_bytes + kv_bytes) / (rate / 2)   # each byte read once; copy rate counts read + write
        hf = hf_decode(eng.runner.model_dir, B, ns.context, dev, eng.runner.dtype) if not ns.no_hf else None
        one_deep = engine_step_time(eng, B, ns.context, dev, launch_ahead=False)
        rows.append({"batch": B, "context": ns.context, "ours_forward_s": fwd, "ours_eager_forward_s": fwd_eager,
                     "ours_engine_step_s": step, "ours_engine_step_not_launched_ahead_s": one_deep,
                     "ours_graph_gpu_s": g.get("graph_gpu_s"),
                     "graphs": graph_info(eng),
                     "transformers_s": hf, "floor_s": floor, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
                     "copy_rate_Bps": rate})
    return rows


# ---- (c) -------------------------------------------------------------------------------------------

def library_for(ns, drafter, C, library_dir=None):
    """(library argument, STATIC's tree paths) for concurrency C: <drafter>_gpu_b<C>.json alone, or
    with --library-set every <drafter>_gpu_b<B>.json, comma-joined, as `entmtp serve` loads them
    (each step then takes the one for its running batch; STATIC's tree is from the largest B <= C)."""
    library_dir = library_dir or ns.library_dir
    if not library_dir:
        return None, None
    p = Path(library_dir) / f"{drafter}_gpu_b{C}.json"
    arg = str(p)
    if getattr(ns, "library_set", False):
        found = sorted((int(f.stem.rsplit("_b", 1)[1]), f) for f in Path(library_dir).glob(f"{drafter}_gpu_b*.json")
                       if f.stem.rsplit("_b", 1)[1].isdigit())  # not the .report.json files
        if not found:
            raise SystemExit(f"--library-set: no {drafter}_gpu_b<B>.json in {library_dir}")
        arg = ",".join(str(f) for _, f in found)
        below = [f for b, f in found if b <= C]
        p = below[-1] if below else found[0][1]
    rep = p.with_suffix(".report.json")
    static = None
    if rep.is_file():
        static = json.loads(rep.read_text())["families"]["general"]["static_best"]
    return arg, static


def graph_info(eng) -> dict | None:
    g = eng.runner.graphs
    if g is None:
        return None
    info = {"graphs": len(g.graphs), "prefill_graphs": len(g.prefill_graphs), "prefill_replays": g.prefill_replays,
            "capture_s": g.capture_seconds, "memory_bytes": g.memory_bytes}
    step = getattr(eng.worker, "device_step", None)
    if step is not None:  # the greedy speculative step's own graphs (spec/device_step.py)
        info["spec_step"] = {"layouts": [str(lay) for lay in step.layouts], "graphs": len(step.graphs),
                             "capture_s": step.capture_seconds, "memory_bytes": step.memory_bytes,
                             "steps": step.steps, "replays": step.replays,
                             "tree_attention": sorted(step.attention_kinds())}
    return info


def throughput(eng, prompts, n_tokens, specs=None):
    """Offline run of `prompts`; also the wall time spent in prefill forwards (each ends reading
    its first tokens back, so host time is their time) and how many there were. A prefill queued
    behind a pipelined step still in flight also waits for that step, which then counts here:
    prefill_s is an upper bound, and decode_tokens_per_s leaves that step's time out. Chunks whose
    requests join ahead (Scheduler.join_ahead, off by default) are not read on their own, so they are counted
    (prefills_joined) but not timed: their forward runs between decode steps with no host wait."""
    w = eng.worker
    joined0 = eng.scheduler.stats["prefills_joined"]
    pre = {"s": 0.0, "n": 0}

    def timed_prefill(*a, **k):
        t = time.perf_counter()
        try:
            return real_prefill(*a, **k)
        finally:
            pre["s"] += time.perf_counter() - t
            pre["n"] += 1

    real_prefill = w.prefill
    w.prefill = timed_prefill
    sync(eng.runner.device)
    t0 = time.perf_counter()
    try:
        reqs = eng.generate([p[1] for p in prompts], SamplingParams(max_new_tokens=n_tokens, ignore_eos=True), specs)
        sync(eng.runner.device)
    finally:
        del w.prefill  # the bound method again
    dt = time.perf_counter() - t0
    toks = sum(len(r.output_ids) for r in reqs)
    steps = sum(r.verify_ct for r in reqs)
    acc = sum(r.accepted_tokens + r.verify_ct for r in reqs) / steps if steps else 1.0
    return {"tokens": toks, "seconds": dt, "tokens_per_s": toks / dt, "accept_per_step": acc,
            "prefill_s": pre["s"], "prefill_forwards": pre["n"],
            "prefills_joined": eng.scheduler.stats["prefills_joined"] - joined0,
            "decode_tokens_per_s": (toks - len(reqs)) / max(dt - pre["s"], 1e-9),
            "outputs": [r.output_ids for r in reqs]}


def divergence_gaps(base, prompts, ref_outputs, outputs) -> list[dict]:
    """Where each output first differs from NONE's: the position, and NONE's top-2 logit gap
    there in bf16 steps (ulps at the top logit's magnitude). A greedy choice between two logits
    a few ulps apart can flip between kernels that sum in a different order (the verify forward
    is a prefill over the tree, NONE's a decode); a divergence at a wide gap would be a bug."""
    from srt_entmtp.model.forward_batch import ForwardBatch

    rows, r = [], base.runner
    for i, ((_, prompt), ref, out) in enumerate(zip(prompts, ref_outputs, outputs)):
        pos = next((j for j, (a, b) in enumerate(zip(ref, out)) if a != b), None)
        if pos is None:
            continue
        seq = list(prompt) + list(ref[:pos])
        slots = r.kv.alloc(len(seq))
        try:
            o = r.forward(ForwardBatch.build([torch.tensor(seq)], [torch.empty(0, dtype=torch.long)], [slots],
                                             logits_indices=torch.tensor([len(seq) - 1]), device=r.device))
        finally:
            r.kv.free(slots)
        top = o.logits[0].float().topk(2).values
        ulp = 2.0 ** (math.floor(math.log2(abs(float(top[0])) + 1e-30)) - 7)
        rows.append({"request": i, "position": pos, "gap": float(top[0] - top[1]),
                     "gap_ulps": float(top[0] - top[1]) / ulp})
    return rows


def part_c(ns, dev):
    """Per concurrency, every configuration's engine is built first and the repeats run
    round-robin (NONE, STATIC, ENTMTP, NONE, ...), so drift and order effects fall on all of them
    alike: with one engine after another, an engine built right after STATIC's measured up to 19%
    slower than a twin running the same code (docs/gpu.md)."""
    base = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", max_running_requests=max(ns.concurrency),
                             context_length=2048, kv_slots=ns.kv_slots, cuda_graph=not ns.eager))
    per = max(max(C * ns.waves, ns.min_prompts) for C in ns.concurrency) // len(FAMILIES) + 1
    pool = interleaved_chat_prompts(base.tokenize_chat, per, ns.prompts_dir, FAMILIES)
    rows = []
    for C in ns.concurrency:
        # at least --min-prompts requests, C at a time (one prompt at C = 1 would be one family's noise),
        # and --waves times C: with few waves the last one's staggered finishes weigh on speculation
        prompts = cycled(pool, max(C * ns.waves, ns.min_prompts))
        base.scheduler.max_running = C  # NONE at the same concurrency as the speculative engines
        plain = [SpecOptions(task=f) for f, _ in prompts]
        # (config, drafter, engine, per-request options, pipeline setting)
        runs = [("NONE", None, base, None, None)] + ([("NONE-unpipelined", None, base, None, False)]
                                                      if ns.pipeline_ab else [])
        switches = {}  # run index -> kernel switches set while it is built and measured (--step-kernels-ab)
        if ns.step_kernels_ab:
            with switched(STEP_KERNEL_AB["-no-pdl"]):
                none_no_pdl = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", max_running_requests=C,
                                                context_length=2048, kv_slots=ns.kv_slots, cuda_graph=not ns.eager))
            switches[len(runs)] = STEP_KERNEL_AB["-no-pdl"]
            runs.append(("NONE-no-pdl", None, none_no_pdl, None, None))
        if ns.relaunch_changed_ab:
            none_b = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", max_running_requests=C,
                                       context_length=2048, kv_slots=ns.kv_slots, cuda_graph=not ns.eager))
            none_b.worker.relaunch_changed = False
            runs.append(("NONE-changed-next-call", None, none_b, None, None))
        if ns.overlap_prefill_ab:
            runs.append(("NONE-overlap-prefill", None, Engine(EngineArgs(
                device=ns.device, speculative_algorithm="NONE", max_running_requests=C, context_length=2048,
                kv_slots=ns.kv_slots, cuda_graph=not ns.eager, overlap_prefill=True)), None, None))
        if ns.prefill_graph_ab:
            runs.append(("NONE-eager-prefill", None, Engine(EngineArgs(
                device=ns.device, speculative_algorithm="NONE", max_running_requests=C, context_length=2048,
                kv_slots=ns.kv_slots, cuda_graph=not ns.eager, prefill_cuda_graph=False)), None, None))
        for drafter in ns.drafters:
            lib, static = library_for(ns, drafter, C)
            lib_b = library_for(ns, drafter, C, ns.library_dir_b)[0] if ns.library_dir_b else None
            arm_b = "ENTMTP-heads-b" if ns.heads_b else "ENTMTP-library-b" if lib_b else None
            for cfg in (("STATIC", "ENTMTP") + (("ENTMTP+lookup",) if ns.lookup_tokens else ())
                        + (("ENTMTP-unpipelined",) if ns.pipeline_ab else ())
                        + (("ENTMTP-flashinfer-tree",) if ns.tree_attention_ab else ())
                        + (("ENTMTP-no-draft-ahead",) if ns.draft_ahead_ab else ())
                        + (("ENTMTP-unfused-draft",) if ns.draft_kernels_ab else ())
                        + (("ENTMTP-not-launched-ahead",) if ns.launch_ahead_ab else ())
                        + (("ENTMTP-eager-prefill",) if ns.prefill_graph_ab else ())
                        + (("ENTMTP-overlap-prefill",) if ns.overlap_prefill_ab else ())
                        + (("ENTMTP-join-ahead",) if ns.join_ahead_ab else ())
                        + (("ENTMTP-changed-next-call",) if ns.relaunch_changed_ab else ())
                        + (tuple("ENTMTP" + v for v in STEP_KERNEL_AB) if ns.step_kernels_ab else ())
                        + (("ENTMTP-torch-accept",) if ns.accept_kernels_ab else ())
                        + (tuple("ENTMTP" + v for v in GLUE_AB) if ns.glue_kernels_ab else ())
                        + (tuple("ENTMTP" + v for v in HOST_AB) if ns.host_ab else ())
                        + ((arm_b,) if arm_b else ())
                        + tuple(f"STATIC-chain{k}" for k in ns.static_chains)):
                kw = {"tree_library": lib_b if cfg == arm_b and lib_b else lib} if lib else {}
                if cfg == "ENTMTP-heads-b":
                    kw["draft_heads"] = ns.heads_b
                kw["lookup_tokens"] = ns.lookup_tokens if cfg == "ENTMTP+lookup" else 0
                kw["tree_attention"] = "flashinfer" if cfg == "ENTMTP-flashinfer-tree" else "auto"
                kw["prefill_cuda_graph"] = cfg != "ENTMTP-eager-prefill"
                kw["overlap_prefill"] = cfg == "ENTMTP-overlap-prefill"
                kw["join_ahead"] = cfg == "ENTMTP-join-ahead"
                fused_draft.ENABLED = cfg != "ENTMTP-unfused-draft"  # read as the graphs are captured
                values = {**STEP_KERNEL_AB, **ACCEPT_AB, **GLUE_AB, **HOST_AB}.get(cfg[len("ENTMTP"):], {})
                try:
                    with switched(values):
                        eng = Engine(EngineArgs(device=ns.device, speculative_algorithm="ENTMTP", drafter=drafter,
                                                max_running_requests=C, context_length=2048, kv_slots=ns.kv_slots,
                                                cuda_graph=not ns.eager, **kw))
                finally:
                    fused_draft.ENABLED = True
                if values:
                    switches[len(runs)] = values
                eng.worker.drafter.fused_levels = cfg != "ENTMTP-unfused-draft"  # and in any later capture
                if cfg == "ENTMTP-no-draft-ahead":
                    eng.worker.draft_ahead = False
                if cfg == "ENTMTP-not-launched-ahead":  # each step launched only once the one before is read
                    eng.worker.launch_ahead = False
                if cfg == "ENTMTP-changed-next-call":  # a changed batch launched on the next call, not at once
                    eng.worker.relaunch_changed = False
                specs = plain
                if cfg.startswith("STATIC"):  # the report's pooled best tree, or a chain of k drafts
                    k = int(cfg[len("STATIC-chain"):]) if cfg != "STATIC" else 0
                    name = _static_name(eng, [[0] * d for d in range(1, k + 1)] if k else static)
                    specs = [SpecOptions(task=f, tree=name) for f, _ in prompts]
                runs.append((cfg, drafter, eng, specs, False if cfg == "ENTMTP-unpipelined" else None))
        for k, (_, _, eng, specs, _) in enumerate(runs):  # warm-up (kernels compiled, caches allocated)
            with switched(switches.get(k, {})):
                throughput(eng, prompts[:1], 8, specs[:1] if specs else None)
        results = [[] for _ in runs]
        for _ in range(ns.c_repeats):
            for k, (_, _, eng, specs, pipe) in enumerate(runs):
                eng.worker.pipeline = pipe
                with switched(switches.get(k, {})):  # eager forwards and late captures read the switches
                    results[k].append(throughput(eng, prompts, ns.max_new_tokens, specs))
        base.worker.pipeline = None
        med = []
        for res in results:
            res.sort(key=lambda r: r["tokens_per_s"])
            m = res[len(res) // 2]
            m["tokens_per_s_runs"] = [r["tokens_per_s"] for r in res]
            med.append(m)
        ref, ref_outs = med[0], med[0]["outputs"]
        for (cfg, drafter, eng, _, _), res in zip(runs, med):
            outs = res.pop("outputs")
            row = {"concurrency": C, "config": cfg, "drafter": drafter, **res, "graphs": graph_info(eng),
                   "requests": len(prompts)}
            if drafter is not None:
                row |= {"tree_library": eng.args.tree_library, "draft_heads": eng.args.draft_heads}
                gaps = divergence_gaps(base, prompts, ref_outs, outs)
                row |= {"speedup": res["tokens_per_s"] / ref["tokens_per_s"],
                        "outputs_equal_none": sum(a == b for a, b in zip(outs, ref_outs)),
                        "divergences": gaps,
                        "max_divergence_gap_ulps": max((g["gap_ulps"] for g in gaps), default=None)}
            rows.append(row)
        del runs, eng, results, med
        free_memory()
    return rows


# (c)'s --step-kernels-ab: config suffix -> the kernel switches (see _switches) it runs with
STEP_KERNEL_AB = {"-no-pdl": {"pdl": False}, "-merge-last": {"merge_last": True}, "-rope-kernel": {"rope_in_qkv": False}}
# (c)'s --accept-kernels-ab: the verify graphs' bookkeeping as torch ops, not spec/verify_kernels.py's kernels
ACCEPT_AB = {"-torch-accept": {"fused_accept": False}}
# (c)'s --glue-kernels-ab: the step as before 2026-12-07 (fifth session): the draft's torch ops between its
# kernels (fused_draft.FUSED_INPUTS off) and the argmax a program a row (verify_kernels.SPLIT_ARGMAX off)
GLUE_AB = {"-torch-glue": {"fused_draft_inputs": False, "split_argmax": False}}
# (c)'s --host-ab: the tree policy and the entropy estimate vectorised in numpy at every batch size, as
# before they went one request at a time up to 16 requests
HOST_AB = {"-numpy-host": {"policy_small_batch": 0, "entropy_small_batch": 0}}


def free_memory():
    gc.collect()  # engines hold reference cycles; free their KV pools before the next one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _static_name(eng, static_paths):
    """The library's pooled best single tree, added to the worker's library under a fixed name."""
    from srt_entmtp.spec.library import TreeEntry
    from srt_entmtp.spec.tree import Tree

    lib = eng.worker.library
    gen = lib.families["general"]
    if static_paths is None:  # no report: the general family's tree for the prior's entropy
        return lib.choose("general", None).name
    tree = Tree.from_paths([tuple(p) for p in static_paths])
    entry = TreeEntry("bench-static", tree, tuple(0.0 for _ in gen.bucket_tree))
    lib.families["general"] = type(gen)(gen.name, gen.trees + (entry,), gen.bucket_edges, gen.bucket_tree)
    eng.worker.max_nodes = max(eng.worker.max_nodes, tree.num_nodes)
    step = eng.worker.device_step
    if step is not None and tree.num_nodes > 1:  # the device step needs a layout holding it
        li = step.add_layout([tree])
        eng.worker.max_nodes = max(eng.worker.max_nodes, step.shapes[li].layout.num_slots)
        step.capture_layout(li)  # now, not inside the timed run
    return "bench-static"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--drafters", nargs="+", default=["medusa", "hydra", "mtp"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--min-prompts", type=int, default=8, help="requests per run at low concurrency (run C at a time)")
    ap.add_argument("--waves", type=int, default=1,
                    help="(c) at least this many times C requests per run (C at a time): the steady state of a "
                         "long queue, where a finish is followed by an admission, not by a shrinking batch")
    ap.add_argument("--c-repeats", type=int, default=3,
                    help="runs per configuration in (c), round-robin over the configurations; the median is kept")
    ap.add_argument("--pipeline-ab", action="store_true",
                    help="(c) also runs NONE and ENTMTP with greedy steps not pipelined (the A/B of Worker.pipeline)")
    ap.add_argument("--tree-attention-ab", action="store_true",
                    help="(c) also runs ENTMTP with FlashInfer's custom-mask prefill as the verify graphs' tree "
                         "attention (the A/B of the Triton tree kernel)")
    ap.add_argument("--draft-ahead-ab", action="store_true",
                    help="(c) also runs ENTMTP drafting each step only after the one before is collected "
                         "(the A/B of SpecWorker.draft_ahead)")
    ap.add_argument("--launch-ahead-ab", action="store_true",
                    help="(c) also runs ENTMTP with every step launched only after the one before it is read "
                         "(the A/B of SpecWorker._launch_after)")
    ap.add_argument("--draft-kernels-ab", action="store_true",
                    help="(c) also runs ENTMTP drafting each level with torch's ops in place of the fused draft "
                         "kernels (spec/drafters/fused_draft.py)")
    ap.add_argument("--step-kernels-ab", action="store_true",
                    help="(c) also runs NONE without PDL, and ENTMTP without PDL, with the last key split merging "
                         "the attention, and with RoPE in its own kernel (one switch each)")
    ap.add_argument("--join-ahead-ab", action="store_true",
                    help="(c) also runs ENTMTP with join ahead on (experimental, off by default: wrong tokens on "
                         "the H100 until fenced): a new request decodes before its first token is read, and a batch that "
                         "changed is launched behind its step in flight (EngineArgs.join_ahead)")
    ap.add_argument("--relaunch-changed-ab", action="store_true",
                    help="(c) also runs NONE and ENTMTP launching a changed batch's first step on the next call, "
                         "not as soon as the step before is read (the A/B of Worker.relaunch_changed)")
    ap.add_argument("--overlap-prefill-ab", action="store_true",
                    help="(c): also NONE and ENTMTP with prompt chunks beside the decode steps (--overlap-prefill), "
                         "against chunks between them (the default)")
    ap.add_argument("--prefill-graph-ab", action="store_true",
                    help="(c) also runs NONE and ENTMTP with every prompt chunk eager (no prefill CUDA graphs; "
                         "the A/B of EngineArgs.prefill_cuda_graph)")
    ap.add_argument("--accept-kernels-ab", action="store_true",
                    help="(c) also runs ENTMTP with the verify graphs' bookkeeping (inputs, acceptance, entropies, KV "
                         "compaction) as torch ops in place of spec/verify_kernels.py's three kernels")
    ap.add_argument("--glue-kernels-ab", action="store_true",
                    help="(c) also runs ENTMTP as before the draft's inputs and the chunked argmax became kernels: the "
                         "draft's torch gathers and copies between its kernels, and the argmax a program a row")
    ap.add_argument("--host-ab", action="store_true",
                    help="(c) also runs ENTMTP with the tree policy and the entropy estimate vectorised in numpy at "
                         "every batch size (before they went one request at a time up to 16 requests)")
    ap.add_argument("--static-chains", type=int, nargs="*", default=[],
                    help="(c) also runs a static chain of k drafted tokens for each k given (what the policy's "
                         "smallest trees buy at this load)")
    ap.add_argument("--kernel-ab", action="store_true",
                    help="(b) also times the decode step with one kernel choice undone at a time: FlashInfer's "
                         "decode attention, the unfused matmuls, no PDL, RoPE in its own kernel, the merge kernel, "
                         "and the last three together")
    ap.add_argument("--library-dir", default=None)
    ap.add_argument("--library-dir-b", default=None,
                    help="(c) also runs ENTMTP with <dir>/<drafter>_gpu_b<C>.json from this directory "
                         "(ENTMTP-library-b: two calibrations in one run; needs --library-dir)")
    ap.add_argument("--library-set", action="store_true",
                    help="(c) give every speculative engine all of the directory's <drafter>_gpu_b<B>.json at once, "
                         "as `entmtp serve` loads them (each step takes the one for its running batch), instead of "
                         "<drafter>_gpu_b<C>.json alone; applies to --library-dir and --library-dir-b")
    ap.add_argument("--heads-b", default=None,
                    help="(c) also runs ENTMTP with the heads in this directory (ENTMTP-heads-b), with "
                         "--library-dir-b's library when given, else --library-dir's: two sets of heads in one run")
    ap.add_argument("--lookup-tokens", type=int, default=0,
                    help="also run ENTMTP with a prompt-lookup branch of up to N tokens (part c)")
    ap.add_argument("--prompts-dir", default=None)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--eager", action="store_true", help="no CUDA graphs (every forward eager)")
    ap.add_argument("--kv-slots", type=int, default=131072)
    ap.add_argument("--out", default="benchmarks/results/bench_gpu.json")
    ap.add_argument("--cost-out", default=None, help="also write part (a) as a calibrate cost file")
    ns = ap.parse_args()
    dev = torch.device(ns.device)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine()
    res = {"date": datetime.date.today().isoformat(), "gpu": gpu, "torch": torch.__version__, "args": vars(ns)}
    eng = Engine(EngineArgs(device=ns.device, speculative_algorithm="NONE", context_length=2048,
                            max_running_requests=max(ns.batch_sizes), kv_slots=ns.kv_slots, cuda_graph=False))
    if not ns.eager:  # decode graphs for T = 1, tree-verify graphs for T > 1: what the engines replay
        eng.runner.capture_cuda_graphs(max(ns.batch_sizes), max(ns.tokens), decode=True)
        res["graphs_a"] = graph_info(eng)
    res["backend"] = eng.runner.backend_name
    res["dtype"] = str(eng.runner.dtype).replace("torch.", "")
    if "a" in ns.parts:
        res["forward"] = part_a(eng, ns)
        if ns.cost_out:
            Path(ns.cost_out).write_text(json.dumps({"format": "entmtp-cost-curve", "hardware": f"{gpu}, {res['dtype']}, "
                                                     f"{res['backend']} attention", "forward": res["forward"]}, indent=1))
    del eng
    free_memory()
    if "b" in ns.parts:
        res["decode"] = part_b(ns, dev)
        if ns.kernel_ab:
            res["decode_kernel_ab"] = kernel_ab(ns, dev)
    if "c" in ns.parts:
        res["throughput"] = part_c(ns, dev)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(res, indent=1) + "\n")
    print_tables(res)
    print(f"wrote {ns.out}")


def print_tables(res):
    print(f"\n{res['gpu']}, {res['dtype']}, {res['backend']} attention, {res['date']}")
    if "forward" in res:
        print("\n(a) forward ms (rows: batch; columns: new tokens per request), context", res["args"]["context"])
        Ts = sorted({r["tokens_per_request"] for r in res["forward"]})
        print("batch " + " ".join(f"{t:>7d}" for t in Ts))
        for B in sorted({r["batch"] for r in res["forward"]}):
            cells = {r["tokens_per_request"]: r["latency_s"] for r in res["forward"] if r["batch"] == B}
            print(f"{B:5d} " + " ".join(f"{cells[t] * 1e3:7.2f}" for t in Ts))
    if "decode" in res:
        print("\n(b) decode step ms: ours forward (graph) | ours forward eager | ours engine step | "
              "transformers eager | bandwidth floor")
        for r in res["decode"]:
            hf = f"{r['transformers_s'] * 1e3:8.2f}" if r["transformers_s"] else "       -"
            one = r.get("ours_engine_step_not_launched_ahead_s")
            one = f"; engine step not launched ahead {one * 1e3:.3f}" if one else ""
            if r.get("ours_graph_gpu_s"):
                one += f"; graph GPU time {r['ours_graph_gpu_s'] * 1e3:.3f} = {r['ours_graph_gpu_s'] / r['floor_s']:.1f}x floor"
            print(f"batch {r['batch']:3d}: {r['ours_forward_s'] * 1e3:8.3f} {r['ours_eager_forward_s'] * 1e3:8.3f} "
                  f"{r['ours_engine_step_s'] * 1e3:8.3f} {hf} "
                  f"{r['floor_s'] * 1e3:8.3f}   (forward / floor = {r['ours_forward_s'] / r['floor_s']:.1f}x{one})")
    if res.get("decode_kernel_ab"):
        print("\n(b) with one kernel choice undone: forward (graph) ms | engine step ms | graph GPU time ms")
        for r in res["decode_kernel_ab"]:
            gg = f"{r['graph_gpu_s'] * 1e3:8.3f}" if r.get("graph_gpu_s") else "       -"
            print(f"batch {r['batch']:3d} {r['variant']:32s} {r['forward_s'] * 1e3:8.3f} {r['engine_step_s'] * 1e3:8.3f} {gg}")
    if "throughput" in res:
        print("\n(c) offline throughput: tokens/s (accepted tokens per step) [speedup vs NONE]")
        for r in res["throughput"]:
            sp = f"[{r['speedup']:.2f}x]" if "speedup" in r else ""
            eq = f" equal-to-NONE {r['outputs_equal_none']}/{r['requests']}" if "outputs_equal_none" in r else ""
            if r.get("max_divergence_gap_ulps") is not None:
                eq += f" (widest top-2 gap at a divergence: {r['max_divergence_gap_ulps']:.1f} bf16 ulps)"
            pre = (f" prefill {r['prefill_s'] / r['seconds']:.0%} of the time ({r['prefill_forwards']} forwards)"
                   if "prefill_s" in r else "")
            pre += f" {r['requests']} requests" if "requests" in r else ""
            runs = r.get("tokens_per_s_runs") or []
            # the spread of the repeats: at batch 8 one process's runs can spread 30% (docs/gpu.md)
            spread = f" runs {min(runs):.0f}-{max(runs):.0f}" if len(runs) > 1 else ""
            print(f"C={r['concurrency']:3d} {r['config']:24s} {r['drafter'] or '':5s} {r['tokens_per_s']:9.1f} "
                  f"({r['accept_per_step']:.2f}) {sp}{spread}{eq}{pre}")


if __name__ == "__main__":
    main()
