"""`entmtp calibrate collect | cost | trees | validate` (docs/calibration.md walks through them)."""
from __future__ import annotations

import json
import logging
import platform
from pathlib import Path

log = logging.getLogger(__name__)

DRAFTER_KINDS = ("medusa", "hydra", "mtp")


def _engine(ns, algorithm: str = "NONE", **kw):
    from srt_entmtp.engine import Engine, EngineArgs

    return Engine(EngineArgs(model_path=ns.model_path, device=ns.device, dtype=ns.dtype,
                             max_running_requests=ns.max_running_requests, speculative_algorithm=algorithm,
                             kv_slots=getattr(ns, "kv_slots", None), **kw))


def hardware_string(runner) -> str:
    import torch

    if runner.device.type == "cuda":
        name = torch.cuda.get_device_name(runner.device)
    else:
        name = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    return f"{name}, {str(runner.dtype).replace('torch.', '')}, {runner.backend_name} attention"


def cmd_collect(ns) -> int:
    from srt_entmtp.calibrate.stats import collect, summary_rows
    from srt_entmtp.calibrate.trees import quantile_edges
    from srt_entmtp.spec.drafters import load_drafter
    from srt_entmtp.spec.drafters.base import HeadsLoadError, heads_dirs_by_kind
    from srt_entmtp.spec.library import TreeLibrary
    from srt_entmtp.spec.worker import default_heads_dir, default_library_path

    try:  # trained heads of a kind in place of the shipped ones
        own = heads_dirs_by_kind(ns.draft_heads, ns.drafters, "--draft-heads", "--drafters")
    except HeadsLoadError as e:
        raise SystemExit(str(e)) from None
    heads = {k: own.get(k, default_heads_dir(k)) for k in ns.drafters}
    eng = _engine(ns)
    drafters = {k: load_drafter(path, eng.runner) for k, path in heads.items()}
    for d in drafters.values():  # rank what serving will propose (int8 heads on CPU by default)
        d.quantize_for_inference(getattr(ns, "draft_dtype", "auto"))
    est = TreeLibrary.load(ns.estimator_from or default_library_path("any", eng.runner.device)).policy.estimator
    out = Path(ns.out_dir)
    stats = collect(eng, drafters, ns.families, ns.prompts_per_family, ns.max_new_tokens, top_k=ns.top_k,
                    max_depth=ns.max_depth, temperature=ns.temperature, seed=ns.seed, est=est,
                    prompts_dir=Path(ns.prompts_dir) if ns.prompts_dir else None)
    for kind, st in stats.items():
        st.meta["heads"] = str(heads[kind])
        st.meta["draft_dtype"] = "int8" if drafters[kind].int8 else str(eng.runner.dtype).replace("torch.", "")
        path = out / f"{kind}_stats.json"
        st.save(path)
        edges = {f: quantile_edges(st.entropies(f), ns.buckets, 100) for f in st.families}
        print(f"\n{kind}: {path} ({sum(len(f.ranks) for f in st.families.values())} positions)")
        print(f"{'family':8s} {'bucket':>14s} {'positions':>9s} {'top1@d1':>8s} {'topK@d1':>8s} {'E[chain]':>8s}")
        for r in summary_rows(st, edges):
            print(f"{r['family']:8s} {r['lo']:6.2f}..{r['hi']:<6.2f} {r['positions']:9d} {r['top1_d1']:8.3f} "
                  f"{r['topK_d1']:8.3f} {r['chain_expected']:8.3f}")
    return 0


