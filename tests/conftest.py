"""Shared fixtures: the real default model, loaded once per test session."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(min(2, os.cpu_count() or 1))
# without CUDA, Triton kernels (where triton is installed) run in its interpreter; this must be set
# before triton is first imported, which the engine's modules do at import
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def load_script(name: str):
    """scripts/<name>.py as a module (the scripts are not a package), for tests of their CPU parts."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def prompts_dir() -> Path | None:
    env = os.environ.get("ENTMTP_PROMPTS_DIR")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared/data/prompts", REPO / "shared/data/prompts"]:
        if cand.is_dir():
            return cand
    return None


def load_prompts(per_family: int, seed: int = 0) -> list[dict]:
    """A fixed sample of prompts from every prompt set (rows have task and prompt)."""
    d = prompts_dir()
    if d is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    out = []
    for name in ["humaneval.jsonl", "gsm8k_train.jsonl", "mtbench.jsonl", "sharegpt_train.jsonl", "writing_train.jsonl"]:
        rows = [json.loads(line) for line in (d / name).read_text().split("\n") if line.strip()]
        rows = [r for r in rows if len(r["prompt"]) < 600]  # keep CPU prefill short
        out += random.Random(seed).sample(rows, per_family)
    return out


@pytest.fixture(scope="session")
def runner():
    from srt_entmtp.model.runner import ModelRunner

    return ModelRunner(kv_slots=8192, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def hf_model(runner):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(runner.model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tokenizer(runner):
    from srt_entmtp.model.tokenizer import load_tokenizer

    return load_tokenizer(runner.model_dir)


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only with ENTMTP_SLOW=1 (`make test-all`): CI (`make test`) must stay under 20 minutes."""
    if os.environ.get("ENTMTP_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: runs with ENTMTP_SLOW=1 (make test-all)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
