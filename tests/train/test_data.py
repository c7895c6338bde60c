"""Self-distillation data: prompts, held-out split, generated records, the data file, draft vocab."""
from __future__ import annotations

import re
import time

import pytest
import torch

from srt_entmtp.train import data as D


def test_records_are_prompt_plus_the_engines_answer(engine, records, prompts):
    PROMPTS = prompts
    assert [r["id"] for r in records] == [p.id for p in PROMPTS] + [p.id for p in PROMPTS[:2]]
    for r, p in zip(records, PROMPTS + PROMPTS[:2]):
        prompt_ids = engine.tokenize_chat([{"role": "user", "content": p.prompt}])
        assert r["tokens"][: r["prompt_len"]] == prompt_ids and r["prompt_len"] == len(prompt_ids)
        n = len(r["tokens"]) - r["prompt_len"]
        limit = 20 if r["split"] == "train" else 12
        assert 1 <= n <= limit
        assert (r["finish"] == "length") == (n == limit and r["tokens"][-1] not in engine.eos_ids)
        assert r["task"] == p.task
    assert {r["mode"] for r in records if r["split"] == "eval"} == {"greedy"}
    assert {r["mode"] for r in records if r["split"] == "train"} <= {"greedy", "sampled"}


def test_data_file_round_trip(records, tmp_path):
    f = tmp_path / "d" / "selfdistill.pt"
    D.save_records(f, records, {"base_model": "x"})
    back, meta = D.load_records(f)
    assert meta == {"base_model": "x"} and back == records
    with pytest.raises(ValueError, match="not an entmtp-selfdistill file"):
        torch.save({"format": "other"}, tmp_path / "bad.pt")
        D.load_records(tmp_path / "bad.pt")


def test_heldout_split_is_fixed_five_percent():
    from tests.conftest import prompts_dir

    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    for fam in ("math", "writing"):
        prompts = D.load_family(fam)
        train, held = D.split_family(prompts)
        assert len(held) == round(0.05 * len(prompts)) and len(train) + len(held) == len(prompts)
        assert not {p.id for p in train} & {p.id for p in held}
        # fixed: independent of the order the prompts come in
        again = D.split_family(list(reversed(prompts)))[1]
        assert [p.id for p in again] == [p.id for p in held]
    ids = D.heldout_ids(families=["math"])
    chosen, held = D.select_prompts(per_family=30, eval_per_family=5, families=["math"])
    assert held == ids and len(ids["math"]) == 100
    assert all(p.id in ids["math"] for p in chosen["eval"]) and len(chosen["eval"]) == 5
    assert not any(p.id in ids["math"] for p in chosen["train"]) and len(chosen["train"]) == 30
    assert not any(name in D.PROMPT_FILES.values() for name in D.BENCHMARK_ONLY)
    with pytest.raises(ValueError, match="unknown task family"):
        D.load_family("humaneval")


def test_calibration_reserve_is_never_trained_on():
    from srt_entmtp.calibrate.stats import calibration_prompts
    from tests.conftest import prompts_dir

    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    train, _ = D.split_family(D.load_family("writing"))
    trainable, reserve = D.trainable_and_calibration(train)
    assert len(reserve) == D.CALIBRATION_RESERVE and trainable + reserve == train
    chosen, _ = D.select_prompts(per_family=0, eval_per_family=0, families=["writing"])  # 0 = all trainable
    assert [p.id for p in chosen["train"]] == [p.id for p in trainable]
    calib = calibration_prompts("writing", 1000)
    assert calib and {p.id for p in calib} <= {p.id for p in reserve}
    assert not {p.id for p in calib} & {p.id for p in chosen["train"]}
    # a tiny split keeps half for training
    few = [D.Prompt(f"p{i}", "math", "x") for i in range(10)]
    assert [len(x) for x in D.trainable_and_calibration(few)] == [5, 5]


def test_several_answers_per_prompt_the_extra_ones_sampled(engine, prompts):
    torch.manual_seed(0)
    cfg = D.GenConfig(max_new_tokens=6, sample_fraction=0.0, answers_per_prompt=3, seed=2)
    recs = D.generate_answers(engine, prompts[:2], cfg, "train", progress=False)
    assert [r["id"] for r in recs] == [prompts[0].id] * 3 + [prompts[1].id] * 3
    assert [r["mode"] for r in recs] == ["greedy", "sampled", "sampled"] * 2
    assert all(r["tokens"][:r["prompt_len"]] == recs[3 * (i // 3)]["tokens"][:r["prompt_len"]]
               for i, r in enumerate(recs))
    # held-out prompts get one (greedy-or-sampled by fraction) answer each, whatever the setting
    ev = D.generate_answers(engine, prompts[:2], cfg, "eval", progress=False)
    assert [r["id"] for r in ev] == [p.id for p in prompts[:2]] and {r["mode"] for r in ev} == {"greedy"}


def test_code_prompts_from_the_standard_library():
    prompts = D.stdlib_code_prompts()
    assert len(prompts) > 1000 and len({p.id for p in prompts}) == len(prompts)
    pat = re.compile(r'^Complete the following Python function:\n```python\ndef \w+\(.*\):\n    """.+"""\n```$', re.DOTALL)
    assert all(pat.match(p.prompt) for p in prompts), next(p.prompt for p in prompts if not pat.match(p.prompt))
    assert all(p.task == "code" and p.id.startswith("stdlib_") for p in prompts)
    by_id = {p.id: p for p in prompts}
    assert "def dedent(text):" in by_id["stdlib_textwrap.dedent"].prompt


def test_draft_vocabulary_most_frequent_answer_tokens():
    recs = [{"split": "train", "prompt_len": 2, "tokens": [9, 9, 5, 5, 5, 3, 3, 7, 1]},
            {"split": "train", "prompt_len": 1, "tokens": [8, 3, 7]},
            {"split": "eval", "prompt_len": 0, "tokens": [6, 6, 6, 6]}]
    # answer counts: 5 x3, 3 x3, 7 x2, 1 x1; ties by id; eval split and prompts ignored
    assert D.draft_vocabulary(recs, 10, 3).tolist() == [3, 5, 7]
    assert D.draft_vocabulary(recs, 10, 4, always=[2]).tolist() == [2, 3, 5, 7]
    with pytest.raises(ValueError, match="draft vocabulary size"):
        D.draft_vocabulary(recs, 10, 10)


def test_generation_deadline_aborts_cleanly(engine, prompts):
    free = engine.runner.kv.num_free
    got = D.generate_answers(engine, prompts, D.GenConfig(max_new_tokens=16), "train", progress=False,
                             deadline=time.perf_counter())
    assert got == [] and not engine.scheduler.has_work() and engine.runner.kv.num_free == free
