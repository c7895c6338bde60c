"""scripts/profile_gpu_run.py on the CPU: its step classes account for a real offline run."""
import importlib.util
from pathlib import Path

from srt_entmtp.engine import Engine, EngineArgs

REPO = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("profile_gpu_run", REPO / "scripts" / "profile_gpu_run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
