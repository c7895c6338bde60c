"""Validation (`entmtp calibrate validate`): does the library's prediction hold, and does switching pay?

On benchmark prompts the calibration never saw (HumanEval, MT-Bench, and the held-out 5% of the
math and writing sets; srt_entmtp/bench_prompts.py), at batch 1, one run:
  (a) predicted versus observed accepted drafts per step, per family and entropy bucket: the
      prediction for a step is the library's expected_accept_length of the tree it verified, in
      the bucket of the estimate the policy saw;
  (b) the ablation: NONE (plain decoding, same engine), a Medusa-style ~63-node static tree, the
      best single static tree of the family (calibrated on the same statistics and cost curve),
      and ENTMTP. Configurations are interleaved prompt by prompt, so drift in machine speed
      hits them alike; every output is checked token for token against NONE.
"""
from __future__ import annotations

import itertools
import json
import logging
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

from srt_entmtp.calibrate.stats import AcceptanceStats
from srt_entmtp.calibrate.trees import medusa_style_tree
from srt_entmtp.spec.builders import expected_accept_length
from srt_entmtp.spec.library import TreeLibrary, dumps
from srt_entmtp.spec.tree import Tree

log = logging.getLogger(__name__)

CONFIGS = ("NONE", "medusa-63", "best-static", "ENTMTP")


def ablation_library(lib_path: Path, stats: AcceptanceStats, report: dict, out: Path) -> dict[str, str]:
    """The calibrated library plus the ablation's static trees (appended to `general`, which no
    bucket points at, so ENTMTP's choices are unchanged). Returns {config/family: tree name}."""
    d = json.loads(Path(lib_path).read_text())
    gen = d["families"]["general"]
    edges = [float("-inf")] + gen["bucket_edges"] + [float("inf")]
    tables = [stats.table(None, lo, hi)[0] for lo, hi in itertools.pairwise(edges)]
    names = {}

    def add(name: str, tree: Tree) -> None:
        gen["trees"].append({"name": name, "paths": tree.to_json(),
                             "expected_accept_length": [round(expected_accept_length(tree, a), 6) for a in tables]})

    add("ablation-medusa-63", medusa_style_tree(stats, 63, max_depth=5))
    names["medusa-63"] = "ablation-medusa-63"
    for fam, r in report["families"].items():
        if fam == "general":
            continue
        add(f"ablation-static-{fam}", Tree.from_paths([tuple(p) for p in r["static_best"]]))
        names[f"best-static/{fam}"] = f"ablation-static-{fam}"
    out.write_text(dumps(d) + "\n")
    return names


def validate(ns) -> dict:
    from srt_entmtp.bench_prompts import benchmark_prompts
    from srt_entmtp.calibrate.cli import _engine, hardware_string
    from srt_entmtp.sched.request import SamplingParams, SpecOptions

    stats = AcceptanceStats.load(ns.stats)
    lib_path = Path(ns.library)
    report_path = Path(ns.report) if getattr(ns, "report", None) else lib_path.with_suffix(".report.json")
    report = json.loads(report_path.read_text())
    tmp = Path(tempfile.mkdtemp(prefix="entmtp-validate-")) / lib_path.name
    names = ablation_library(lib_path, stats, report, tmp)
    lib = TreeLibrary.load(tmp)
    none = _engine(ns, "NONE")
    spec = _engine(ns, "ENTMTP", drafter=ns.drafter, tree_library=str(tmp),
                   draft_dtype=getattr(ns, "draft_dtype", "auto"))
    steps: list[dict] = []
    current: dict = {}
    spec.step_listeners.append(
        lambda outs, dt: [steps.append({**o.spec, **current}) for o in outs if o.spec is not None])
    prompts_dir = Path(ns.prompts_dir) if ns.prompts_dir else None
    runs = defaultdict(list)
    mismatches = []
    for fam in ns.families:
        for p in benchmark_prompts(fam, ns.prompts, prompts_dir=prompts_dir):
            ids = none.tokenize_chat([{"role": "user", "content": p["prompt"]}])
            sp = SamplingParams(max_new_tokens=ns.max_new_tokens)
            ref = None
            for cfg in CONFIGS:
                current.update(config=cfg, family=fam)
                if cfg == "NONE":
                    req = none.generate([ids], sp)[0]
                    ref = req.output_ids
                else:
                    tree = names["medusa-63"] if cfg == "medusa-63" else (
                        names[f"best-static/{fam}"] if cfg == "best-static" else None)
                    req = spec.generate([ids], sp, SpecOptions(task=fam, tree=tree))[0]
                    if req.output_ids != ref:
                        mismatches.append({"family": fam, "prompt": p["id"], "config": cfg})
                n = len(req.output_ids)
                decode_steps = req.verify_ct if cfg != "NONE" else n - 1   # the first token comes from prefill
                emitted = req.accepted_tokens + req.verify_ct if cfg != "NONE" else n - 1
                runs[(fam, cfg)].append({"tokens": n, "decode_s": req.t_last_token - req.t_first_token if n > 1 else 0.0,
                                         "steps": decode_steps, "emitted": emitted})
    table = []
    for fam in ns.families:
        row = {"family": fam}
        for cfg in CONFIGS:
            rs = runs[(fam, cfg)]
            toks = sum(r["tokens"] - 1 for r in rs)
            secs = sum(r["decode_s"] for r in rs)
            row[cfg] = {"tokens_per_s": toks / secs if secs else 0.0,
                        "accept_per_step": sum(r["emitted"] for r in rs) / max(1, sum(r["steps"] for r in rs))}
        base = row["NONE"]["tokens_per_s"] or 1.0
        row["entmtp_vs_none"] = row["ENTMTP"]["tokens_per_s"] / base
        row["entmtp_vs_best_static"] = row["ENTMTP"]["tokens_per_s"] / (row["best-static"]["tokens_per_s"] or 1.0)
        row["entmtp_vs_medusa63"] = row["ENTMTP"]["tokens_per_s"] / (row["medusa-63"]["tokens_per_s"] or 1.0)
        table.append(row)
    return {"drafter": ns.drafter, "library": str(lib_path), "stats": ns.stats, "hardware": hardware_string(none.runner),
            "prompts_per_family": ns.prompts, "max_new_tokens": ns.max_new_tokens, "ablation": table,
            "prediction": prediction_table(steps, lib), "output_mismatches": mismatches,
            "trees": {k: lib.tree_by_name(v).num_nodes - 1 for k, v in names.items()}}


