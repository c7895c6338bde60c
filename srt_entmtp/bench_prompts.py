"""Benchmark prompts per task family, never from the training split.

code: HumanEval; chat: MT-Bench (first turns); math and writing: the 5% of gsm8k_train and
writing_train that head training holds out (train/data.py's fixed, id-hashed split).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from srt_entmtp.train.data import default_prompts_dir, load_family, split_family

BENCH_FILES = {"code": "humaneval.jsonl", "chat": "mtbench.jsonl"}


def benchmark_prompts(family: str, n: int, seed: int = 0, max_chars: int = 1500,
                      prompts_dir: Path | None = None) -> list[dict]:
    d = Path(prompts_dir) if prompts_dir else default_prompts_dir()
    if family in BENCH_FILES:
        rows = [json.loads(x) for x in (d / BENCH_FILES[family]).read_text().split("\n") if x.strip()]
        rows = [{"id": r["id"], "task": family, "prompt": r["prompt"]} for r in rows]
    else:
        _, held = split_family(load_family(family, d))
        rows = [{"id": p.id, "task": family, "prompt": p.prompt} for p in held]
    rows = [r for r in rows if len(r["prompt"]) <= max_chars]
    return random.Random(seed).sample(rows, min(n, len(rows)))


BENCH_FAMILIES = ("code", "math", "chat", "writing")


def interleaved_chat_prompts(tokenize_chat, per_family: int, prompts_dir: Path | None = None,
                             families: tuple[str, ...] = BENCH_FAMILIES) -> list[tuple[str, list[int]]]:
    """(family, token ids) of up to `per_family` benchmark prompts a family, chat-templated by
    `tokenize_chat` (an Engine's) and interleaved, one family after another, so any prefix of the
    list mixes the families evenly."""
    by_fam = {f: [(f, tokenize_chat([{"role": "user", "content": p["prompt"]}]))
                  for p in benchmark_prompts(f, per_family, prompts_dir=prompts_dir)] for f in families}
    return [by_fam[f][i] for i in range(per_family) for f in families if i < len(by_fam[f])]


def cycled(pool: list, n: int) -> list:
    """n items of `pool`, starting over when it runs out (more requests than prompts)."""
    return [pool[i % len(pool)] for i in range(n)]
