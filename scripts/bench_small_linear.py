#!/usr/bin/env python3
"""The few-row fused matmuls (model/small_linear.py) against cuBLAS plus the elementwise kernels
they replace, at the default model's shapes, in CUDA graphs of 30 layers (distinct weights per
layer, so weights come from HBM as in a forward, and launch gaps count as they do there).

  (1) per op and tile config: us per layer call at 1, 4, 8, 16 rows (the sweep behind
      small_linear.CONFIGS);
  (2) a layer's matmul chain without attention, at the chosen configs:
      unfused  add_rms_norm, qkv, o, add_rms_norm, gate_up, silu_mul, down   (7 kernels)
      fused    norm_linear, linear_residual, norm_gate_silu, linear_residual (4 kernels)
      mid      norm_linear, linear_residual, rms_norm, gate_up, silu_mul, addmm down (6 kernels;
               past SMALL_M rows: the model's mid-size forward, MID_M)
  (3) --sweep-wide: the 32-, 64- and 128-row tiles (small_linear.WIDE) at 24-128 rows, beside
      16-row tiles there, and the chains at those rows with the best of them (and with 16-row
      tiles only), written to --configs-out for ENTMTP_SMALL_LINEAR_CONFIGS.

    python scripts/bench_small_linear.py [--out small_linear.json] [--sweep] [--sweep-wide [--wide-groups 32 64 128]]
                                         [--rows 1 8 40 120]

Needs CUDA and Triton, not the model. Prints a table last and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.model import fused, small_linear

HID, INTER, QKV, LAYERS = 576, 1536, 960, 30  # SmolLM2-135M
ROWS = (1, 4, 8, 16, 32, 64)


def graph_us(fn, reps=50, calls=LAYERS) -> float:
    """us per call, where fn makes `calls` calls (all LAYERS layers by default), replayed as one
    CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps / calls


def weights(dt):
    def w(n, k):
        return [torch.randn(n, k, device="cuda", dtype=dt) * 0.05 for _ in range(LAYERS)]
    return {"qkv": w(QKV, HID), "o": w(HID, HID), "gate_up": w(2 * INTER, HID), "down": w(HID, INTER),
            "ln": [1 + 0.1 * torch.randn(HID, device="cuda", dtype=dt) for _ in range(LAYERS)]}


def op_call(op, W, M, dt, config):
    h = torch.randn(M, HID, device="cuda", dtype=dt)
    act = torch.randn(M, INTER, device="cuda", dtype=dt)
    if op == "norm_linear/qkv":
        return lambda: [small_linear.norm_linear(h, W["ln"][i], W["qkv"][i], None, 1e-5, config) for i in range(LAYERS)]
    if op == "norm_gate_silu/gate_up":
        return lambda: [small_linear.norm_gate_silu(h, W["ln"][i], W["gate_up"][i], 1e-5, config) for i in range(LAYERS)]
    if op == "linear_residual/o":
        return lambda: [small_linear.linear_residual(h, W["o"][i], h, config) for i in range(LAYERS)]
    return lambda: [small_linear.linear_residual(act, W["down"][i], h, config) for i in range(LAYERS)]


OPS = ("norm_linear/qkv", "norm_gate_silu/gate_up", "linear_residual/o", "linear_residual/down")
CONFIG_KEY = {"norm_linear/qkv": "norm_linear", "norm_gate_silu/gate_up": "norm_gate_silu",
              "linear_residual/o": "linear_residual", "linear_residual/down": "linear_residual"}


def sweep(W, dt, grid, rows=ROWS):
    """Every op at every config of `grid` (4-tuples, or 5-tuples naming the row tile), us per layer
    call at each row count of `rows`."""
    out = []
    for op in OPS:
        for cfg in grid:
            try:
                us = {M: graph_us(op_call(op, W, M, dt, cfg)) for M in rows}
            except Exception as e:  # noqa: BLE001  (a config Triton cannot build: shared memory, registers)
                print(f"  {op} {cfg}: {type(e).__name__}", flush=True)
                continue
            out.append({"op": op, "config": list(cfg), "us": us})
            print(f"  {op:24s} {cfg!s:22s} " + " ".join(f"{M}:{us[M]:6.2f}" for M in rows), flush=True)
    return out


WIDE_ROWS = {32: (24, 32), 64: (40, 48, 64), 128: (96, 120, 128)}


def wide_grid(bm):
    if bm == 128:  # a 128 x BLOCK_K tile of x per stage: narrower K tiles, and 8 warps tried
        return [(bm, *c) for c in itertools.product((16, 32, 64), (64, 128), (4, 8), (3,))]
    if bm == 32:  # 8 warps can split a 32-row tile in two along M, each half a 16-row tile's work
        return [(bm, *c) for c in itertools.product((16, 32, 64), (256,), (4, 8), (3, 4))]
    return [(bm, *c) for c in itertools.product((16, 32, 64), (128, 256), (4,), (3,))]


