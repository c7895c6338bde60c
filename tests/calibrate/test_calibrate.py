"""Calibration stages on tiny runs: collect (real model, real heads), cost (real engine steps),
trees (library the core loads; the choice beats alternatives), validate (real speculation equals
plain decoding), and the errors for bad stats and cost files."""
from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch

from srt_entmtp.calibrate.cost import CostError, load_cost, measure_spec_steps, step_cost_fn
from srt_entmtp.calibrate.stats import (
    AcceptanceStats,
    FamilyData,
    StatsError,
    acceptance_table,
    collect,
    estimator_trace,
)
from srt_entmtp.calibrate.trees import build_library, predicted_rate
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams
from srt_entmtp.spec.entropy import EntropyTracker
from srt_entmtp.spec.library import EstimatorConfig, TreeLibrary
from srt_entmtp.spec.policy import StaticPolicy
from srt_entmtp.spec.tree import Tree, chain
from tests.conftest import load_script, prompts_dir

# ---- statistics -----------------------------------------------------------------------------------

def test_acceptance_table_conditions_on_accepted_prefix():
    K = 3
    # rank per depth; K = miss, -1 = past the end of the answer
    ranks = torch.tensor([[0, 0, 1],
                          [0, 2, -1],
                          [1, K, 0],     # depth 3 not counted: depth 2 missed
                          [K, 0, 0]])    # depths 2, 3 not counted: depth 1 missed
    acc, counts = acceptance_table(ranks, torch.zeros(4), K)
    assert counts.tolist() == [4, 3, 1]
    assert acc[0].tolist() == [0.5, 0.25, 0.0]
    assert acc[1].tolist() == pytest.approx([1 / 3, 0.0, 1 / 3])
    assert acc[2].tolist() == [0.0, 1.0, 0.0]
    acc_hi, counts_hi = acceptance_table(ranks, torch.tensor([0.0, 0.0, 5.0, 5.0]), K, lo=1.0)
    assert counts_hi[0] == 2 and acc_hi[0].tolist() == [0.0, 0.5, 0.0]


@pytest.mark.parametrize("mode", ["ema", "window", "max"])
def test_estimator_trace_matches_tracker_whatever_the_step_grouping(mode):
    """The calibration assumes the estimate does not depend on how tokens were grouped into steps."""
    est = EstimatorConfig(mode=mode, ema_decay=0.7, window=4, init=1.5)
    h = torch.rand(40) * 4
    trace = estimator_trace(h, est)
    tr = EntropyTracker(3, mode=mode, ema_decay=0.7, window=4, init=1.5)
    slot, i, rng = torch.tensor([2]), 0, random.Random(0)
    while i < 40:
        k = min(rng.randint(1, 5), 40 - i)   # an accepted path of k tokens
        tr.update(slot, h[i:i + k], torch.tensor([0, k]))
        i += k
        assert float(tr.value(slot)[0]) == pytest.approx(float(trace[i - 1]), abs=1e-5)


def _synthetic_stats(n: int = 4000, depth: int = 5, K: int = 4, seed: int = 0) -> AcceptanceStats:
    """Low entropy (< 2): the true token is the top candidate 85% of the time; high: 5%."""
    g = random.Random(seed)
    fams = {}
    for fam in ("code", "math"):
        data = FamilyData()
        for _ in range(n):
            h = g.random() * 4
            top, other = (0.85, 0.10) if h < 2 else (0.05, 0.03)
            chars = []
            for _ in range(depth):
                u = g.random()
                chars.append("0" if u < top else str(g.randint(1, K - 1)) if u < top + other else "x")
            data.entropy.append(h)
            data.ranks.append("".join(chars))
        fams[fam] = data
    return AcceptanceStats("SmolLM2-135M-Instruct", "medusa", depth, K, 0.0, EstimatorConfig(), fams)


STEEP_COST = {"format": "entmtp-cost-curve", "hardware": "synthetic",
              "spec_steps": {"medusa": [{"batch": 1, "nodes": 0, "latency_s": 0.050},
                                        {"batch": 1, "nodes": 4, "latency_s": 0.070},
                                        {"batch": 1, "nodes": 16, "latency_s": 0.100},
                                        {"batch": 1, "nodes": 63, "latency_s": 0.200}]}}


