"""The rule-based task classifier: per-file accuracy on the shared prompt sets, with floors.

Labels are per file (`task`), so mtbench/sharegpt count as "chat" even where a prompt is really a
coding or math request; their accuracy is a floor on "not misrouting chat", not the whole story.
Run with -s to print the table (copied into docs/tree_library.md).
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest

from srt_entmtp.spec.classify import classify_task

REPO = Path(__file__).resolve().parents[2]
FLOORS = {  # measured: 0.991, 1.000, 0.588, 0.681, 0.999
    "gsm8k_train.jsonl": 0.98,
    "humaneval.jsonl": 0.99,
    "mtbench.jsonl": 0.55,
    "sharegpt_train.jsonl": 0.65,
    "writing_train.jsonl": 0.99,
}
MTBENCH_CATEGORY = {"coding": "code", "math": "math", "writing": "writing"}  # everything else: chat


def prompts_dir() -> Path | None:
    env = os.environ.get("ENTMTP_PROMPTS_DIR")
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "data" / "prompts", REPO / "shared" / "data" / "prompts"]
    return next((c for c in candidates if c.is_dir()), None)


def load(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def test_accuracy_table():
    root = prompts_dir()
    if root is None:
        pytest.skip("prompt sets not found: set ENTMTP_PROMPTS_DIR or put them in ../shared/data/prompts")
    rows, failures = [], []
    for name, floor in FLOORS.items():
        path = root / name
        if not path.exists():
            failures.append(f"{name}: missing in {root}")
            continue
        data = load(path)
        pred = [classify_task(r["prompt"]) for r in data]
        got = collections.Counter(pred)
        acc = sum(p == r["task"] for p, r in zip(pred, data)) / len(data)
        label = data[0]["task"]
        rows.append(f"| {name} | {label} | {len(data)} | {acc:.3f} | {floor:.2f} | "
                    + ", ".join(f"{k} {v}" for k, v in got.most_common()) + " |")
        if acc < floor:
            failures.append(f"{name}: accuracy {acc:.3f} < floor {floor}")
        if name == "mtbench.jsonl":
            by_cat = [MTBENCH_CATEGORY.get(r.get("category"), "chat") == p for p, r in zip(pred, data)]
            rows.append(f"| mtbench.jsonl by `category` | mixed | {len(data)} | {sum(by_cat) / len(data):.3f} | - | |")
    print("\n| file | label | prompts | accuracy | floor | predicted |\n|---|---|---|---|---|---|\n" + "\n".join(rows))
    assert not failures, failures


@pytest.mark.parametrize("prompt, family", [
    ("Complete the following Python function:\n```python\ndef f(x):\n```", "code"),
    ("how do I reverse a linked list in rust", "code"),
    ("Write a SQL query that counts users per country", "code"),
    ("Write a function that returns the n-th prime", "code"),
    ("Janet has 3 apples and buys 5 more for $2 each. How much did she spend?", "math"),
    ("What is the probability of rolling two sixes with two dice?", "math"),
    ("Write a short story about a lighthouse keeper who befriends a whale.", "writing"),
    ("Compose a haiku about autumn", "writing"),
    ("What are some tips for a job interview?", "chat"),
    ("Tell me about the history of the Roman empire", "chat"),
    ("", "chat"),
])
def test_examples(prompt, family):
    assert classify_task(prompt) == family
