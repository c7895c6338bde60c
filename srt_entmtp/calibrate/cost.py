"""Step latency as a function of batch size and new tokens per request (the cost curve).

`measure_step_latency` is what tree calibration uses to price a tree of n nodes at batch B
(verify cost = forward of B requests x (n+1) tokens over their contexts), and what
scripts/bench_forward.py prints. It allocates its own KV slots and frees them.
"""
from __future__ import annotations

import functools
import statistics
import time

import torch

from srt_entmtp.calibrate import CalibrationFileError, read_json
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_latency(runner: ModelRunner, query_lens: list[int], batch_sizes: list[int] = (1,),
                         context_len: int = 512, repeats: int = 5, warmup: int = 2) -> list[dict]:
    """Median seconds of one forward where each of B requests has `context_len` cached tokens
    and `T` new tokens: T = 1 is a plain decode step; T > 1 is verified as a tree (a chain's mask
    given as a custom mask), so the forward takes the verify path, CUDA graph included, as
    speculative steps do."""
    dev = runner.device
    rows = []
    for B in batch_sizes:
        ctx = [runner.kv.alloc(context_len) for _ in range(B)]
        try:
            # fill the context so attention reads real numbers
            runner.forward(ForwardBatch.build([torch.randint(100, 1000, (context_len,)) for _ in range(B)],
                                              [torch.empty(0, dtype=torch.long)] * B, ctx, device=dev,
                                              logits_indices=torch.tensor([0])))
            for T in query_lens:
                new = [runner.kv.alloc(T) for _ in range(B)]
                masks = [torch.ones(T, T, dtype=torch.bool).tril()] * B if T > 1 else None
                fb = ForwardBatch.build([torch.randint(100, 1000, (T,)) for _ in range(B)], ctx, new, device=dev,
                                        custom_masks=masks)
                times = []
                for i in range(warmup + repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    runner.forward(fb)
                    _sync(dev)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                for s in new:
                    runner.kv.free(s)
                rows.append({"batch": B, "tokens_per_request": T, "context": context_len,
                             "latency_s": statistics.median(times), "min_s": min(times)})
        finally:
            for s in ctx:
                runner.kv.free(s)
    return rows


# ---- whole speculative steps (`entmtp calibrate cost`) -------------------------------------------

COST_FORMAT = "entmtp-cost-curve"


class CostError(CalibrationFileError):
    """A cost file is unreadable or invalid; the message names the file and the field."""


def chain_like_tree(num_nodes: int, max_depth: int, depth: int | None = None):
    """A deterministic tree of `num_nodes` non-root nodes shaped like calibrated ones (deep first,
    then widening), used only to time a step of that size. With `depth`, the tree is exactly that
    deep: a chain of `depth` nodes, widened in the same greedy order up to `num_nodes`."""
    from srt_entmtp.spec.drafters.bench import bench_tree
    from srt_entmtp.spec.tree import Tree

    if num_nodes == 0:
        return Tree.from_paths([])
    if depth is None:
        return bench_tree(num_nodes + 1, max_depth=max_depth)
    if not 1 <= depth <= min(num_nodes, max_depth):
        raise ValueError(f"a {num_nodes}-node tree cannot be {depth} deep (drafter depth {max_depth})")
    paths = [(0,) * d for d in range(1, depth + 1)]
    for p in bench_tree(num_nodes + 1 + depth, max_depth=depth).paths[1:]:  # parents come first
        if len(paths) == num_nodes:
            break
        if p not in paths:
            paths.append(p)
    return Tree.from_paths(paths, max_depth=max_depth)


TIMINGS = ("pipelined", "synced")


def measure_spec_steps(engine, node_counts: list[int], batch_sizes: list[int] = (1,), steps: int = 8,
                       prompt_len: int = 256, depths: list[int] | None = None,
                       timing: str = "pipelined") -> list[dict]:
    """Median wall time of one whole decode step (policy, draft, verify forward, acceptance, KV
    compaction, entropy update: everything the engine does per step) with a static tree of n
    non-root nodes, for B running requests with `prompt_len`-token prompts. n = 0 is a root-only
    tree: the speculative engine decoding one token per step, as a batch that never drafts does
    when it serves (plain steps, pipelined where the engine pipelines). With `depths`, every node
    count is timed at each of those depths it can have (a sequential drafter pays per depth, so
    trees are then priced by nodes and depth); otherwise at one chain-like shape per count.

    timing "pipelined": the time between consecutive returns of the scheduler's step, with no
    sync in between, so a step launched while the host books the one before counts once, at
    whichever of host and device is slower: what a step costs while serving. "synced": a device
    sync before and after each step (host and device time added up; on the GPU that overprices
    every step by the host's share, most for small trees, and the search then picks big ones)."""
    from srt_entmtp.sched.request import SamplingParams, Status
    from srt_entmtp.spec.policy import StaticPolicy

    if timing not in TIMINGS:
        raise ValueError(f"timing must be one of {', '.join(TIMINGS)}, got {timing!r}")
    synced = timing == "synced"

    w, sched = engine.worker, engine.scheduler
    old_policy, old_max, old_never = w.policy, w.max_nodes, w._never_drafts_by_batch
    depth = min(w.drafter.max_depth, 6)
    shapes = []
    for n in node_counts:
        ds = [None] if depths is None or n == 0 else [d for d in depths if d <= min(n, depth)]
        shapes += [(n, d) for d in ds]
    g = torch.Generator().manual_seed(0)
    rows = []
    try:
        for B in batch_sizes:
            if B > sched.max_running:
                raise ValueError(f"batch {B} exceeds the engine's max_running_requests ({sched.max_running})")
            prompts = [torch.randint(100, 20000, (prompt_len,), generator=g).tolist() for _ in range(B)]
            for n, d in shapes:
                tree = chain_like_tree(n, depth, d)
                w.policy = w.confidence.base = StaticPolicy(tree)
                w.max_nodes = max(old_max, tree.num_nodes)
                if w.device_step is not None and n > 0:  # time the step serving runs: the device step
                    li = w.device_step.add_layout([tree])
                    w.max_nodes = max(w.max_nodes, w.device_step.shapes[li].layout.num_slots)
                budget = 2 * (steps + 2) * (tree.depth + 1) + 16
                reqs = [engine.make_request(p, SamplingParams(max_new_tokens=budget, ignore_eos=True)) for p in prompts]
                # root-only: these requests take the plain steps of a batch whose library never drafts
                w._never_drafts_by_batch = [(0, {r.task: tree for r in reqs})] if n == 0 else old_never
                for r in reqs:
                    sched.add(r, bounded=False)
                times = []
                last = None  # when the last decode step returned (pipelined: a step starts there)
                while len(times) < steps and not any(r.finished for r in reqs):
                    decoding = all(r.status is Status.DECODE for r in reqs)
                    if synced:
                        _sync(engine.runner.device)
                    t0 = time.perf_counter()
                    sched.step()
                    if synced:
                        _sync(engine.runner.device)
                    t1 = time.perf_counter()
                    start = t0 if synced else last
                    if decoding and start is not None:
                        times.append(t1 - start)
                    last = t1 if decoding else None
                for r in reqs:
                    sched.abort(r.rid)
                while sched.has_work():
                    sched.step()
                _sync(engine.runner.device)
                rows.append({"batch": B, "nodes": n, "tokens_per_request": n + 1, "depth": tree.depth,
                             "latency_s": statistics.median(times) if times else None, "samples": len(times)})
    finally:
        w.policy = w.confidence.base = old_policy
        w.max_nodes = old_max
        w._never_drafts_by_batch = old_never
    return rows


COST_FITS = ("lower", "max")  # how step_cost_fn turns noisy grid points into monotone prices


def _interp(xs: list[int], ys: list[float], n: int) -> float:
    """Linear between measured node counts, held at the first below it, proportional to tokens
    beyond the last."""
    if n <= xs[0]:
        return ys[0]
    for x0, y0, x1, y1 in zip(xs, ys, xs[1:], ys[1:]):
        if n <= x1:
            return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
    return ys[-1] * (n + 1) / (xs[-1] + 1)


def _monotone_curve(points: list[tuple[int, float]], fit: str = "lower"):
    """seconds(n) over one curve, never decreasing in n. fit="lower": each point is priced at the
    cheapest measurement at or beyond it (timing noise only adds time, so a step measured slower
    than a bigger one is noise); fit="max": at the dearest at or before it (a dip is noise)."""
    points = sorted(points)
    xs = [x for x, _ in points]
    if fit == "lower":
        ys = [min(y for _, y in points[i:]) for i in range(len(points))]
    else:
        ys = [max(y for _, y in points[: i + 1]) for i in range(len(points))]
    return lambda n: _interp(xs, ys, n)


def step_cost_fn(cost: dict, batch: int, drafter: str | None = None, fit: str = "lower"):
    """seconds(nodes, depth=None) for `batch`. Whole-step rows (`spec_steps`) are used when the
    file has them for the drafter; otherwise the forward rows (drafting then counts as free).

    When some node count was timed at several depths (`calibrate cost --depths`), each depth has
    its own curve over nodes, and a tree is priced on the curve of its depth (the deepest measured
    one beyond it). Prices never decrease with nodes or depth. How noise is taken out (`fit`):
    - "lower" (the default): a measured point is priced at the cheapest point with at least its
      nodes and depth, root-only included (at most a one-node step's price). A step's time only
      grows with noise, so one slow grid point no longer raises every bigger tree's price: on
      the H200's pipelined batch-8 grid of 2026-12-03 a 2-node depth-1 point read 1.109 ms
      between 0.822 (1 node) and 0.871 (3 nodes), and priced every tree of 2+ nodes above 1.1 ms;
    - "max": a running maximum over nodes and then over shallower curves, as the shipped
      libraries before 2026-12-03 (evening) were searched.
    Otherwise there is one curve and `depth` is ignored. Root-only (n = 0) has its own row."""
    if fit not in COST_FITS:
        raise ValueError(f"cost fit must be one of {', '.join(COST_FITS)}, got {fit!r}")
    steps = [r for r in cost.get("spec_steps", {}).get(drafter or "", []) if r["batch"] == batch and r["latency_s"]]
    if steps:
        pts = [(r["nodes"], r.get("depth"), r["latency_s"]) for r in steps]
    else:
        fwd = [r for r in cost.get("forward", []) if r["batch"] == batch]
        if not fwd:
            have = sorted({r["batch"] for r in cost.get("forward", [])})
            raise ValueError(f"cost curve has no rows for batch {batch} (has {have})")
        pts = [(r["tokens_per_request"] - 1, None, r["latency_s"]) for r in fwd]
    by_nodes: dict[int, set] = {}
    for n, d, _ in pts:
        by_nodes.setdefault(n, set()).add(d)
    if not any(len(ds) > 1 for ds in by_nodes.values()):
        one = _monotone_curve([(n, y) for n, _, y in pts], fit)
        return lambda n, depth=None: one(n)
    root = [y for n, _, y in pts if n == 0]
    grid = [(n, d, y) for n, d, y in pts if n > 0]
    measured = sorted({d for _, d, _ in grid})
    curves = {}
    for d in measured:
        if fit == "lower":
            # each point of depth d at its cheapest measurement with >= its nodes and >= depth d
            own = sorted({n for n, dd, _ in grid if dd == d})
            ys = [min(y for nn, dd, y in grid if nn >= n and dd >= d) for n in own]
            curves[d] = functools.partial(_interp, own, ys)
        else:  # no root anchor: a curve starts at its shallowest measured tree (held flat below it)
            curves[d] = _monotone_curve([(n, y) for n, dd, y in grid if dd == d], fit)
    root_price = min(root) if root else None
    if fit == "lower" and root_price is not None:
        root_price = min(root_price, curves[measured[0]](1))

    def f(n: int, depth: int | None = None) -> float:
        if n == 0 and root_price is not None:
            return root_price
        d = measured[-1] if depth is None else min(max(depth, measured[0]), measured[-1])
        return max(curves[k](n) for k in measured if k <= d)
    return f


def load_cost(path) -> dict:
    src = str(path)
    d = read_json(path, CostError)
    if not isinstance(d, dict):
        raise CostError(src, "", "top level must be an object")
    if d.get("format") not in (COST_FORMAT, None):
        raise CostError(src, "format", f"must be {COST_FORMAT!r}, got {d.get('format')!r}")
    if "rows" in d and "forward" not in d:
        d["forward"] = d["rows"]  # a plain measure_step_latency dump (scripts/bench_*.py)
    if not d.get("forward") and not d.get("spec_steps"):
        raise CostError(src, "forward", "needs 'forward' rows or 'spec_steps' rows")
    for i, r in enumerate(d.get("forward", [])):
        for k in ("batch", "tokens_per_request", "latency_s"):
            if not isinstance(r.get(k), (int, float)) or isinstance(r.get(k), bool):
                raise CostError(src, f"forward[{i}].{k}", "missing or not a number")
    for name, rows in d.get("spec_steps", {}).items():
        for i, r in enumerate(rows):
            for k in ("batch", "nodes"):
                if not isinstance(r.get(k), int):
                    raise CostError(src, f"spec_steps.{name}[{i}].{k}", "missing or not an integer")
            if r.get("latency_s") is not None and not isinstance(r.get("latency_s"), (int, float)):
                raise CostError(src, f"spec_steps.{name}[{i}].latency_s", "not a number")
    return d