def test_stats_file_round_trip_and_errors(tmp_path):
    st = _synthetic_stats(n=50)
    st.save(tmp_path / "s.json")
    back = AcceptanceStats.load(tmp_path / "s.json")
    assert torch.equal(back.table("code")[0], st.table("code")[0])
    d = json.loads((tmp_path / "s.json").read_text())
    d["families"]["math"]["ranks"][3] = "00"
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(StatsError, match=r"bad\.json: families\.math\.ranks\[3\]"):
        AcceptanceStats.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "entmtp-tree-library"}))
    with pytest.raises(StatsError, match=r"other\.json: format"):
        AcceptanceStats.load(tmp_path / "other.json")


def test_cost_file_errors_name_the_field(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"format": "entmtp-cost-curve", "forward": [{"batch": 1, "tokens_per_request": "x",
                                                                         "latency_s": 0.1}]}))
    with pytest.raises(CostError, match=r"c\.json: forward\[0\]\.tokens_per_request"):
        load_cost(p)
    p.write_text("{not json")
    with pytest.raises(CostError, match=r"c\.json: invalid JSON"):
        load_cost(p)
    # a forward-only file (what the GPU benchmark writes) prices trees from its forward rows
    p.write_text(json.dumps({"rows": [{"batch": 1, "tokens_per_request": 1, "latency_s": 0.001},
                                      {"batch": 1, "tokens_per_request": 9, "latency_s": 0.002}]}))
    f = step_cost_fn(load_cost(p), 1, "medusa")
    assert f(0) == pytest.approx(0.001) and f(4) == pytest.approx(0.0015)


# ---- tree search ------------------------------------------------------------------------------------

def test_trees_library_loads_and_choice_beats_alternatives(tmp_path):
    st = _synthetic_stats()
    lib, report = build_library(st, STEEP_COST, batch=1, buckets=4, min_bucket=200, merge_tolerance=0.0)
    lib.save(tmp_path / "lib.json")
    loaded = TreeLibrary.load(tmp_path / "lib.json", expect_drafter="medusa")
    cost = step_cost_fn(STEEP_COST, 1, "medusa")
    alternatives = [Tree.from_paths([])] + [chain(k) for k in range(1, 6)] + \
        [Tree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])]
    for fam in ("code", "math"):
        f = loaded.families[fam]
        assert 1 <= len(f.trees) <= 5
        bounds = [float("-inf")] + list(f.bucket_edges) + [float("inf")]
        for b, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            acc, _ = st.table(fam, lo, hi)
            chosen = f.tree_for_bucket(b)
            for alt in alternatives:
                assert predicted_rate(chosen, acc, cost) >= predicted_rate(alt, acc, cost) - 1e-12
        # steep costs: nothing is worth drafting where the heads are mostly wrong (entropy >= 2)
        assert f.tree_for_bucket(f.bucket_of(3.5)).num_nodes == 1
        assert f.tree_for_bucket(f.bucket_of(0.5)).depth >= 3
    assert report["families"]["code"]["predicted_tokens_per_s"]["entmtp"] > \
        report["families"]["code"]["predicted_tokens_per_s"]["best_static"]


# ---- real model: collect, cost, validate ---------------------------------------------------------------

@pytest.fixture(scope="module")
def none_engine(runner):
    return Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                             max_running_requests=8))


@pytest.mark.parametrize("kind", ["medusa", "mtp"])
def test_collect_ranks_predict_real_chain_acceptance(runner, none_engine, kind):
    """Teacher-forced ranks say exactly how many drafts a real greedy step with a top-1 chain accepts.
    (Float heads: int8 heads quantise activations per call, so a teacher-forced batch of every
    position and a one-row step round a little differently, and agree only statistically.)"""
    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    spec = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                             speculative_algorithm="ENTMTP", drafter=kind, draft_dtype="model"))
    stats = collect(none_engine, {kind: spec.worker.drafter}, ["math"], 1, 24, top_k=5, prompts_dir=prompts_dir())[kind]
    data = stats.families["math"]
    assert len(data.ranks) == 24 and all(len(s) == stats.depth for s in data.ranks)
    acc, counts = stats.table("math")
    assert counts[0] == 23 and bool(((acc >= 0) & (acc <= 1)).all()) and float(acc.sum(1).max()) <= 1 + 1e-9

    chain3 = chain(3)
    spec.worker.policy = spec.worker.confidence.base = StaticPolicy(chain3)
    steps = []
    spec.step_listeners.append(lambda outs, dt: steps.extend(o.spec["accepted"] for o in outs if o.spec))
    from srt_entmtp.calibrate.stats import calibration_prompts

    p = calibration_prompts("math", 1, prompts_dir())[0]
    ids = spec.tokenize_chat([{"role": "user", "content": p.prompt}])
    out = spec.generate([ids], SamplingParams(max_new_tokens=24))[0]
    j, checked = 0, 0
    for a in steps:
        if j + 4 >= len(out.output_ids):
            break  # the last steps can be cut by max_new_tokens
        s = data.ranks[j]
        lead = len(s[:3]) - len(s[:3].lstrip("0"))
        assert a == lead, f"step rooted at output {j}: accepted {a}, ranks {s!r}"
        j += a + 1
        checked += 1
    assert checked >= 4


