"""Step latency as a function of batch size and new tokens per request (the cost curve).

`measure_step_latency` is what tree calibration uses to price a tree of n nodes at batch B
(verify cost = forward of B requests x (n+1) tokens over their contexts), and what
scripts/bench_forward.py prints. It allocates its own KV slots and frees them.
"""
from __future__ import annotations

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


def chain_like_tree(num_nodes: int, max_depth: int):
    """A deterministic tree of `num_nodes` non-root nodes shaped like calibrated ones (deep first,
    then widening), used only to time a step of that size."""
    from srt_entmtp.spec.drafters.bench import bench_tree
    from srt_entmtp.spec.tree import Tree

    if num_nodes == 0:
        return Tree.from_paths([])
    return bench_tree(num_nodes + 1, max_depth=max_depth)


def measure_spec_steps(engine, node_counts: list[int], batch_sizes: list[int] = (1,), steps: int = 8,
                       prompt_len: int = 256) -> list[dict]:
    """Median wall time of one whole decode step (policy, draft, verify forward, acceptance, KV
    compaction, entropy update: everything the engine does per step) with a static tree of n
    non-root nodes, for B running requests with `prompt_len`-token prompts. n = 0 is a root-only
    tree: the speculative engine decoding one token per step."""
    from srt_entmtp.sched.request import SamplingParams, Status
    from srt_entmtp.spec.policy import StaticPolicy

    w, sched = engine.worker, engine.scheduler
    old_policy, old_max = w.policy, w.max_nodes
    depth = min(w.drafter.max_depth, 6)
    g = torch.Generator().manual_seed(0)
    rows = []
    try:
        for B in batch_sizes:
            if B > sched.max_running:
                raise ValueError(f"batch {B} exceeds the engine's max_running_requests ({sched.max_running})")
            prompts = [torch.randint(100, 20000, (prompt_len,), generator=g).tolist() for _ in range(B)]
            for n in node_counts:
                tree = chain_like_tree(n, depth)
                w.policy = w.confidence.base = StaticPolicy(tree)
                w.max_nodes = max(old_max, tree.num_nodes)
                budget = 2 * (steps + 2) * (tree.depth + 1) + 16
                reqs = [engine.make_request(p, SamplingParams(max_new_tokens=budget, ignore_eos=True)) for p in prompts]
                for r in reqs:
                    sched.add(r, bounded=False)
                times = []
                while len(times) < steps and not any(r.finished for r in reqs):
                    decoding = all(r.status is Status.DECODE for r in reqs)
                    _sync(engine.runner.device)
                    t0 = time.perf_counter()
                    sched.step()
                    _sync(engine.runner.device)
                    if decoding:
                        times.append(time.perf_counter() - t0)
                for r in reqs:
                    sched.abort(r.rid)
                while sched.has_work():
                    sched.step()
                rows.append({"batch": B, "nodes": n, "tokens_per_request": n + 1, "depth": tree.depth,
                             "latency_s": statistics.median(times) if times else None, "samples": len(times)})
    finally:
        w.policy = w.confidence.base = old_policy
        w.max_nodes = old_max
    return rows


def step_cost_fn(cost: dict, batch: int, drafter: str | None = None):
    """seconds(nodes) for `batch`, linear between measured node counts (held flat beyond them).
    Whole-step rows (`spec_steps`) are used when the file has them for the drafter; otherwise the
    forward rows plus the drafter's draft rows (if any)."""
    steps = [r for r in cost.get("spec_steps", {}).get(drafter or "", []) if r["batch"] == batch and r["latency_s"]]
    if steps:
        xs = [r["nodes"] for r in steps]
        ys = [r["latency_s"] for r in steps]
    else:
        fwd = [r for r in cost.get("forward", []) if r["batch"] == batch]
        if not fwd:
            have = sorted({r["batch"] for r in cost.get("forward", [])})
            raise ValueError(f"cost curve has no rows for batch {batch} (has {have})")
        xs = [r["tokens_per_request"] - 1 for r in fwd]
        ys = [r["latency_s"] for r in fwd]
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    xs, ys = [xs[i] for i in order], [ys[i] for i in order]
    # a bigger tree never costs less: a dip in the measurements is noise, so take the running max
    ys = [max(ys[: i + 1]) for i in range(len(ys))]

    def f(n: int) -> float:
        if n <= xs[0]:
            return ys[0]
        for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
            if n <= x1:
                return y0 + (y1 - y0) * (n - x0) / (x1 - x0)
        return ys[-1] * (n + 1) / (xs[-1] + 1)  # beyond the last row: proportional to tokens
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
