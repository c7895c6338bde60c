#!/usr/bin/env python3
"""Forward latency vs new tokens T (batch 1, 512-token context) and autoregressive decode
tokens/s, for our runner and for transformers on the same weights, in one run.

    python scripts/bench_forward.py [--dtypes float32 bfloat16] [--out benchmarks/results/forward_cpu.json]

Prints a table, writes JSON. The same script runs on a GPU (--device cuda).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from srt_entmtp.calibrate.cost import measure_step_latency
from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.sched.request import SamplingParams


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hf_forward_latency(hf, T_list, context, repeats, warmup, dev):
    from transformers import DynamicCache

    ctx = torch.randint(100, 1000, (1, context), device=dev)
    rows = []
    with torch.no_grad():
        cache = DynamicCache()
        hf(ctx, past_key_values=cache, use_cache=True)
        for T in T_list:
            x = torch.randint(100, 1000, (1, T), device=dev)
            times = []
            for i in range(warmup + repeats):
                sync(dev)
                t0 = time.perf_counter()
                hf(x, past_key_values=cache, use_cache=True)
                sync(dev)
                cache.crop(-T)  # back to the bare context for the next repeat
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
            rows.append({"tokens_per_request": T, "latency_s": statistics.median(times)})
    return rows


def hf_decode_tps(hf, prompt_ids, n, dev):
    """Decode-only tokens/s: generate(n) minus generate(1) (the prefill and first token)."""
    x = torch.tensor([prompt_ids], device=dev)

    def timed(k):
        sync(dev)
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0)
        sync(dev)
        return time.perf_counter() - t0

    with torch.no_grad():
        timed(4)
        return (n - 1) / (timed(n) - timed(1))


def our_decode_tps(engine, prompt_ids, n):
    """Decode-only tokens/s: from the first output token to the last."""
    engine.generate([prompt_ids], SamplingParams(max_new_tokens=4, ignore_eos=True))
    req = engine.generate([prompt_ids], SamplingParams(max_new_tokens=n, ignore_eos=True))[0]
    return (len(req.output_ids) - 1) / (req.t_last_token - req.t_first_token)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--T", nargs="+", type=int, default=[1, 4, 8, 16, 32, 64, 128])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    p.add_argument("--out", default="benchmarks/results/forward_cpu.json")
    a = p.parse_args(argv)
    torch.manual_seed(0)
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "context": a.context, "date": time.strftime("%Y-%m-%d"), "runs": []}
    if a.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    for dt in a.dtypes:
        eng = Engine(EngineArgs(device=a.device, dtype=dt, kv_slots=4096, context_length=2048))
        runner: ModelRunner = eng.runner
        dev = runner.device
        ours = measure_step_latency(runner, a.T, [1], a.context, a.repeats)
        prompt = eng.tokenize_chat([{"role": "user", "content": "Explain how a hash map works, in detail."}])
        run = {"dtype": dt, "ours": ours, "ours_decode_tps": our_decode_tps(eng, prompt, a.decode_tokens)}
        if not a.no_hf:
            from transformers import AutoModelForCausalLM

            hf = AutoModelForCausalLM.from_pretrained(runner.model_dir, dtype=getattr(torch, dt)).to(dev).eval()
            run["hf"] = hf_forward_latency(hf, a.T, a.context, a.repeats, 2, dev)
            run["hf_decode_tps"] = hf_decode_tps(hf, prompt, a.decode_tokens, dev)
            del hf
        results["runs"].append(run)
        del eng, runner
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"\nforward latency, batch 1, {a.context}-token context ({results.get('gpu', results['machine'])}, "
          f"{results['threads']} threads)")
    print(f"{'dtype':<9} {'T':>4} {'ours ms':>9} {'hf ms':>9} {'hf/ours':>8}")
    for run in results["runs"]:
        for i, row in enumerate(run["ours"]):
            hf_ms = run["hf"][i]["latency_s"] * 1e3 if "hf" in run else float("nan")
            ours_ms = row["latency_s"] * 1e3
            print(f"{run['dtype']:<9} {row['tokens_per_request']:>4} {ours_ms:>9.1f} {hf_ms:>9.1f} {hf_ms / ours_ms:>8.2f}")
    print(f"\n{'dtype':<9} {'ours decode tok/s':>18} {'hf generate tok/s':>18}")
    for run in results["runs"]:
        print(f"{run['dtype']:<9} {run['ours_decode_tps']:>18.1f} {run.get('hf_decode_tps', float('nan')):>18.1f}")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