def _depth_cost(per_level: float) -> dict:
    """Whole steps that cost 50 ms + 1 ms a node + `per_level` per depth level (a sequential drafter)."""
    rows = [{"batch": 1, "nodes": 0, "depth": 0, "latency_s": 0.050}]
    for n in (1, 2, 3, 4, 6, 8, 12, 16, 32, 63):
        for d in range(1, min(n, 5) + 1):
            rows.append({"batch": 1, "nodes": n, "depth": d, "latency_s": 0.050 + 0.001 * n + per_level * d})
    return {"format": "entmtp-cost-curve", "hardware": "synthetic", "spec_steps": {"mtp": rows}}


def test_cost_by_depth_prices_trees_by_nodes_and_depth():
    f = step_cost_fn(_depth_cost(0.004), 1, "mtp")
    assert f(0) == pytest.approx(0.050)
    assert f(4, 1) == pytest.approx(0.058) and f(4, 4) == pytest.approx(0.070)
    assert f(5, 2) == pytest.approx(0.063)        # between measured node counts, on its depth's curve
    assert f(8, 7) == pytest.approx(f(8, 5))      # deeper than measured: the deepest curve
    assert f(8) == pytest.approx(f(8, 5))         # no depth: the deepest (dearest) curve
    one = step_cost_fn(STEEP_COST, 1, "medusa")   # one shape per count: depth is ignored
    assert one(4, 1) == one(4, 5) == pytest.approx(0.070)


# the H200's pipelined batch-8 grid of 2026-12-03 (ms), whose 2-node depth-1 point is slow noise
NOISY_GRID_MS = {(0, 0): 0.727, (1, 1): 0.822, (2, 1): 1.109, (2, 2): 0.896, (3, 1): 0.871, (3, 2): 0.926,
                 (3, 3): 0.952, (4, 1): 1.121, (4, 2): 1.176, (4, 3): 1.176, (4, 4): 1.244, (6, 1): 1.147,
                 (6, 2): 1.154, (6, 3): 1.172, (6, 4): 1.153}


def _noisy_grid() -> dict:
    rows = [{"batch": 8, "nodes": n, "depth": d, "latency_s": ms / 1e3} for (n, d), ms in NOISY_GRID_MS.items()]
    return {"format": "entmtp-cost-curve", "hardware": "synthetic", "spec_steps": {"mtp": rows}}


def test_lower_fit_keeps_one_slow_grid_point_from_pricing_every_bigger_tree():
    lower = step_cost_fn(_noisy_grid(), 8, "mtp")
    dear = step_cost_fn(_noisy_grid(), 8, "mtp", fit="max")
    # lower: a point at the cheapest measurement with at least its nodes and depth
    assert lower(2, 1) == pytest.approx(0.000871) and lower(2, 2) == pytest.approx(0.000896)
    assert lower(3, 2) == pytest.approx(0.000926) and lower(4, 1) == pytest.approx(0.001121)
    assert lower(4, 4) == pytest.approx(0.001153)  # (6, 4) was measured cheaper than (4, 4)
    # max: the slow point raises every tree of 2+ nodes, whatever its depth
    assert dear(2, 2) == dear(3, 3) == pytest.approx(0.001109)
    assert lower(0) == dear(0) == pytest.approx(0.000727)
    for f in (lower, dear):  # never cheaper with more nodes or more depth
        for n in range(1, 7):
            for d in range(1, min(n, 4) + 1):
                assert f(n, d) <= f(n + 1, d) + 1e-15
                if d < min(n, 4):
                    assert f(n, d) <= f(n, d + 1) + 1e-15
    with pytest.raises(ValueError, match="cost fit"):
        step_cost_fn(_noisy_grid(), 8, "mtp", fit="median")


