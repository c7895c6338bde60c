#!/usr/bin/env python3
"""Speculative decoding speed per task family at batch 1, in one run:
NONE (plain decoding of the same engine), STATIC with each tree of the family's library entry,
and ENTMTP, for each drafter. Where the library grafts a prompt-lookup branch onto its trees
(policy.lookup, or --lookup-tokens), ENTMTP also runs with the heads' trees alone (`heads only`),
on the same engine, so the table separates what the heads and the lookup branch each bring.

    python scripts/bench_spec.py [--drafters medusa hydra mtp] [--prompts 4] [--max-new-tokens 128]

Decode tokens/s counts from the first output token to the last (prefill excluded); accepted
tokens per step is SGLang's spec_accept_length (accepted drafts + bonus per verify step).
Prints a table, writes JSON (default benchmarks/results/spec_cpu.json).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.bench_prompts import benchmark_prompts
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions

FAMILIES = ("code", "math", "chat", "writing")


def run_one(engine: Engine, ids: list[int], n: int, spec: SpecOptions | None) -> dict:
    req = engine.generate([ids], SamplingParams(max_new_tokens=n), spec)[0]
    m = req.meta_info()
    k = len(req.output_ids)
    dt = (req.t_last_token - req.t_first_token) if k > 1 else float("nan")
    return {"tokens": k, "decode_s": dt, "accept_length": m["spec_accept_length"] or 1.0,
            "verify_steps": m["spec_verify_ct"], "trees": m["tree_choices"], "output_ids": req.output_ids,
            "lookup_accepted": m.get("lookup_accepted_tokens", 0)}


def run_config(engine: Engine, prompts: list[list[int]], refs: list[dict], n: int, spec: SpecOptions) -> dict:
    """One configuration over a family's prompts; lossless means every output equals NONE's."""
    runs = [run_one(engine, ids, n, spec) for ids in prompts]
    return summarise(runs) | {"all_match_none": all(r["output_ids"] == ref["output_ids"] for r, ref in zip(runs, refs)),
                              "trees": _merge([r["trees"] for r in runs]),
                              "lookup_accepted_tokens": sum(r["lookup_accepted"] for r in runs)}


def summarise(runs: list[dict]) -> dict:
    toks = sum(r["tokens"] - 1 for r in runs)
    secs = sum(r["decode_s"] for r in runs)
    steps = sum(r["verify_steps"] for r in runs)
    acc = sum(r["accept_length"] * r["verify_steps"] for r in runs) / steps if steps else 1.0
    return {"tok_s": toks / secs if secs else float("nan"), "accept_length": acc, "tokens": toks, "seconds": secs}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafters", nargs="+", default=["medusa", "hydra", "mtp"])
    p.add_argument("--families", nargs="+", default=list(FAMILIES))
    p.add_argument("--prompts", type=int, default=4, help="prompts per family")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--tree-library", default=None)
    p.add_argument("--lookup-tokens", type=int, default=None, help="override the library's lookup branch (0: off)")
    p.add_argument("--no-static", action="store_true", help="skip the per-tree STATIC runs")
    p.add_argument("--out", default="benchmarks/results/spec_cpu.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    common = {"device": a.device, "dtype": a.dtype, "kv_slots": 8192, "context_length": 2048, "max_running_requests": 1}
    prompts = {f: benchmark_prompts(f, a.prompts) for f in a.families}
    plain = Engine(EngineArgs(**common))
    enc = {f: [plain.tokenize_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]
           for f, rows in prompts.items()}
    plain.generate([enc[a.families[0]][0]], SamplingParams(max_new_tokens=4))  # warm-up
    res = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "threads": torch.get_num_threads(),
           "device": a.device, "max_new_tokens": a.max_new_tokens, "prompts_per_family": a.prompts,
           "prompt_ids": {f: [r["id"] for r in rows] for f, rows in prompts.items()}, "results": {}}
    none = {f: [run_one(plain, ids, a.max_new_tokens, None) for ids in enc[f]] for f in a.families}
    res["results"]["NONE"] = {f: summarise(v) for f, v in none.items()}
    del plain
    for drafter in a.drafters:
        eng = Engine(EngineArgs(**common, speculative_algorithm="ENTMTP", drafter=drafter,
                                tree_library=a.tree_library, lookup_tokens=a.lookup_tokens))
        lib, w = eng.worker.library, eng.worker
        lookup = w.lookup_tokens
        res.setdefault("lookup_tokens", {})[drafter] = lookup
        res.setdefault("draft_weights", {})[drafter] = "int8" if w.drafter.int8 else str(w.drafter.param_dtype)
        eng.generate([enc[a.families[0]][0]], SamplingParams(max_new_tokens=4))
        block = {}
        for f in a.families:
            row = {"ENTMTP": run_config(eng, enc[f], none[f], a.max_new_tokens, SpecOptions(task=f))}
            if lookup:
                w.lookup_tokens = 0  # the same engine, heads' trees alone (requests admitted now get no index)
                row["ENTMTP heads only"] = run_config(eng, enc[f], none[f], a.max_new_tokens, SpecOptions(task=f))
                w.lookup_tokens = lookup
            if not a.no_static:
                for entry in lib.family(f).trees:
                    row[f"STATIC:{entry.name}"] = run_config(eng, enc[f], none[f], a.max_new_tokens,
                                                             SpecOptions(task=f, tree=entry.name)) | {
                                                                 "nodes": entry.tree.num_nodes}
            block[f] = row
        res["results"][drafter] = block
        del eng
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print_table(res, a.families)
    print(f"\nwrote {out}")


def _merge(dicts):
    out = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, 0) + v
    return out


def print_table(res, families):
    none = res["results"]["NONE"]
    print(f"\nbatch 1, {res['device']} ({res['threads']} threads), {res['max_new_tokens']} new tokens, "
          f"{res['prompts_per_family']} prompts per family; speedup vs NONE of the same engine")
    print(f"{'drafter':<8} {'family':<8} {'config':<22} {'tok/s':>7} {'acc/step':>9} {'speedup':>8} "
          f"{'lookup tok':>10}")
    for f in families:
        print(f"{'-':<8} {f:<8} {'NONE':<22} {none[f]['tok_s']:>7.1f} {1.0:>9.2f} {1.0:>8.2f}")
    for drafter, block in res["results"].items():
        if drafter == "NONE":
            continue
        for f in families:
            for cfg, s in block[f].items():
                flag = "" if s.get("all_match_none", True) else "  MISMATCH"
                print(f"{drafter:<8} {f:<8} {cfg:<22} {s['tok_s']:>7.1f} {s['accept_length']:>9.2f} "
                      f"{s['tok_s'] / none[f]['tok_s']:>8.2f} {s.get('lookup_accepted_tokens', 0):>10d}{flag}")


if __name__ == "__main__":
    main()