def sweep_wide(W, dt, groups=tuple(WIDE_ROWS)):
    """Row tiles of 32, 64 and 128 (17-128 rows: tree verification at batch 1-8): every op at each
    tile's rows over a small grid, and 16-row tiles at the same rows; the best config per (config
    key, row tile) goes into small_linear.WIDE, with 16 as its row tile where those win."""
    rows = []
    for bm, ms in ((g, WIDE_ROWS[g]) for g in groups):
        sixteen = [(16, bn, bk, w, st) for bn, bk, w, st in dict.fromkeys(small_linear.CONFIGS[k] for k in CONFIG_KEY.values())]
        group_rows = sweep(W, dt, [(bm, *c[1:]) for c in wide_grid(bm)] + sixteen, ms)
        for r in group_rows:  # sweep() goes op by op, so mark the 16-row tiles by their config, not position
            if tuple(r["config"]) in sixteen:
                r["tile_for"] = bm  # 16-row tiles measured at this tile's rows
        rows += group_rows
    best = pick_wide(rows, groups)
    for bm, ops in best.items():
        small_linear.WIDE.setdefault(bm, {}).update(ops)
    return rows, best


def pick_wide(rows: list[dict], groups) -> dict[int, dict[str, tuple]]:
    """{row group: {config key: config}} from sweep rows: per key, the config with the least total
    time over the key's ops (o and down share linear_residual) and the group's row counts, among
    configs timed for every one of those ops; a row's group is its `tile_for` (16-row tiles timed
    at the group's rows) or else its row tile."""
    best = {}
    for bm in groups:
        for key in dict.fromkeys(CONFIG_KEY.values()):
            cands = {}
            for r in rows:
                if r.get("tile_for", r["config"][0]) == bm and CONFIG_KEY[r["op"]] == key:
                    cands.setdefault(tuple(r["config"]), []).append(sum(r["us"].values()))
            cands = {c: sum(v) for c, v in cands.items() if len(v) == sum(CONFIG_KEY[o] == key for o in OPS)}
            if cands:
                best.setdefault(bm, {})[key] = min(cands, key=cands.get)
    return best


