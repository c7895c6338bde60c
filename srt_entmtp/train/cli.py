"""`train_heads`: self-distillation data, head training, evaluation and draft-time benchmark.

    python scripts/train_heads.py all --device cuda --out runs/heads      # everything, one GPU run
    python scripts/train_heads.py gen-data --out DIR ...                   # DIR/data/selfdistill.pt
    python scripts/train_heads.py train --kind mtp --out DIR ...           # DIR/mtp/ (+ DIR/ckpt/mtp.pt)
    python scripts/train_heads.py eval --out DIR                           # DIR/eval.json
    python scripts/train_heads.py bench [--heads DIR]                      # draft ms per step

Writes under DIR: medusa/, hydra/, mtp/ (heads: model.safetensors + config.json), eval.json,
train_log.json, heldout_ids.json, and data/ + ckpt/ (large, keep out of git).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("train_heads")

KINDS = ("medusa", "hydra", "mtp")
DEFAULT_DRAFT_VOCAB = {"medusa": 0, "hydra": 0, "mtp": 16384}
GEN_SHARE = 0.62  # of --budget-minutes: the heads overfit ~300k positions within a minute, data is the lever
SAVE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _kinds(s: str) -> list[str]:
    out = [k.strip() for k in s.split(",") if k.strip()]
    for k in out:
        if k not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown drafter kind {k!r}; choose from {', '.join(KINDS)}")
    return out


def _draft_vocab_arg(s: str) -> dict[str, int]:
    """'16384' for every kind, or 'mtp=16384,medusa=0'."""
    if "=" not in s:
        return {k: int(s) for k in KINDS}
    out = dict(DEFAULT_DRAFT_VOCAB)
    for part in s.split(","):
        k, v = part.split("=")
        if k not in KINDS:
            raise argparse.ArgumentTypeError(f"unknown drafter kind {k!r} in --draft-vocab")
        out[k] = int(v)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train_heads", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s, out_required=True):
        s.add_argument("--out", type=Path, required=out_required, help="output directory")
        s.add_argument("--device", default="auto", help="auto | cpu | cuda (default: cuda if available)")
        s.add_argument("--dtype", default="auto", help="base model dtype: auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
        s.add_argument("--model-path", default=None, help="base model directory (default: the shipped SmolLM2-135M-Instruct)")
        s.add_argument("--attention-backend", default=None,
                       help="sdpa | flashinfer | auto (default: auto for generation, which on CUDA means "
                            "FlashInfer with CUDA graphs, ~20x faster there; sdpa for teacher forcing)")
        s.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
        s.add_argument("--quiet", action="store_true", help="no progress bars")

    def gen_opts(s):
        g = s.add_argument_group("self-distillation data")
        g.add_argument("--per-family", type=int, default=0,
                       help="training prompts per task family (0 = all but the calibration reserve; a time budget may use fewer)")
        g.add_argument("--answers-per-prompt", type=int, default=1,
                       help="answers per training prompt; all but the first are sampled at --temperature")
        g.add_argument("--eval-per-family", type=int, default=40, help="held-out prompts per family answered for eval")
        g.add_argument("--families", default="code,math,chat,writing")
        g.add_argument("--max-new-tokens", type=int, default=256)
        g.add_argument("--max-prompt-tokens", type=int, default=768, help="skip longer prompts")
        g.add_argument("--gen-batch", type=int, default=256, help="concurrent requests while generating")
        g.add_argument("--sample-fraction", type=float, default=0.5, help="share of prompts answered by sampling")
        g.add_argument("--temperature", type=float, default=0.7, help="temperature of the sampled answers")
        g.add_argument("--prefill-chunk", type=int, default=4096, help="prompt tokens per prefill step")
        g.add_argument("--prompts-dir", type=Path, default=None)
        g.add_argument("--seed", type=int, default=0)

    def train_opts(s, kind_default="medusa,hydra,mtp"):
        g = s.add_argument_group("training")
        g.add_argument("--kind", type=_kinds, default=_kinds(kind_default), help="medusa | hydra | mtp, or a comma list")
        g.add_argument("--data", type=Path, default=None, help="data file (default OUT/data/selfdistill.pt)")
        g.add_argument("--steps", type=int, default=4000, help="optimizer steps per drafter (a time budget may lower it)")
        g.add_argument("--batch-positions", type=int, default=2048, help="positions per step")
        g.add_argument("--lr", type=float, default=2e-3)
        g.add_argument("--warmup", type=int, default=100)
        g.add_argument("--weight-decay", type=float, default=0.01)
        g.add_argument("--clip", type=float, default=1.0)
        g.add_argument("--feature-noise", type=float, default=0.0,
                       help="Gaussian noise on the heads' input hidden states while training, relative to "
                            "each row's RMS (0 = none; a regulariser)")
        g.add_argument("--draft-vocab", type=_draft_vocab_arg, default=dict(DEFAULT_DRAFT_VOCAB),
                       help="compressed draft vocabulary size: N for all kinds or kind=N,... (0 = full; "
                            f"default {DEFAULT_DRAFT_VOCAB})")
        g.add_argument("--medusa-heads", type=int, default=5)
        g.add_argument("--medusa-layers", type=int, default=1)
        g.add_argument("--hydra-heads", type=int, default=5)
        g.add_argument("--hydra-intermediate", type=int, default=1024)
        g.add_argument("--mtp-intermediate", type=int, default=2048)
        g.add_argument("--mtp-depth", type=int, default=5, help="depths the shared MTP block is unrolled to in training")
        g.add_argument("--mtp-depth-decay", type=float, default=0.8, help="loss weight of MTP depth d: decay**(d-1)")
        g.add_argument("--teacher-tokens", type=int, default=16384, help="tokens per teacher-forcing forward")
        g.add_argument("--ckpt-every", type=int, default=500)
        g.add_argument("--no-resume", action="store_true", help="ignore checkpoints in OUT/ckpt")
        g.add_argument("--save-dtype", default="bfloat16", choices=list(SAVE_DTYPES))
        g.add_argument("--eval-positions", type=int, default=20000)
        g.add_argument("--train-seconds", type=float, default=0,
                       help="time budget per drafter: fewer steps if --steps would not fit (0 = none)")
        g.add_argument("--train-seed", type=int, default=0)
        g.add_argument("--init-heads", type=Path, action="append", default=[], metavar="DIR",
                       help="start the kind in DIR/config.json from these trained heads (their arch and draft "
                            "vocabulary; the arch and --draft-vocab options are then ignored for it) instead "
                            "of from scratch; they are evaluated first on the same held-out positions. Repeatable")

    s = sub.add_parser("gen-data", help="generate the base model's own answers (self-distillation)")
    common(s)
    gen_opts(s)
    s.add_argument("--budget-minutes", type=float, default=0.0,
                   help="stop generating after this long, keeping what is done (0 = none)")
    s = sub.add_parser("train", help="train drafters on the data")
    common(s)
    train_opts(s, "medusa")
    s = sub.add_parser("eval", help="held-out accuracy of trained heads (OUT/<kind>/)")
    common(s)
    train_opts(s)
    s.add_argument("--heads", type=Path, action="append", default=None, help="heads dir(s) to evaluate instead")
    s = sub.add_parser("all", help="gen-data + train every kind + eval, in one process")
    common(s)
    gen_opts(s)
    train_opts(s)
    s.add_argument("--budget-minutes", type=float, default=8.0,
                   help="wall-clock target for the whole run (0 = none): generation stops "
                        "at 62%% of it, and each drafter trains for its share of what is left")
    s = sub.add_parser("bench", help="draft time per step, with and without a compressed vocabulary")
    common(s, out_required=False)
    s.add_argument("--kind", type=_kinds, default=_kinds("medusa,hydra,mtp"))
    s.add_argument("--heads", type=Path, action="append", default=None, help="trained heads dirs to time as well")
    s.add_argument("--nodes", type=int, default=32, help="tree size, root included")
    s.add_argument("--tree-depth", type=int, default=5)
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--vocab-sizes", default="0,16384,8192,4096", help="0 = full LM head")
    s.add_argument("--repeats", type=int, default=50)
    s.add_argument("--json", type=Path, default=None, help="write the rows here (default OUT/bench.json if --out)")
    return p


# ---- steps ------------------------------------------------------------------------------------------

def _device(ns) -> str:
    if ns.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return ns.device


def _engine(ns):
    from srt_entmtp.engine import Engine, EngineArgs

    ctx = ns.max_prompt_tokens + ns.max_new_tokens + 8
    # sized for the average request rather than the longest (the scheduler admits by reservation):
    # KVPool.alloc scans every slot, once per request and step
    slots = max(ns.gen_batch * (ns.max_prompt_tokens // 2 + ns.max_new_tokens) + 4096, ctx + 4096,
                getattr(ns, "teacher_tokens", 0))
    args = EngineArgs(model_path=ns.model_path, device=_device(ns), dtype=ns.dtype, context_length=max(ctx, 2048),
                      attention_backend=ns.attention_backend or "auto",
                      kv_slots=slots, max_running_requests=ns.gen_batch, max_waiting_requests=10**7,
                      chunked_prefill_size=ns.prefill_chunk, cuda_graph_max_bs=ns.gen_batch)
    return Engine(args)


def _runner(ns, slots: int):
    from srt_entmtp.model.runner import ModelRunner

    return ModelRunner(ns.model_path, dtype=ns.dtype, device=_device(ns), kv_slots=slots,
                       attention_backend=ns.attention_backend or "sdpa")


def _teacher_runner(ns, records):
    """A runner whose KV pool holds one teacher-forcing forward, or the longest sequence."""
    return _runner(ns, max(ns.teacher_tokens, max(len(r["tokens"]) for r in records)) + 64)


def _merge_json(path: Path, update: dict) -> dict:
    old = json.loads(path.read_text()) if path.is_file() else {}
    old.update(update)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(old, indent=1) + "\n")
    return old


def run_gen(ns, engine, time_budget_s: float | None = None) -> dict:
    from srt_entmtp.train.data import FAMILIES, GenConfig, gen_data

    fams = [f for f in ns.families.split(",") if f]
    for f in fams:
        if f not in FAMILIES:
            raise SystemExit(f"--families: unknown family {f!r}; choose from {', '.join(FAMILIES)}")
    cfg = GenConfig(max_new_tokens=ns.max_new_tokens, sample_fraction=ns.sample_fraction,
                    temperature=ns.temperature, seed=ns.seed, answers_per_prompt=ns.answers_per_prompt)
    meta = gen_data(engine, ns.out / "data" / "selfdistill.pt", per_family=ns.per_family,
                    eval_per_family=ns.eval_per_family, cfg=cfg, families=fams, prompts_dir=ns.prompts_dir,
                    progress=not ns.quiet, max_prompt_tokens=ns.max_prompt_tokens, time_budget_s=time_budget_s)
    (ns.out / "heldout_ids.json").write_text((ns.out / "data" / "heldout_ids.json").read_text())
    print(f"gen-data: {sum(meta['counts'].values())} sequences, {meta['answer_tokens']} answer tokens "
          f"in {meta['seconds']:.0f}s -> {ns.out / 'data' / 'selfdistill.pt'}", flush=True)
    _merge_json(ns.out / "train_log.json", {"gen": meta})
    return meta


def _init_heads(ns) -> dict[str, Path]:
    """--init-heads directories by kind, read once per command (a bad one fails before the data
    is read) and kept on ns for the drafters made later."""
    from srt_entmtp.spec.drafters.base import HeadsLoadError, heads_dirs_by_kind

    if not hasattr(ns, "init_by_kind"):
        try:
            ns.init_by_kind = heads_dirs_by_kind(getattr(ns, "init_heads", None), ns.kind, "--init-heads", "--kind")
        except HeadsLoadError as e:
            raise SystemExit(str(e)) from None
    return ns.init_by_kind


def _make_drafter(kind: str, runner, ns, records) -> object:
    from srt_entmtp.spec.drafters import create_drafter, load_drafter
    from srt_entmtp.train.data import draft_vocabulary

    init = _init_heads(ns).get(kind)
    if init is not None:  # continue training: its own arch and draft vocabulary, weights as saved
        drafter = load_drafter(init, runner)
        drafter.training_summary = {"init_from": {"heads": str(init), "training": drafter.training_summary}}
        return drafter.requires_grad_(True)
    nv = ns.draft_vocab.get(kind, 0)
    dv = None
    if nv:
        eos = [t for t in runner.config.eos_token_ids if t < runner.config.vocab_size]
        dv = draft_vocabulary(records, runner.config.vocab_size, nv, always=eos)
    arch = {"medusa": {"num_heads": ns.medusa_heads, "num_layers": ns.medusa_layers},
            "hydra": {"num_heads": ns.hydra_heads, "intermediate_size": ns.hydra_intermediate},
            "mtp": {"intermediate_size": ns.mtp_intermediate, "train_depth": ns.mtp_depth}}[kind]
    return create_drafter(kind, runner, draft_vocab=dv, **arch)


def _coverage(records, dv, vocab_size: int) -> float | None:
    """Share of held-out answer tokens inside the draft vocabulary."""
    if dv is None:
        return None
    from srt_entmtp.train.data import token_frequencies

    counts = token_frequencies(records, vocab_size, split="eval")
    inside = counts[dv.cpu()].sum()
    return round(float(inside) / max(1, int(counts.sum())), 4)


def run_train(ns, runner, records, teacher, deadline: float | None = None) -> dict:
    """Train, save and evaluate each kind; with a deadline (perf_counter), each kind gets an
    equal share of the time left (less a reserve for saving and evaluation)."""
    from srt_entmtp.train.trainer import TrainConfig, evaluate, format_eval, train

    logs, evals = {}, {}
    for i, kind in enumerate(ns.kind):
        budget = ns.train_seconds or None
        if deadline is not None:
            share = (deadline - time.perf_counter()) / (len(ns.kind) - i) - 10.0
            budget = max(20.0, share) if budget is None else min(budget, max(20.0, share))
        drafter = _make_drafter(kind, runner, ns, records)
        if kind in _init_heads(ns) and "eval" in teacher.starts:
            ev = evaluate(drafter, teacher, "eval", max_positions=ns.eval_positions)
            print(f"init heads {kind}, before training:\n" + format_eval(ev), flush=True)
            evals[f"{kind}_init"] = ev
        depth = drafter.trained_depth if kind == "mtp" else drafter.max_depth
        cfg = TrainConfig(steps=ns.steps, batch_positions=ns.batch_positions, depth=depth, lr=ns.lr,
                          weight_decay=ns.weight_decay, warmup=min(ns.warmup, max(1, ns.steps // 10)), clip=ns.clip,
                          feature_noise=ns.feature_noise,
                          depth_decay=ns.mtp_depth_decay if kind == "mtp" else 1.0, seed=ns.train_seed,
                          ckpt_every=ns.ckpt_every)
        print(f"train {kind}: arch {drafter.arch()}, draft vocab {drafter.draft_vocab_size}, "
              f"{sum(p.numel() for p in drafter.parameters()) / 1e6:.2f}M params, depth {depth}, "
              f"{teacher.starts['train'].numel()} train positions", flush=True)
        res = train(drafter, teacher, cfg, ckpt_path=ns.out / "ckpt" / f"{kind}.pt", resume=not ns.no_resume,
                    progress=not ns.quiet, time_budget_s=budget)
        cov = _coverage(records, drafter.draft_vocab, runner.config.vocab_size)
        if cov is not None:
            drafter.training_summary["draft_vocab_coverage_eval"] = cov
        drafter.training_summary["data"] = {"sequences": len(records), "file": "data/selfdistill.pt"}
        heads_dir = drafter.save(ns.out / kind, dtype=SAVE_DTYPES[ns.save_dtype])
        size = (heads_dir / "model.safetensors").stat().st_size
        res["summary"]["file_bytes"] = size
        print(f"train {kind}: final loss {res['summary']['final_loss']:.4f} in {res['summary']['seconds']:.0f}s; "
              f"saved {heads_dir} ({size / 2**20:.2f} MiB)", flush=True)
        logs[kind] = res
        if "eval" in teacher.starts:
            from srt_entmtp.spec.drafters import load_drafter

            loaded = load_drafter(heads_dir, runner)  # evaluate what was saved, in the serving dtype
            ev = evaluate(loaded, teacher, "eval", max_positions=ns.eval_positions)
            print(format_eval(ev), flush=True)
            evals[kind] = ev
        _merge_json(ns.out / "train_log.json", {kind: res})
        if evals:
            _merge_json(ns.out / "eval.json", {k: v for k, v in evals.items() if k in (kind, f"{kind}_init")})
        del drafter
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"train": logs, "eval": evals}


def _load_data(ns):
    from srt_entmtp.train.data import load_records

    path = ns.data or ns.out / "data" / "selfdistill.pt"
    if not path.is_file():
        raise SystemExit(f"{path}: no data; run gen-data first (or pass --data)")
    return load_records(path)


def _teacher(ns, runner, records):
    from srt_entmtp.train.trainer import TeacherData

    t = TeacherData.build(runner, records, max_tokens=ns.teacher_tokens, progress=not ns.quiet)
    n = {k: int(v.numel()) for k, v in t.starts.items()}
    print(f"teacher forcing: {t.tokens.numel()} tokens in {t.seconds:.1f}s; positions {n}", flush=True)
    _merge_json(ns.out / "train_log.json", {"teacher": {"tokens": int(t.tokens.numel()), "positions": n,
                                                         "seconds": round(t.seconds, 1)}})
    return t


def cmd_gen(ns) -> int:
    run_gen(ns, _engine(ns), ns.budget_minutes * 60 if ns.budget_minutes > 0 else None)
    return 0


def cmd_train(ns) -> int:
    _init_heads(ns)
    records, _ = _load_data(ns)
    runner = _teacher_runner(ns, records)
    run_train(ns, runner, records, _teacher(ns, runner, records))
    return 0


def cmd_eval(ns) -> int:
    from srt_entmtp.spec.drafters import load_drafter
    from srt_entmtp.train.trainer import evaluate, format_eval

    records, _ = _load_data(ns)
    runner = _teacher_runner(ns, records)
    teacher = _teacher(ns, runner, records)
    dirs = ns.heads or [ns.out / k for k in ns.kind if (ns.out / k / "config.json").is_file()]
    if not dirs:
        raise SystemExit(f"no heads under {ns.out} (expected {', '.join(str(ns.out / k) for k in ns.kind)})")
    out = {}
    for d in dirs:
        drafter = load_drafter(d, runner)
        ev = evaluate(drafter, teacher, "eval", max_positions=ns.eval_positions)
        print(format_eval(ev), flush=True)
        out[drafter.kind if not ns.heads else str(d)] = ev
    _merge_json(ns.out / "eval.json", out)
    return 0


def cmd_all(ns) -> int:
    _init_heads(ns)
    t0 = time.perf_counter()
    engine = _engine(ns)
    print(f"model {engine.model_name} on {engine.runner.device} ({engine.runner.dtype}), "
          f"loaded in {time.perf_counter() - t0:.1f}s", flush=True)
    budget = ns.budget_minutes * 60 if ns.budget_minutes > 0 else None
    run_gen(ns, engine, None if budget is None else GEN_SHARE * budget - (time.perf_counter() - t0))
    device = engine.runner.device
    del engine  # its KV pool and graphs; training runs on a runner of its own, as `train` does
    if device.type == "cuda":
        torch.cuda.empty_cache()
    records, _ = _load_data(ns)
    runner = _teacher_runner(ns, records)
    teacher = _teacher(ns, runner, records)
    res = run_train(ns, runner, records, teacher, None if budget is None else t0 + budget)
    total = time.perf_counter() - t0
    _merge_json(ns.out / "train_log.json", {"total_seconds": round(total, 1), "device": str(device),
                                            "torch": torch.__version__})
    print(f"all: done in {total:.0f}s; heads in {', '.join(str(ns.out / k) for k in res['train'])}; "
          f"eval.json, train_log.json in {ns.out}", flush=True)
    return 0


def cmd_bench(ns) -> int:
    from srt_entmtp.spec.drafters import load_drafter
    from srt_entmtp.spec.drafters.bench import bench_tree, benchmark, format_rows

    runner = _runner(ns, 4096 + 64 * ns.nodes * ns.batch)
    drafters = {}
    for d in ns.heads or []:
        h = load_drafter(d, runner)
        drafters[h.kind] = h
    tree = bench_tree(ns.nodes, ns.tree_depth)
    sizes = [int(x) for x in ns.vocab_sizes.split(",") if x.strip()]
    rows = benchmark(runner, kinds=ns.kind, vocab_sizes=sizes, tree=tree, batch_size=ns.batch, repeats=ns.repeats,
                     drafters=drafters, runner=runner)
    print(f"device {runner.device} ({runner.dtype}), threads {torch.get_num_threads()}, tree {tree.name}")
    print(format_rows(rows))
    path = ns.json or (ns.out / "bench.json" if ns.out else None)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": str(runner.device), "dtype": str(runner.dtype),
                                    "threads": torch.get_num_threads(), "tree": tree.to_json(), "rows": rows},
                                   indent=1) + "\n")
    return 0


COMMANDS = {"gen-data": cmd_gen, "train": cmd_train, "eval": cmd_eval, "all": cmd_all, "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    if ns.out is not None:
        ns.out.mkdir(parents=True, exist_ok=True)
    return COMMANDS[ns.cmd](ns)


if __name__ == "__main__":
    sys.exit(main())
