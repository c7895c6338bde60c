"""scripts/profile_gpu_run.py on the CPU: its step classes account for a real offline run."""
from srt_entmtp.engine import Engine, EngineArgs
from tests.conftest import load_script


def _script():
    return load_script("profile_gpu_run")


def test_profile_run_classes_cover_every_step_and_token(runner):
    mod = _script()
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=4096, context_length=1024,
                            max_running_requests=2, chunked_prefill_size=512))
    prompts = [(f, eng.tokenize_chat([{"role": "user", "content": p}]))
               for f, p in [("code", "Write a sum function."), ("math", "What is 7 * 8?"), ("chat", "Hi there!")]]
    before = eng.scheduler.stats["prefill_steps"]
    res = mod.timed_run(eng, prompts, 5, concurrency=2)
    cls = res["classes"]
    assert res["tokens"] == 3 * 5
    assert sum(c["tokens"] for c in cls.values()) == res["tokens"]  # every token counted once
    assert sum(c["steps"] for c in cls.values()) == len(res["trace"])
    # the third request waits for a slot: a second prefill, then a changed batch
    assert cls["prefill"]["steps"] == eng.scheduler.stats["prefill_steps"] - before >= 2
    assert cls["decode, changed"]["steps"] >= 1 and cls["decode, full"]["steps"] >= 1
    assert 0.9 < sum(c["share"] for c in cls.values()) <= 1.0 + 1e-9
    assert res["steady_full_tokens_per_s"] > 0
    # every prompt chunk here is serial (read at once): each one timed, its forward within its wall time
    chunks = res["serial_chunks"]
    assert chunks["count"] == cls["prefill"]["steps"]
    assert chunks["forward_ms"] > 0 and chunks["wall_ms"] >= chunks["forward_ms"]
    assert chunks["tokens"] >= 5 and 1 <= chunks["requests"] <= 2
    assert abs(chunks["queued_ms"]) < chunks["wall_ms"]


def test_bench_requests_interleave_families_with_the_real_prompts_and_tokenizer(runner):
    """The prompt list bench_gpu.py part c and profile_gpu_run.py share (srt_entmtp.bench_prompts)."""
    import pytest

    from srt_entmtp.bench_prompts import BENCH_FAMILIES, cycled, interleaved_chat_prompts
    from tests.conftest import prompts_dir

    if prompts_dir() is None:
        pytest.skip("shared/data/prompts not found beside the repo (set ENTMTP_PROMPTS_DIR)")
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=1024, context_length=1024))
    pool = interleaved_chat_prompts(eng.tokenize_chat, 2, prompts_dir())
    assert [f for f, _ in pool] == list(BENCH_FAMILIES) * 2  # one of each family in turn
    assert all(ids and isinstance(ids[0], int) for _, ids in pool)
    assert len({tuple(ids) for _, ids in pool}) == len(pool)
    reqs = _script().build_prompts(eng, 10, prompts_dir())  # 10 requests: 3 prompts a family, 12 in the pool
    assert reqs == interleaved_chat_prompts(eng.tokenize_chat, 3, prompts_dir())[:10]
    assert cycled([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]


def test_bench_library_set_loads_every_batch_library_as_serve_does(tmp_path):
    """bench_gpu.py --library-set hands an engine every <drafter>_gpu_b<B>.json of the directory
    (not the reports), smallest batch first, and takes STATIC's tree from the largest B <= C."""
    import json
    from types import SimpleNamespace

    import pytest

    mod = load_script("bench_gpu")
    for b in (64, 1, 8):
        (tmp_path / f"mtp_gpu_b{b}.json").write_text("{}")
        report = {"families": {"general": {"static_best": [[0]] * b if b < 64 else [[0]]}}}
        (tmp_path / f"mtp_gpu_b{b}.report.json").write_text(json.dumps(report))
    ns = SimpleNamespace(library_dir=str(tmp_path), library_set=True)
    files = ",".join(str(tmp_path / f"mtp_gpu_b{b}.json") for b in (1, 8, 64))
    assert mod.library_for(ns, "mtp", 4) == (files, [[0]])        # b1's report: 1 <= 4 < 8
    assert mod.library_for(ns, "mtp", 8) == (files, [[0]] * 8)
    assert mod.library_for(ns, "mtp", 32)[1] == [[0]] * 8
    ns.library_set = False
    assert mod.library_for(ns, "mtp", 8) == (str(tmp_path / "mtp_gpu_b8.json"), [[0]] * 8)
    ns.library_set = True
    with pytest.raises(SystemExit, match="no hydra_gpu_b"):
        mod.library_for(ns, "hydra", 8)