def chains(W, dt, rows=ROWS):
    out = []
    for M in rows:
        h = torch.randn(M, HID, device="cuda", dtype=dt)
        r = torch.randn(M, HID, device="cuda", dtype=dt)
        attn = torch.randn(M, HID, device="cuda", dtype=dt)  # stands in for attention's output

        def unfused(h=h, r=r, attn=attn):
            hh, pending = h, r
            for i in range(LAYERS):
                x, hh = fused.add_rms_norm(pending, hh, W["ln"][i], 1e-5)
                F.linear(x, W["qkv"][i])
                x, hh = fused.add_rms_norm(F.linear(attn, W["o"][i]), hh, W["ln"][i], 1e-5)
                pending = F.linear(fused.silu_mul(F.linear(x, W["gate_up"][i])), W["down"][i])

        def fused_chain(h=h, attn=attn):
            hh = h
            for i in range(LAYERS):
                small_linear.norm_linear(hh, W["ln"][i], W["qkv"][i], None, 1e-5)
                hh = small_linear.linear_residual(attn, W["o"][i], hh)
                hh = small_linear.linear_residual(small_linear.norm_gate_silu(hh, W["ln"][i], W["gate_up"][i], 1e-5),
                                                  W["down"][i], hh)
        def mid_chain(h=h, attn=attn):  # LlamaModel._forward_mid_tokens without attention and RoPE
            hh = h
            for i in range(LAYERS):
                small_linear.norm_linear(hh, W["ln"][i], W["qkv"][i], None, 1e-5)
                hh = small_linear.linear_residual(attn, W["o"][i], hh)
                up = fused.silu_mul(F.linear(fused.rms_norm(hh, W["ln"][i], 1e-5), W["gate_up"][i]))
                hh = torch.addmm(hh, up, W["down"][i].t())

        row = {"rows": M, "unfused_us": graph_us(unfused), "fused_us": graph_us(fused_chain)}
        if M > small_linear.SMALL_M:
            row["mid_us"] = graph_us(mid_chain)
        if small_linear.WIDE and M > small_linear.BLOCK_M:  # the same chain in 16-row tiles only
            saved = dict(small_linear.WIDE)
            small_linear.WIDE.clear()
            try:
                row["fused16_us"] = graph_us(fused_chain)
            finally:
                small_linear.WIDE.update(saved)
        out.append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="small_linear.json")
    ap.add_argument("--sweep", action="store_true", help="time every tile config of the grid (~1-2 min of compiles)")
    ap.add_argument("--sweep-wide", action="store_true",
                    help="tune the 32- and 64-row tiles (17-64 rows), time the chains with them, and write the "
                         "best configs to --configs-out (ENTMTP_SMALL_LINEAR_CONFIGS reads it)")
    ap.add_argument("--wide-groups", type=int, nargs="+", default=list(WIDE_ROWS), choices=list(WIDE_ROWS),
                    help="row groups --sweep-wide tunes (32: 17-32 rows, 64: 33-64, 128: 65-128)")
    ap.add_argument("--configs-out", default="small_linear_configs.json")
    ap.add_argument("--rows", type=int, nargs="+", default=None,
                    help="row counts of the chains (default 1-64, or every swept row count with --sweep-wide)")
    ns = ap.parse_args()
    if not torch.cuda.is_available() or small_linear._kernel() is None:
        sys.exit("bench_small_linear.py needs a CUDA device and Triton")
    dt = torch.bfloat16
    W = weights(dt)
    # correctness at the chosen configs, against the torch forms
    h = torch.randn(8, HID, device="cuda", dtype=dt)
    got = small_linear.norm_gate_silu(h, W["ln"][0], W["gate_up"][0], 1e-5)
    g, u = F.linear(fused.rms_norm_torch(h, W["ln"][0], 1e-5), W["gate_up"][0]).chunk(2, -1)
    err = (got.float() - (F.silu(g) * u).float()).abs().max().item()
    # (the first sweep, over BLOCK_K 64-256 and 2-4 stages, found the widest K tile and the deepest
    # pipeline fastest everywhere; this grid goes on from there)
    grid = list(itertools.product((16, 32), (256, 512), (2, 4), (3, 4, 5))) if ns.sweep else []
    wide_rows, wide_best = sweep_wide(W, dt, tuple(ns.wide_groups)) if ns.sweep_wide else ([], {})
    chain_rows = sorted(set(ROWS) | {m for g in ns.wide_groups for m in WIDE_ROWS[g]}) if ns.sweep_wide else ROWS
    chain_rows = ns.rows or chain_rows
    res = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "layers": LAYERS,
           "rows": list(chain_rows), "configs": small_linear.CONFIGS,
           "wide": {str(k): v for k, v in small_linear.WIDE.items()}, "norm_gate_silu_max_abs_err": err,
           "sweep": sweep(W, dt, grid) if grid else [], "sweep_wide": wide_rows, "chains": chains(W, dt, chain_rows)}
    if ns.sweep_wide:  # the chains above ran with the wide tiles; small_m: up to where the fused chain wins
        small_m = 0
        for c in sorted(res["chains"], key=lambda c: c["rows"]):
            if c["fused_us"] > c["unfused_us"]:
                break
            small_m = c["rows"]
        res["small_m"] = small_m
        Path(ns.configs_out).write_text(json.dumps({"small_m": small_m, "wide": {
            str(bm): {op: list(c) for op, c in ops.items()} for bm, ops in small_linear.WIDE.items()}}, indent=1))
        print(f"wide tiles: {wide_best}; fused up to {small_m} rows; wrote {ns.configs_out}")
    Path(ns.out).write_text(json.dumps(res, indent=1))
    if res["sweep"]:
        print("\nbest config per op (sum of us over rows 1 and 8):")
        for op in OPS:
            best = min((r for r in res["sweep"] if r["op"] == op), key=lambda r: r["us"][1] + r["us"][8])
            print(f"  {op:24s} {best['config']}  " + " ".join(f"{best['us'][M]:.2f}" for M in ROWS))
    print(f"\n{res['gpu']}: a layer's matmul chain (no attention), us per layer in a {LAYERS}-layer graph")
    print("| rows | unfused (7 kernels) | fused (4 kernels) | saved | fused, 16-row tiles only | mid (6 kernels) |\n"
          "| --- | --- | --- | --- | --- | --- |")
    for c in res["chains"]:
        mid = f"{c['mid_us']:.2f}" if "mid_us" in c else "-"
        print(f"| {c['rows']} | {c['unfused_us']:.2f} | {c['fused_us']:.2f} | {c['unfused_us'] - c['fused_us']:.2f} | "
              f"{c.get('fused16_us', c['fused_us']):.2f} | {mid} |")
    print(f"norm_gate_silu vs torch, max |diff|: {err:.4f}\nwrote {ns.out}")


if __name__ == "__main__":
    main()