def prediction_table(steps: list[dict], lib: TreeLibrary) -> list[dict]:
    """Per family and bucket, ENTMTP steps only: mean predicted vs observed accepted drafts."""
    groups = defaultdict(lambda: {"pred": [], "obs": []})
    for s in steps:
        if s.get("config") != "ENTMTP" or s.get("entropy_in") is None:  # None: a library that never drafts
            continue
        fam = lib.family(s["task"])
        b = fam.bucket_of(s["entropy_in"])
        entry = next((e for e in fam.trees if e.tree.name == s["tree"]), None)
        if entry is None:
            continue
        groups[(fam.name, b)]["pred"].append(entry.expected_accept_length[b])
        groups[(fam.name, b)]["obs"].append(s["accepted"])
    rows = []
    for (fam, b), g in sorted(groups.items()):
        pred, obs = statistics.fmean(g["pred"]), statistics.fmean(g["obs"])
        rows.append({"family": fam, "bucket": b, "steps": len(g["obs"]), "predicted": pred, "observed": obs,
                     "error": pred - obs, "rel_error": (pred - obs) / obs if obs else None})
    return rows


def format_tables(res: dict) -> str:
    out = [(f"ablation, {res['drafter']} heads, batch 1, {res['prompts_per_family']} prompts x "
            f"{res['max_new_tokens']} tokens per family, {res['hardware']}"),
           f"trees (non-root nodes): {res['trees']}",
           f"{'family':8s} " + " ".join(f"{c:>17s}" for c in CONFIGS) + f" {'vs NONE':>8s} {'vs static':>9s} {'vs m63':>7s}"]
    for r in res["ablation"]:
        cells = " ".join(f"{r[c]['tokens_per_s']:8.1f} ({r[c]['accept_per_step']:.2f})" for c in CONFIGS)
        out.append(f"{r['family']:8s} {cells} {r['entmtp_vs_none']:8.2f} {r['entmtp_vs_best_static']:9.2f} "
                   f"{r['entmtp_vs_medusa63']:7.2f}")
    out.append("cells: decode tokens/s (tokens per step)")
    out.append("\npredicted vs observed accepted drafts per ENTMTP step")
    out.append(f"{'family':8s} {'bucket':>6s} {'steps':>6s} {'pred':>6s} {'obs':>6s} {'error':>6s}")
    for r in res["prediction"]:
        out.append(f"{r['family']:8s} {r['bucket']:6d} {r['steps']:6d} {r['predicted']:6.2f} {r['observed']:6.2f} "
                   f"{r['error']:+6.2f}")
    out.append(f"outputs differing from NONE: {len(res['output_mismatches'])}")
    return "\n".join(out)