def cmd_cost(ns) -> int:
    ns.max_running_requests = max(ns.max_running_requests, *ns.batch_sizes)  # the whole batch runs at once
    import gc

    import torch

    from srt_entmtp.calibrate.cost import COST_FORMAT, measure_spec_steps, measure_step_latency

    # the trees timed are far bigger than the shipped library's: capture verify graphs for them too,
    # or the big ones would run eagerly (on a GPU, 5-10x slower than the engine runs them);
    # the heads' trees alone: a lookup chain is priced as extra verify tokens (`forward` rows)
    same = {"lookup_tokens": 0, "draft_dtype": getattr(ns, "draft_dtype", "auto"),
            "cuda_graph_min_tree_nodes": max(ns.nodes) + 1}
    eng = _engine(ns, "STATIC", drafter=ns.drafters[0], **same)
    runner = eng.runner
    result = {"format": COST_FORMAT, "hardware": hardware_string(runner), "device": str(runner.device),
              "draft_dtype": "int8" if eng.worker.drafter.int8 else str(runner.dtype).replace("torch.", ""),
              "dtype": str(runner.dtype).replace("torch.", ""), "backend": runner.backend_name,
              "model": runner.name, "context": ns.context, "timing": ns.timing,
              "forward": measure_step_latency(runner, [n + 1 for n in ns.nodes], ns.batch_sizes, ns.context,
                                              repeats=ns.repeats),
              "spec_steps": {}}
    del eng
    for kind in ns.drafters:
        eng = _engine(ns, "STATIC", drafter=kind, **same)
        result["spec_steps"][kind] = measure_spec_steps(eng, ns.nodes, ns.batch_sizes, steps=ns.steps,
                                                        prompt_len=ns.context, depths=ns.depths, timing=ns.timing)
        del eng
        gc.collect()  # engines hold reference cycles: free this one's KV pool before the next
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"step latency (ms) on {result['hardware']}, context {ns.context}")
    for B in ns.batch_sizes:
        print(f"batch {B}: {'nodes':>6s} {'depth':>6s} {'forward':>8s} " + " ".join(f"{k:>8s}" for k in ns.drafters))
        shapes = dict.fromkeys((r["nodes"], r["depth"]) for k in ns.drafters for r in result["spec_steps"][k]
                               if r["batch"] == B)
        for n, d in sorted(shapes):
            fw = next(r["latency_s"] for r in result["forward"] if r["batch"] == B and r["tokens_per_request"] == n + 1)
            cells = []
            for k in ns.drafters:
                s = next((r["latency_s"] for r in result["spec_steps"][k]
                          if r["batch"] == B and r["nodes"] == n and r["depth"] == d), None)
                cells.append(f"{s * 1e3:8.1f}" if s else f"{'-':>8s}")
            print(f"{'':8s} {n:6d} {d:6d} {fw * 1e3:8.1f} " + " ".join(cells))
    print(f"wrote {ns.out}")
    return 0


def cmd_trees(ns) -> int:
    from srt_entmtp.calibrate.cost import load_cost
    from srt_entmtp.calibrate.stats import AcceptanceStats
    from srt_entmtp.calibrate.trees import build_library, layout_notes

    stats = AcceptanceStats.load(ns.stats)
    cost = load_cost(ns.cost)
    lib, report = build_library(stats, cost, ns.batch_size, buckets=ns.buckets, min_bucket=ns.min_bucket,
                                max_nodes=ns.max_nodes, merge_tolerance=ns.merge_tolerance, max_trees=ns.max_trees,
                                hysteresis=ns.hysteresis, lookup_tokens=ns.lookup_tokens,
                                lookup_min_match=ns.lookup_min_match, cost_fit=ns.cost_fit, one_tree=ns.one_tree)
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lib.save(out)
    from srt_entmtp.spec.library import TreeLibrary

    TreeLibrary.load(out, expect_drafter=stats.drafter)  # the core's loader validates what we wrote
    report_path = out.with_suffix(".report.json") if not ns.report else Path(ns.report)
    report["layout_notes"] = layout_notes(lib, ns.batch_size)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{stats.drafter}, batch {ns.batch_size}: predicted tokens/s")
    print(f"{'family':8s} {'buckets (positions: nodes chosen)':48s} {'NONE':>7s} {'static':>7s} {'ENTMTP':>7s}")
    for fam, r in report["families"].items():
        b = ", ".join(f"{x['positions']}:{x['chosen'].split('-n')[-1]}" for x in r["buckets"])
        p = r["predicted_tokens_per_s"]
        print(f"{fam:8s} {b:48s} {p['none']:7.1f} {p['best_static']:7.1f} {p['entmtp']:7.1f}")
    for note in report["layout_notes"]:
        print(f"note: {note}")
    print(f"wrote {out} and {report_path}")
    if ns.plots:
        try:
            from srt_entmtp.calibrate.plots import plot_all
        except ImportError as e:  # matplotlib is a dev extra
            print(f"plots skipped: {e}")
        else:
            for p in plot_all(stats, report, Path(ns.plots), prefix=out.stem):
                print(f"wrote {p}")
    return 0


def cmd_validate(ns) -> int:
    from srt_entmtp.calibrate.validate import format_tables, validate

    result = validate(ns)
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=1) + "\n")
    print(format_tables(result))
    print(f"wrote {ns.out}")
    return 0


