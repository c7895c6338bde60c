#!/usr/bin/env python3
"""The draft graph alone: Drafter.propose_layout for the shipped GPU libraries' layouts, each
captured as a CUDA graph with the fused draft levels (spec/drafters/fused_draft.py) and with
torch's ops, at the batch sizes each library is for. This is the part of a speculative step
that drafting costs; the verify forward and acceptance are not in it.

    python scripts/bench_draft.py [--drafter mtp] [--batch-sizes 1 8] [--out draft.json]

Needs CUDA, Triton and the model. Prints a table last and writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_small_linear import graph_us  # this folder: sys.path[0] when run as a script

from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.spec.device_step import choose_layouts
from srt_entmtp.spec.drafters import fused_draft, load_drafter
from srt_entmtp.spec.library import TreeLibrary
from srt_entmtp.spec.tree_layout import LayoutTable
from srt_entmtp.spec.worker import PACKAGE, default_heads_dir


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drafter", default="mtp")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", default="benchmarks/results/bench_draft.json")
    ns = ap.parse_args()
    runner = ModelRunner(dtype="bfloat16", device="cuda", kv_slots=4096)
    d = load_drafter(default_heads_dir(ns.drafter), runner)
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
            for variant in ("fused", "torch"):
                fused_draft.ENABLED = variant == "fused"
                times[variant] = graph_us(lambda a=args: d.propose_layout(*a), reps=200, calls=1)
                outs[variant] = d.propose_layout(*args)
            fused_draft.ENABLED = True
            agree = float((outs["fused"] == outs["torch"]).float().mean())
            rows.append({"batch": B, "layout": "x".join(map(str, lay.widths)), "ks": list(lay.ks),
                         "fused_us": times["fused"], "torch_us": times["torch"], "tokens_agree": agree})
    res = {"date": datetime.date.today().isoformat(), "gpu": torch.cuda.get_device_name(), "drafter": ns.drafter,
           "rows": rows}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(res, indent=2))
    print(f"{'batch':>5} {'layout':>16} {'torch us':>9} {'fused us':>9} {'saved':>7} {'agree':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {r['layout']:>16} {r['torch_us']:>9.1f} {r['fused_us']:>9.1f} "
              f"{r['torch_us'] - r['fused_us']:>7.1f} {r['tokens_agree']:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
