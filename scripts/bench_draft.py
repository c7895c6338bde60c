#!/usr/bin/env python3
"""The draft graph alone: Drafter.propose_layout for the shipped GPU libraries' layouts, each
captured as a CUDA graph with the fused draft levels (spec/drafters/fused_draft.py) and with
torch's ops, at the batch sizes each library is for. This is the part of a speculative step
that drafting costs; the verify forward and acceptance are not in it.

Variants: torch's ops; "norm2", the fused levels with the MTP block's input projection as
norm2_linear (both normed halves, fused_draft.TOKEN_TABLE off); "fused", the shipped fused levels.
--kernels also times each kernel of an MTP draft level alone (four calls a graph, as four
levels of a draft make, with the head's real weights) over a grid of tile configs, at the rows a
level has at batch 1 and 8, and then the layouts' draft graphs again with the best config of
each kernel ("tuned": fused_draft.CONFIGS, PICK_WARPS): what a retune for this GPU would give.

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
    if op == "proj":  # the shipped form: the state's half, plus the token's row of the table
        proj_state, table = d.split_projection()
        return lambda: [small_linear.norm_linear_add_rows(x["state"], d.norm_state, proj_state, eps, table,
                                                          x["tokens"], config=cfg) for _ in range(CALLS)]
    if op == "proj_norm2":  # both normed halves side by side (TOKEN_TABLE off)
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
    for op, grid in (("proj_norm2", []), *GRIDS.items()):
        totals = {}
        shipped = SHIPPED["configs"].get(op)
        for cfg in [shipped, *(c for c in grid if c != shipped)]:
            try:
                us = {M: graph_us(op_fn(d, op, inputs[M], cfg), reps=100, calls=CALLS) for M in LEVEL_ROWS}
            except Exception as e:  # noqa: BLE001  (a config Triton cannot build: shared memory, registers)
                print(f"  {op} {cfg}: {type(e).__name__}", flush=True)
                continue
            out.append({"op": op, "config": list(cfg) if cfg else "default", "shipped": op in GRIDS and cfg == shipped,
                        "us": us})
            totals[cfg] = sum(us.values())
            print(f"  {op:10s} {cfg or 'default'!s:22s} " + " ".join(f"{M}:{us[M]:6.2f}" for M in LEVEL_ROWS),
                  flush=True)
        if op in GRIDS:  # proj_norm2 is the form TOKEN_TABLE replaced: timed, not tuned
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
        out.append({"op": "pick", "config": warps, "shipped": warps == SHIPPED["pick_warps"], "us": us})
        totals[warps] = sum(us.values())
        print(f"  pick       warps {warps:<16d} " + " ".join(f"{M}:{us[M]:6.2f}" for M in LEVEL_ROWS), flush=True)
    best["pick_warps"] = min(totals, key=totals.get)
    return out, best


SHIPPED = {"configs": dict(fused_draft.CONFIGS), "pick_warps": fused_draft.PICK_WARPS,
           "token_table": fused_draft.TOKEN_TABLE}


def set_variant(variant: str, best: dict | None) -> None:
    """fused_draft's switches for a variant of the draft graph."""
    fused_draft.ENABLED = variant != "torch"
    fused_draft.TOKEN_TABLE = SHIPPED["token_table"] and variant != "norm2"
    tuned = best if variant == "tuned" else {}
    for op in fused_draft.CONFIGS:
        fused_draft.CONFIGS[op] = tuned.get(op, SHIPPED["configs"][op])
    fused_draft.PICK_WARPS = tuned.get("pick_warps", SHIPPED["pick_warps"])


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
    variants = ("fused", "norm2", "torch") + (("tuned",) if best else ())
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
                set_variant(variant, best)
                times[variant] = graph_us(lambda a=args: d.propose_layout(*a), reps=200, calls=1)
                outs[variant] = d.propose_layout(*args)
            set_variant("fused", None)
            agree = {v: float((outs[v] == outs["torch"]).float().mean()) for v in variants if v != "torch"}
            rows.append({"batch": B, "layout": "x".join(map(str, lay.widths)), "ks": list(lay.ks),
                         **{f"{v}_us": times[v] for v in variants},
                         **{f"{v}_tokens_agree": agree[v] for v in agree}})
    res = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "drafter": ns.drafter,
           "rows": rows}
    res["shipped"] = {"configs": {op: list(c) if c else None for op, c in SHIPPED["configs"].items()},
                      "pick_warps": SHIPPED["pick_warps"], "token_table": SHIPPED["token_table"]}
    if ns.kernels:
        res.update(kernel_rows=list(LEVEL_ROWS), calls_per_graph=CALLS, k=K, kernels=kernels,
                   best={op: (list(c) if isinstance(c, tuple) else c) for op, c in best.items()})
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(res, indent=2))
    if ns.kernels:
        print(f"\n{'kernel':>10} " + " ".join(f"{f'{M} rows':>9}" for M in LEVEL_ROWS)
              + "  (us a call; shipped, then best)")
        for op in ("proj_norm2", *GRIDS, "pick"):
            key = "pick_warps" if op == "pick" else op
            want = best.get(key)
            want = list(want) if isinstance(want, tuple) else "default" if want is None else want
            for r in [r for r in kernels if r["op"] == op and (r["shipped"] or r["config"] == want)]:
                print(f"{op:>10} " + " ".join(f"{r['us'][M]:>9.2f}" for M in LEVEL_ROWS) + f"  {r['config']}"
                      + (" (shipped)" if r["shipped"] else ""))
    print(f"\n{'batch':>5} {'layout':>16} {'torch us':>9} {'norm2 us':>9} {'fused us':>9} {'agree':>6}"
          + (f" {'tuned us':>9} {'agree':>6}" if best else "") + "   (agree: drafted tokens equal to torch's)")
    for r in rows:
        print(f"{r['batch']:>5} {r['layout']:>16} {r['torch_us']:>9.1f} {r['norm2_us']:>9.1f} {r['fused_us']:>9.1f} "
              f"{r['fused_tokens_agree']:>6.2f}"
              + (f" {r['tuned_us']:>9.1f} {r['tuned_tokens_agree']:>6.2f}" if best else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
