"""A handful of self-distilled sequences, generated once per session by the real Engine."""
from __future__ import annotations

import pytest
import torch

from srt_entmtp.train.data import GenConfig, Prompt, generate_answers

PROMPTS = [
    Prompt("t_code", "code", "Complete the following Python function:\n```python\ndef add(a, b):\n    \"\"\"Return a + b.\"\"\"\n```"),
    Prompt("t_math", "math", "What is 12 times 7? Answer briefly."),
    Prompt("t_chat", "chat", "Name three colours."),
    Prompt("t_writing", "writing", "Write one sentence about the sea."),
]


@pytest.fixture(scope="session")
def prompts():
    return list(PROMPTS)


@pytest.fixture(scope="session")
def engine():
    from srt_entmtp.engine import Engine, EngineArgs

    return Engine(EngineArgs(device="cpu", dtype="float32", kv_slots=4096, max_running_requests=8,
                             max_waiting_requests=64, context_length=1024))


@pytest.fixture(scope="session")
def records(engine):
    torch.manual_seed(0)
    train = generate_answers(engine, PROMPTS, GenConfig(max_new_tokens=20, sample_fraction=0.5, seed=1), "train",
                             progress=False)
    ev = generate_answers(engine, PROMPTS[:2], GenConfig(max_new_tokens=12, sample_fraction=0.0), "eval",
                          progress=False)
    return train + ev


@pytest.fixture(scope="session")
def teacher(engine, records):
    from srt_entmtp.train.trainer import TeacherData

    return TeacherData.build(engine.runner, records, max_tokens=2048, progress=False)