def test_lower_fit_root_only_is_never_dearer_than_a_one_node_step():
    grid = _noisy_grid()
    grid["spec_steps"]["mtp"][0]["latency_s"] = 0.000900  # a slow root-only point above the 1-node step
    assert step_cost_fn(grid, 8, "mtp")(0) == pytest.approx(0.000822)
    assert step_cost_fn(grid, 8, "mtp", fit="max")(0) == pytest.approx(0.000900)


def test_the_search_drafts_more_on_the_noisy_grid_with_the_lower_fit():
    st = AcceptanceStats.load(Path(__file__).resolve().parents[2] / "benchmarks/calibration/mtp_stats.json")
    kw = {"batch": 8, "buckets": 1, "min_bucket": 200, "merge_tolerance": 0.0, "max_nodes": 3}
    lo_lib, lo_rep = build_library(st, _noisy_grid(), **kw)
    hi_lib, hi_rep = build_library(st, _noisy_grid(), cost_fit="max", **kw)
    assert lo_rep["cost_fit"] == "lower" and hi_rep["cost_fit"] == "max"
    lo_t, hi_t = lo_lib.families["code"].tree_for_bucket(0), hi_lib.families["code"].tree_for_bucket(0)
    assert lo_t.num_nodes > hi_t.num_nodes  # the slow point's price had kept the search at one node
    assert "lower fit" in lo_lib.description


def test_depth_priced_search_goes_shallow_and_wide_when_levels_are_dear():
    from srt_entmtp.calibrate.trees import tree_cost

    st = _synthetic_stats()
    st.drafter = "mtp"
    acc, _ = st.table("code", float("-inf"), 2.0)
    cheap, _ = build_library(st, _depth_cost(0.0), batch=1, buckets=2, min_bucket=200, merge_tolerance=0.0)
    dear, _ = build_library(st, _depth_cost(0.02), batch=1, buckets=2, min_bucket=200, merge_tolerance=0.0)
    t_cheap = cheap.families["code"].tree_for_bucket(0)
    t_dear = dear.families["code"].tree_for_bucket(0)
    assert t_dear.depth < t_cheap.depth
    cost = step_cost_fn(_depth_cost(0.02), 1, "mtp")
    # the choice beats every tree of the same node count at another depth, priced the same way
    from srt_entmtp.calibrate.trees import depth_fronts

    n = t_dear.num_nodes - 1
    same_n = [t for k, _, t in depth_fronts(acc, 64, 5) if k == n]
    assert len({t.depth for t in same_n}) > 1
    assert all(predicted_rate(t_dear, acc, cost) >= predicted_rate(t, acc, cost) - 1e-12 for t in same_n)
    assert tree_cost(t_dear, cost) == pytest.approx(0.050 + 0.001 * n + 0.02 * t_dear.depth)


def test_chain_like_tree_of_a_given_depth():
    from srt_entmtp.calibrate.cost import chain_like_tree

    for n in (1, 3, 6, 12):
        for d in range(1, min(n, 5) + 1):
            t = chain_like_tree(n, 5, d)
            assert t.num_nodes == n + 1 and t.depth == d
    with pytest.raises(ValueError, match="cannot be 4 deep"):
        chain_like_tree(3, 5, 4)


def test_cost_measures_whole_steps_and_leaves_engine_clean(runner):
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=4096, context_length=1024,
                            speculative_algorithm="STATIC", drafter="medusa"))
    free0 = eng.runner.kv.num_free
    policy = eng.worker.policy
    rows = measure_spec_steps(eng, [0, 3], [1, 2], steps=2, prompt_len=32)
    assert [(r["batch"], r["nodes"]) for r in rows] == [(1, 0), (1, 3), (2, 0), (2, 3)]
    assert all(r["samples"] == 2 and r["latency_s"] > 0 for r in rows)
    assert eng.runner.kv.num_free == free0 and not eng.scheduler.has_work()
    assert eng.worker.policy is policy
    rows = measure_spec_steps(eng, [0, 3], [1], steps=2, prompt_len=32, depths=[1, 3])
    assert [(r["nodes"], r["depth"]) for r in rows] == [(0, 0), (3, 1), (3, 3)]
    assert eng.runner.kv.num_free == free0


