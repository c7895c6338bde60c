"""Step latency as a function of batch size and new tokens per request (the cost curve).

`measure_step_latency` is what tree calibration uses to price a tree of n nodes at batch B
(verify cost = forward of B requests x (n+1) tokens over their contexts), and what
scripts/bench_forward.py prints. It allocates its own KV slots and frees them.
"""
from __future__ import annotations

import statistics
import time

import torch

from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step_latency(runner: ModelRunner, query_lens: list[int], batch_sizes: list[int] = (1,),
                         context_len: int = 512, repeats: int = 5, warmup: int = 2) -> list[dict]:
    """Median seconds of one forward where each of B requests has `context_len` cached tokens
    and `T` new tokens (causal mask; a tree mask costs the same in the sdpa backend)."""
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
                fb = ForwardBatch.build([torch.randint(100, 1000, (T,)) for _ in range(B)], ctx, new, device=dev)
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
