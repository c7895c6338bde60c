#!/usr/bin/env python3
"""Where a tree-verify forward spends its time on the GPU, against a decode forward.

For B requests of a 512-token context and T new tokens each (T = 1: decode; T > 1: a chain
tree under a custom mask), times separately: FlashInfer's plan (host), the graph replay alone
(device, CUDA events), and the whole `runner.forward`; then profiles one replay and sums GPU
time per kernel name. Also times the model's GEMM shapes at M = B*T rows, to tell attention
from GEMM cost. Run on a CUDA machine:

    python scripts/profile_verify.py --out verify_profile.json
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.model.cuda_graph import pad_batch
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner


def cuda_ms(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def wall_ms(fn, repeats=30, warmup=5):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def kernel_table(fn, top=12):
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    per = defaultdict(lambda: [0, 0.0])
    for e in prof.events():
        if e.device_type.name == "CUDA":
            k = e.name[:90]
            per[k][0] += 1
            per[k][1] += e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    return {"kernels": sum(v[0] for v in per.values()), "gpu_ms": sum(v[1] for v in per.values()),
            "top": [{"name": k, "count": v[0], "ms": round(v[1], 4)} for k, v in rows[:top]]}


def chain_mask(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


@torch.inference_mode()
def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--out", default="verify_profile.json")
    ns = ap.parse_args()
    r = ModelRunner(device="cuda", context_length=2048)
    r.capture_cuda_graphs(max(ns.batch_sizes), max_tree_nodes=max(ns.tokens))
    dev, g = r.device, r.graphs
    rows = []
    for B in ns.batch_sizes:
        for T in ns.tokens:
            slots = [r.kv.alloc(ns.context + T) for _ in range(B)]
            toks = [torch.randint(100, 1000, (T,)) for _ in range(B)]
            masks = None if T == 1 else [chain_mask(T)] * B
            fb = ForwardBatch.build(toks, [s[:ns.context] for s in slots], [s[ns.context:] for s in slots],
                                    custom_masks=masks, device=dev)
            entry = g._pick(fb)
            attn = entry.attn
            fbp = pad_batch(fb, attn.batch, attn.tokens)
            row = {"batch": B, "tokens_per_request": T, "graph": [attn.batch, attn.tokens],
                   "forward_wall_ms": wall_ms(lambda fb=fb: r.forward(fb)),
                   "plan_wall_ms": wall_ms(lambda attn=attn, fbp=fbp: attn.plan(fbp)),
                   "replay_gpu_ms": cuda_ms(entry.graph.replay)}
            row["replay_kernels"] = kernel_table(entry.graph.replay)
            # the same shapes eagerly, per GEMM, at M = B*T rows
            M = B * T
            lm = r.model.layers[0]
            gemm = {}
            for name in ("qkv", "o", "gate_up", "down"):
                w = lm[name].weight
                inp = torch.randn(M, w.shape[1], device=dev, dtype=r.dtype)
                gemm[name] = cuda_ms(lambda w=w, inp=inp: F.linear(inp, w))
            w = r.model.lm_head
            inp = torch.randn(M, w.shape[1], device=dev, dtype=r.dtype)
            gemm["lm_head"] = cuda_ms(lambda w=w, inp=inp: F.linear(inp, w))
            row["gemm_ms"] = gemm
            rows.append(row)
            print(f"B={B:3d} T={T:3d} fwd {row['forward_wall_ms']:.2f} plan {row['plan_wall_ms']:.2f} "
                  f"replay {row['replay_gpu_ms']:.2f} ms, {row['replay_kernels']['kernels']} kernels; "
                  f"top {row['replay_kernels']['top'][0]['name'][:50]} {row['replay_kernels']['top'][0]['ms']:.3f} ms; "
                  f"gemm {json.dumps({k: round(v, 4) for k, v in gemm.items()})}", flush=True)
            for s in slots:
                r.kv.free(s)
    Path(ns.out).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