def test_cost_prices_root_only_as_the_plain_steps_a_never_drafting_batch_takes(runner):
    """n = 0 is timed on the path a batch whose library never drafts takes when it serves (plain
    steps, pipelined where the engine pipelines), with either timing; the worker is left as it was."""
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=4096, context_length=1024,
                            speculative_algorithm="STATIC", drafter="mtp"))
    never = eng.worker._never_drafts_by_batch
    plain = []
    real = eng.worker.plain_decode
    eng.worker.plain_decode = lambda reqs: plain.append(len(reqs)) or real(reqs)
    for timing in ("pipelined", "synced"):
        plain.clear()
        rows = measure_spec_steps(eng, [0], [2], steps=3, prompt_len=32, timing=timing)
        assert rows[0]["samples"] == 3 and rows[0]["latency_s"] > 0
        assert len(plain) >= 3 and set(plain) == {2}, f"{timing}: root-only steps did not take the plain path"
        plain.clear()
        measure_spec_steps(eng, [2], [2], steps=2, prompt_len=32, timing=timing)
        assert not plain, "a drafted tree took the plain path"
    assert eng.worker._never_drafts_by_batch is never and not eng.scheduler.has_work()
    with pytest.raises(ValueError, match="timing must be one of"):
        measure_spec_steps(eng, [0], [1], timing="wall")


def test_validate_tiny_run(tmp_path, runner):
    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    import argparse

    from srt_entmtp.calibrate.validate import validate

    st = _synthetic_stats(n=400)
    st.model = runner.name
    st.save(tmp_path / "stats.json")
    lib, report = build_library(st, STEEP_COST, batch=1, min_bucket=50)
    lib.save(tmp_path / "medusa_cpu.json")
    (tmp_path / "medusa_cpu.report.json").write_text(json.dumps(report))
    ns = argparse.Namespace(model_path=str(runner.model_dir), device="cpu", dtype="auto", max_running_requests=4,
                            drafter="medusa", library=str(tmp_path / "medusa_cpu.json"), stats=str(tmp_path / "stats.json"),
                            families=["code", "math"], prompts=1, max_new_tokens=10, prompts_dir=str(prompts_dir()))
    res = validate(ns)
    assert res["output_mismatches"] == []
    assert [r["family"] for r in res["ablation"]] == ["code", "math"]
    for r in res["ablation"]:
        assert r["NONE"]["accept_per_step"] == 1.0 and r["NONE"]["tokens_per_s"] > 0
        assert r["medusa-63"]["accept_per_step"] >= 1.0
    assert res["trees"]["medusa-63"] == 63
    assert all(row["steps"] > 0 for row in res["prediction"])


