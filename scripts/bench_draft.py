#!/usr/bin/env python3
"""The draft graph alone: Drafter.propose_layout for the shipped GPU libraries' layouts, each
captured as a CUDA graph with the fused draft levels (spec/drafters/fused_draft.py) and with
torch's ops, at the batch sizes each library is for. This is the part of a speculative step
that drafting costs; the verify forward and acceptance are not in it.

--kernels also times each kernel of an MTP draft level alone (four calls a graph, as four
levels of a draft make, with the head's real weights) over a grid of tile configs, at the rows a
level has at batch 1 and 8, and then the layouts' draft graphs again with the best config of
each kernel (fused_draft.CONFIGS, PICK_WARPS): what a retune for this GPU would give.

    python scripts/bench_draft.py [--drafter mtp] [--batch-sizes 1 8] [--kernels [--configs-out c.json]]
                                  [--out draft.json]

Needs CUDA, Triton and the model. Prints a table last and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_small_linear import graph_us  # this folder: sys.path[0] when run as a script

from srt_entmtp.model import small_linear
from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.spec.device_step import choose_layouts
from srt_entmtp.spec.drafters import fused_draft, load_drafter
from srt_entmtp.spec.library import TreeLibrary
from srt_entmtp.spec.tree_layout import LayoutTable
from srt_entmtp.spec.worker import PACKAGE, default_heads_dir

LEVEL_ROWS = (1, 7, 8, 16)  # a level's parent rows: batch 1 (the root, then 5-7 slots) and batch 8 (8, 16)
CALLS = 4                   # kernels a graph: one per level of a depth-4 draft
K = 7                       # candidates a row (the shipped batch-1 trees' widest level)
GRIDS = {  # small_linear 4-tuples (BLOCK_N, BLOCK_K, warps, stages), 16-row tiles
    "proj": list(itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (3,))),
    "gate_up": list(itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (3,))),
    "down": list(itertools.product((16, 32, 64), (128, 256, 512), (2, 4), (3,))),
    "topk": list(itertools.product((64, 128, 256), (64, 128), (4, 8), (2, 3))),
}
PICK_WARPS = (1, 2, 4, 8)


def level_inputs(d, M):
    g = torch.Generator(device="cuda").manual_seed(M)
    dt, H = d.proj.dtype, d.hidden_size
    x = {"state": torch.randn(M, H, device="cuda", dtype=dt, generator=g),
         "tokens": torch.randint(0, d.vocab_size, (M,), device="cuda", generator=g),
         "act": torch.randn(M, d.intermediate_size, device="cuda", dtype=dt, generator=g) * 0.1}
    B, w, c = (1, M, K) if M < 8 else (M, 1, 2)  # batch 1: one request's M parents; batch 8: forks of two
    x["pick"] = (B, w, torch.randint(0, w, (B, c), device="cuda", generator=g),
                 torch.randint(0, 2 if M >= 8 else K, (B, c), device="cuda", generator=g))
    return x


def op_fn(d, op, x, cfg):
    eps = d.eps
    if op == "proj":
        return lambda: [small_linear.norm2_linear(x["state"], d.norm_state, d.embed, x["tokens"], d.norm_emb, d.proj,
                                                  eps, config=cfg) for _ in range(CALLS)]
    if op == "gate_up":
        return lambda: [small_linear.norm_gate_silu(x["state"], d.norm_mlp, d.gate_up, eps, config=cfg)
                        for _ in range(CALLS)]
    if op == "down":
        return lambda: [small_linear.linear_residual(x["act"], d.down, x["state"], config=cfg) for _ in range(CALLS)]
    return lambda: [small_linear.norm_linear_topk(x["state"], d.norm_out, d.out_weight, eps, K, config=cfg)
                    for _ in range(CALLS)]


def kernel_sweep(d):
    """us per call of every kernel of a level at every config of its grid, at LEVEL_ROWS rows;
    returns (rows of results, the best config per op by the sum over LEVEL_ROWS)."""
    out, best = [], {}
    inputs = {M: level_inputs(d, M) for M in LEVEL_ROWS}
    for op, grid in GRIDS.items():
        totals = {}
        for cfg in [None, *grid]:
            try:
                us = {M: graph_us(op_fn(d, op, inputs[M], cfg), reps=100, calls=CALLS) for M in LEVEL_ROWS}
            except Exception as e:  # noqa: BLE001  (a config Triton cannot build: shared memory, registers)
                print(f"  {op} {cfg}: {type(e).__name__}", flush=True)
                continue
            out.append({"op": op, "config": list(cfg) if cfg else "default", "us": us})
            totals[cfg] = sum(us.values())
            print(f"  {op:8s} {cfg or 'default'!s:22s} " + " ".join(f"{M}:{us[M]:6.2f}" for M in LEVEL_ROWS),
                  flush=True)
        best[op] = min(totals, key=totals.get)
    # pick, on the default top-k's candidates
    totals = {}
    for warps in PICK_WARPS:
        us = {}
        for M in LEVEL_ROWS:
            x = inputs[M]
            tv, ti = small_linear.norm_linear_topk(x["state"], d.norm_out, d.out_weight, d.eps, K)
            _, w, parent, rank = x["pick"]

            def picks(tv=tv, ti=ti, parent=parent, rank=rank, w=w, warps=warps):
                return [fused_draft.pick(tv, ti, parent, rank, w, K, d.draft_vocab, warps) for _ in range(CALLS)]
            us[M] = graph_us(picks, reps=100, calls=CALLS)
        out.append({"op": "pick", "config": warps, "us": us})
        totals[warps] = sum(us.values())
        print(f"  pick     warps {warps:<16d} " + " ".join(f"{M}:{us[M]:6.2f}" for M in LEVEL_ROWS), flush=True)
    best["pick_warps"] = min(totals, key=totals.get)
    return out, best


def set_configs(best: dict | None) -> None:
    for op in fused_draft.CONFIGS:
        fused_draft.CONFIGS[op] = best.get(op) if best else None
    fused_draft.PICK_WARPS = best.get("pick_warps", 4) if best else 4


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafter", default="mtp")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--kernels", action="store_true",
                    help="time each kernel of an MTP level over a grid of tile configs (a few minutes of compiles), "
                         "then the draft graphs with the best of each")
    ap.add_argument("--out", default="benchmarks/results/bench_draft.json")
    ap.add_argument("--configs-out", default=None,
                    help="with --kernels: write the best configs here, for ENTMTP_DRAFT_CONFIGS")
    ns = ap.parse_args()
    runner = ModelRunner(dtype="bfloat16", device="cuda", kv_slots=4096)
    d = load_drafter(default_heads_dir(ns.drafter), runner)
    kernels, best = [], None
    if ns.kernels:
        if ns.drafter != "mtp":
            ap.error("--kernels times the MTP block's kernels: --drafter mtp")
        kernels, best = kernel_sweep(d)
        print("best:", best, flush=True)
        if ns.configs_out:
            Path(ns.configs_out).write_text(json.dumps(
                {op: (list(c) if isinstance(c, tuple) else c) for op, c in best.items()}, indent=1))
    variants = ("fused", "torch") + (("tuned",) if best else ())
    rows = []
    for B in ns.batch_sizes:
        lib = TreeLibrary.load(PACKAGE / "spec" / "libraries" / f"{ns.drafter}_gpu_b{B}.json")
        trees = [t.truncate(d.max_depth) for t in lib.all_trees()]
        for lay in choose_layouts(trees):
            table = LayoutTable(lay, trees, "cuda")
            fits = [t for t in trees if lay.fits(t)]
            rowsel = torch.tensor([table.rows[fits[i % len(fits)]] for i in range(B)], device="cuda")
            hidden = torch.randn(B, d.hidden_size, device="cuda", dtype=runner.dtype)
            roots = torch.randint(0, d.vocab_size, (B,), device="cuda")
            args = (hidden, roots, lay, table.parent_in_level[rowsel], table.rank[rowsel])
            times = {}
            outs = {}
            for variant in variants:
                fused_draft.ENABLED = variant != "torch"
                set_configs(best if variant == "tuned" else None)
                times[variant] = graph_us(lambda a=args: d.propose_layout(*a), reps=200, calls=1)
                outs[variant] = d.propose_layout(*args)
            fused_draft.ENABLED = True
            set_configs(None)
            agree = {v: float((outs[v] == outs["torch"]).float().mean()) for v in variants if v != "torch"}
            rows.append({"batch": B, "layout": "x".join(map(str, lay.widths)), "ks": list(lay.ks),
                         **{f"{v}_us": times[v] for v in variants},
                         "tokens_agree": agree["fused"], **({"tuned_tokens_agree": agree["tuned"]} if best else {})})
    res = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "drafter": ns.drafter,
           "rows": rows}
    if ns.kernels:
        res.update(kernel_rows=list(LEVEL_ROWS), calls_per_graph=CALLS, k=K, kernels=kernels,
                   best={op: (list(c) if isinstance(c, tuple) else c) for op, c in best.items()})
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(res, indent=2))
    if ns.kernels:
        print(f"\n{'kernel':>8} " + " ".join(f"{f'{M} rows':>9}" for M in LEVEL_ROWS) + "  (us a call; default, then best)")
        for op in (*GRIDS, "pick"):
            key = "pick_warps" if op == "pick" else op
            for want in ("default" if op != "pick" else 4, best[key]):
                want = list(want) if isinstance(want, tuple) else "default" if want is None else want
                r = next(r for r in kernels if r["op"] == op and r["config"] == want)
                print(f"{op:>8} " + " ".join(f"{r['us'][M]:>9.2f}" for M in LEVEL_ROWS) + f"  {r['config']}")
    print(f"\n{'batch':>5} {'layout':>16} {'torch us':>9} {'fused us':>9} {'saved':>7} {'agree':>6}"
          + (f" {'tuned us':>9} {'agree':>6}" if best else ""))
    for r in rows:
        print(f"{r['batch']:>5} {r['layout']:>16} {r['torch_us']:>9.1f} {r['fused_us']:>9.1f} "
              f"{r['torch_us'] - r['fused_us']:>7.1f} {r['tokens_agree']:>6.2f}"
              + (f" {r['tuned_us']:>9.1f} {r['tuned_tokens_agree']:>6.2f}" if best else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