def add_parser(sub) -> None:
    from srt_entmtp.calibrate.stats import HEAD_FAMILIES

    c = sub.add_parser("calibrate", help="acceptance statistics, cost curves, tree libraries (docs/calibration.md)")
    csub = c.add_subparsers(dest="calibrate_cmd", required=True)

    def common(p):
        p.add_argument("--model-path", default=None)
        p.add_argument("--device", default="auto")
        p.add_argument("--dtype", default="auto")
        p.add_argument("--max-running-requests", type=int, default=16)
        p.add_argument("--draft-dtype", default="auto", choices=["auto", "int8", "model"],
                       help="weights the heads draft in, as `serve --draft-dtype` (auto: int8 on CPU float32)")

    p = csub.add_parser("collect", help="per-position acceptance ranks and entropy over calibration prompts")
    common(p)
    p.add_argument("--drafters", nargs="+", default=list(DRAFTER_KINDS), choices=DRAFTER_KINDS)
    p.add_argument("--draft-heads", action="append", default=[], metavar="DIR",
                   help="heads directory used for the kind its config.json names, instead of the shipped "
                        "heads (repeatable, one per kind)")
    p.add_argument("--families", nargs="+", default=list(HEAD_FAMILIES), choices=HEAD_FAMILIES)
    p.add_argument("--prompts-per-family", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy answers; > 0 samples them")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=10, help="candidate ranks recorded per depth")
    p.add_argument("--max-depth", type=int, default=6)
    p.add_argument("--buckets", type=int, default=4, help="entropy buckets in the printed summary")
    p.add_argument("--estimator-from", default=None, help="library whose estimator settings to use (default: shipped)")
    p.add_argument("--prompts-dir", default=None)
    p.add_argument("--out-dir", default="benchmarks/calibration")
    p.set_defaults(func=cmd_collect)

    p = csub.add_parser("cost", help="whole-step latency vs tree nodes and batch size on this hardware")
    common(p)
    p.add_argument("--drafters", nargs="+", default=list(DRAFTER_KINDS), choices=DRAFTER_KINDS)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    p.add_argument("--nodes", type=int, nargs="+", default=[0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 63])
    p.add_argument("--depths", type=int, nargs="+", default=None,
                   help="time every node count at each of these tree depths (trees are then priced by "
                        "nodes and depth; sequential drafters pay per depth); default: one shape per count")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--kv-slots", type=int, default=None, help="KV pool per engine (default: sized for the device)")
    p.add_argument("--steps", type=int, default=6, help="timed decode steps per point")
    p.add_argument("--timing", choices=["pipelined", "synced"], default="pipelined",  # cost.TIMINGS (lazy import)
                   help="a step's time: between the scheduler's step returns with no sync (pipelined: what a "
                        "step costs while serving, host and device overlapped), or with a sync around each "
                        "(synced: host plus device time, the grids before 2026-12-03)")
    p.add_argument("--repeats", type=int, default=3, help="timed forwards per point")
    p.add_argument("--out", default="benchmarks/calibration/cost_cpu.json")
    p.set_defaults(func=cmd_cost)

    p = csub.add_parser("trees", help="Pareto fronts and the library JSON from stats + cost")
    p.add_argument("--stats", required=True)
    p.add_argument("--cost", required=True)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--buckets", type=int, default=4)
    p.add_argument("--min-bucket", type=int, default=300, help="fewest positions per entropy bucket")
    p.add_argument("--max-nodes", type=int, default=63)
    p.add_argument("--merge-tolerance", type=float, default=0.02)
    p.add_argument("--max-trees", type=int, default=5)
    p.add_argument("--hysteresis", type=float, default=0.1)
    p.add_argument("--lookup-tokens", type=int, default=0,
                   help="write a prompt-lookup branch of up to N tokens into the library's policy (0: none)")
    p.add_argument("--lookup-min-match", type=int, default=2, help="shortest repeated n-gram the lookup follows")
    p.add_argument("--cost-fit", choices=["lower", "max"], default="lower",  # cost.COST_FITS (lazy import)
                   help="how grid noise leaves the prices: lower = each point at the cheapest measured step with "
                        "at least its nodes and depth (noise only adds time); max = a running maximum (how the "
                        "libraries before 2026-12-03 evening were searched)")
    p.add_argument("--one-tree", action="store_true",
                   help="one tree for every family and bucket (the best pooled over all families' positions), so "
                        "a batch mixing families verifies that tree's own layout, not a covering one (batch > 1)")
    p.add_argument("--out", required=True)
    p.add_argument("--report", default=None, help="report JSON (default: <out>.report.json)")
    p.add_argument("--plots", default=None, help="directory for PNG plots (needs matplotlib)")
    p.set_defaults(func=cmd_trees)

    p = csub.add_parser("validate", help="predicted vs observed acceptance, and the ablation table")
    common(p)
    p.add_argument("--drafter", default="medusa", choices=DRAFTER_KINDS)
    p.add_argument("--library", required=True)
    p.add_argument("--report", default=None, help="the library's report from `trees` (default: <library>.report.json)")
    p.add_argument("--stats", required=True)
    p.add_argument("--families", nargs="+", default=list(HEAD_FAMILIES), choices=HEAD_FAMILIES)
    p.add_argument("--prompts", type=int, default=3, help="benchmark prompts per family")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts-dir", default=None)
    p.add_argument("--out", default="benchmarks/results/calibration_validate.json")
    p.set_defaults(func=cmd_validate)