def test_acceptance_signals_script(tmp_path):
    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    mod = load_script("acceptance_signals")
    out = tmp_path / "signals.json"
    assert mod.main(["--families", "math", "--prompts", "2", "--max-new-tokens", "12", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["families"]["math"]
    assert r["positions"] >= 8
    for name in mod.SIGNALS:
        q = r[name]
        assert q["edges"] == sorted(q["edges"]) and len(q["depth1_top1"]) == 4
        assert all(0 <= h <= 1 for h in q["depth1_top1"] if not math.isnan(h))  # NaN: an empty quartile
        assert all(h <= c <= 3 for h, c in zip(q["depth1_top1"], q["chain3_accepted"]) if not math.isnan(c))


def test_collect_takes_other_heads_and_records_them(tmp_path, runner):
    """`calibrate collect --draft-heads DIR` ranks with those heads and says so in the stats file;
    heads of a kind not collected are refused."""
    from srt_entmtp.cli import main
    from srt_entmtp.spec.worker import default_heads_dir

    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    heads = tmp_path / "my_mtp"
    import shutil

    shutil.copytree(default_heads_dir("mtp"), heads)
    base = ["calibrate", "collect", "--model-path", str(runner.model_dir), "--device", "cpu", "--families", "math",
            "--prompts-per-family", "1", "--max-new-tokens", "12", "--prompts-dir", str(prompts_dir()),
            "--out-dir", str(tmp_path), "--draft-dtype", "model"]
    assert main([*base, "--drafters", "mtp", "--draft-heads", str(heads)]) == 0
    st = AcceptanceStats.load(tmp_path / "mtp_stats.json")
    assert st.meta["heads"] == str(heads) and st.meta["draft_dtype"] == "float32"
    assert len(st.families["math"].ranks) == 12
    with pytest.raises(SystemExit, match="--drafters is medusa"):
        main([*base, "--drafters", "medusa", "--draft-heads", str(heads)])


def test_layout_notes_name_what_the_search_does_not_price(tmp_path):
    """calibrate trees' notes: a larger-batch library whose families' trees differ widens every
    request of a mixed batch to their covering layout (the H100 grid of 2026-12-07 gave math a
    3-node chain beside the others' fork: 5 slots, 40 rows at batch 8 instead of 32); a batch-1
    set past LONE_LAYOUTS distinct trees loses the trees' own layouts."""
    from srt_entmtp.calibrate.trees import layout_notes
    from srt_entmtp.spec.device_step import LONE_LAYOUTS

    libs = Path(__file__).resolve().parents[2] / "srt_entmtp" / "spec" / "libraries"
    d = json.loads((libs / "mtp_gpu_b8.json").read_text())
    p = tmp_path / "b8.json"
    p.write_text(json.dumps(d))
    assert layout_notes(TreeLibrary.load(p), 8) == []  # the shipped fork in every family: 4 slots
    d["families"]["math"]["trees"][0]["paths"] = [[0], [0, 0], [0, 0, 0]]
    p.write_text(json.dumps(d))
    (note,) = layout_notes(TreeLibrary.load(p), 8)
    assert "5 slots (8 x 5 = 40 rows" in note and "against 4" in note
    d = json.loads((libs / "mtp_gpu_b1.json").read_text())
    fams = list(d["families"].values())
    assert layout_notes(TreeLibrary.load(libs / "mtp_gpu_b1.json"), 1) == []
    shapes = [[[0]] + [[0] * k for k in range(2, depth + 1)] for depth in range(1, 6)]  # chains of 1-5
    shapes += [[[0], [1]], [[0], [1], [2]], [[0], [1], [0, 0]], [[0], [1], [2], [3]]]
    for i, paths in enumerate(shapes):  # nine distinct trees over the five families
        fam = fams[i % len(fams)]
        fam["trees"].append(fam["trees"][0] | {"name": f"extra-{i}", "paths": paths,
                                               "expected_accept_length": [0.5] * len(fam["bucket_tree"])})
        fam["bucket_tree"][i // len(fams)] = len(fam["trees"]) - 1
    p.write_text(json.dumps(d))
    lib = TreeLibrary.load(p)
    assert len([t for t in lib.all_trees() if t.num_nodes > 1]) > LONE_LAYOUTS
    (note,) = layout_notes(lib, 1)
    assert "LONE_LAYOUTS" in note


def test_one_tree_gives_every_family_the_best_pooled_tree():
    """--one-tree: one tree for every family and bucket, the best of the buckets' own choices by
    the rate pooled over the head families' positions; no layout note then (the shipped batch-8
    file is this, from the 2026-12-03 grid: the fork, with math moved onto it)."""
    from srt_entmtp.calibrate.trees import _mix_rate, layout_notes, search_family

    st = _synthetic_stats()
    per_family, _ = build_library(st, STEEP_COST, batch=1, buckets=4, min_bucket=200, merge_tolerance=0.0)
    lib, report = build_library(st, STEEP_COST, batch=1, buckets=4, min_bucket=200, one_tree=True)
    trees = {e.tree for f in lib.families.values() for e in f.trees}
    assert len(trees) == 1 and report["one_tree"]
    (shared,) = trees
    assert all(f.bucket_tree == (0,) * len(f.bucket_tree) for f in lib.families.values())
    assert layout_notes(lib, 8) == []
    cost = step_cost_fn(STEEP_COST, 1, "medusa")
    pooled = [c for fam in ("code", "math") for c in search_family(st, fam, list(lib.families[fam].bucket_edges),
                                                                     cost, 64, st.depth)]
    rate = _mix_rate(pooled, [0] * len(pooled), [shared], cost)
    for t in {e.tree for f in per_family.families.values() for e in f.trees}:
        assert rate >= _mix_rate(pooled, [0] * len(pooled), [t], cost) - 1e-9
