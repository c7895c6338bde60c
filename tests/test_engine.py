"""The engine and scheduler on the real model: chunked prefill, continuous batching, stop rules,
KV accounting, seeded sampling, and the `entmtp generate` command."""
from __future__ import annotations

import subprocess
import sys

import pytest

from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import ParamError, SamplingParams
from tests.conftest import REPO, load_prompts


@pytest.fixture(scope="module")
def engine(runner):
    return Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                             max_running_requests=4, chunked_prefill_size=64))


def _prompts(engine, n):
    return [engine.tokenize_chat([{"role": "user", "content": r["prompt"]}]) for r in load_prompts(1)][:n]


def test_chunked_prefill_and_batching_do_not_change_greedy_tokens(engine):
    prompts = _prompts(engine, 5)
    assert max(len(p) for p in prompts) > 64, "some prompt must span several prefill chunks"
    sp = SamplingParams(max_new_tokens=12, ignore_eos=True)
    together = engine.generate(prompts, sp)  # 5 requests, at most 4 running: one waits its turn
    alone = [engine.generate([p], sp)[0] for p in prompts]
    for a, b in zip(together, alone):
        assert a.output_ids == b.output_ids
        assert a.finish_reason == "length" and len(a.output_ids) == 12
    assert engine.scheduler.stats["prefill_steps"] > 5


def test_kv_slots_return_after_requests_finish(engine):
    free0 = engine.runner.kv.num_free
    engine.generate(_prompts(engine, 3), SamplingParams(max_new_tokens=5))
    assert engine.runner.kv.num_free == free0


def test_stop_token_ids_and_stop_strings(engine):
    p = engine.tokenize_chat([{"role": "user", "content": "Count from 1 to 20, separated by commas."}])
    free_run = engine.generate([p], SamplingParams(max_new_tokens=40, ignore_eos=True))[0]
    text = engine.detok.text(free_run)
    stop_id = free_run.output_ids[5]
    r = engine.generate([p], SamplingParams(max_new_tokens=40, stop_token_ids=[stop_id]))[0]
    assert r.finish_reason == "stop" and r.output_ids == free_run.output_ids[: free_run.output_ids.index(stop_id) + 1]
    stop = text[10:13]
    r = engine.generate([p], SamplingParams(max_new_tokens=40, stop=[stop]))[0]
    assert r.finish_reason == "stop"
    assert engine.detok.text(r) == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    p = engine.tokenize_chat([{"role": "user", "content": "Write a sentence about the sea."}])
    sp = {"temperature": 0.9, "top_p": 0.95, "max_new_tokens": 16, "ignore_eos": True}
    a = engine.generate([p], SamplingParams(seed=1, **sp))[0].output_ids
    other = _prompts(engine, 2)
    b = engine.generate([p] + other, [SamplingParams(seed=1, **sp)] + [SamplingParams(temperature=1.0)] * 2)[0]
    c = [engine.generate([p], SamplingParams(seed=s, **sp))[0].output_ids for s in (2, 3, 4)]
    assert a == b.output_ids, "a seeded request must not depend on what it is batched with"
    assert any(x != a for x in c)


def test_context_length_error_names_both_numbers(engine):
    with pytest.raises(ParamError, match=r"context length is 2048 tokens; the prompt has 3 .* asks for 4000"):
        engine.make_request([1, 2, 3], SamplingParams(max_new_tokens=4000))


def test_cli_generate_streams_text_and_reports_speed(runner):
    res = subprocess.run([sys.executable, "-m", "srt_entmtp.cli", "generate", "--chat", "--prompt", "Say hello.",
                          "--max-new-tokens", "8", "--model-path", str(runner.model_dir), "--kv-slots", "1024"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip(), "no text streamed"
    assert "tok/s" in res.stderr and "ENTMTP" in res.stderr and "tokens/step" in res.stderr


def test_cli_reports_bad_model_path_in_one_line(tmp_path):
    res = subprocess.run([sys.executable, "-m", "srt_entmtp.cli", "generate", "--prompt", "x", "--model-path",
                          str(tmp_path / "missing")], capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert res.returncode == 2
    assert "entmtp: error: --model-path" in res.stderr and "directory not found" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("algorithm", ["NONE", "ENTMTP"])
def test_pipelined_plain_steps_give_the_same_tokens_and_free_every_slot(runner, engine, algorithm):
    """Greedy plain steps pipelined one step deep (on by default where decode graphs run; forced
    on here, on CPU): the next step is launched before the scheduler sees a step's tokens. With
    requests that stop at different steps (lengths, a stop token) and one waiting its turn, the
    tokens equal unpipelined decoding and every KV slot comes back. ENTMTP with a library that
    never drafts (the root-only Medusa GPU library) takes the same plain steps."""
    from srt_entmtp.spec.worker import PACKAGE

    kw = {} if algorithm == "NONE" else {"speculative_algorithm": "ENTMTP", "drafter": "medusa", "lookup_tokens": 0,
                                         "tree_library": str(PACKAGE / "spec" / "libraries" / "medusa_gpu.json")}
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                            max_running_requests=4, chunked_prefill_size=64, **kw))
    eng.worker.pipeline = True
    prompts = _prompts(eng, 5)
    free_run = engine.generate(prompts[:1], SamplingParams(max_new_tokens=20, ignore_eos=True))[0]
    sps = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (9, 14, 3, 20)]
    sps.append(SamplingParams(max_new_tokens=20, stop_token_ids=[free_run.output_ids[7]]))
    ref = [engine.generate([p], sp)[0] for p, sp in zip(prompts, sps)]
    free0 = eng.runner.kv.num_free
    launches, changed, collecting = [], [], []
    launch, collect = eng.worker._plain_launch, eng.worker._plain_collect

    def launch_spy(reqs, tokens, after=None):  # per launch of another batch than the last: inside a collect?
        if launches and [id(r) for r in reqs] != launches[-1]:
            changed.append(bool(collecting))
        launches.append([id(r) for r in reqs])
        return launch(reqs, tokens, after=after)

    def collect_spy(reqs):
        collecting.append(1)
        try:
            return collect(reqs)
        finally:
            collecting.pop()
    eng.worker._plain_launch, eng.worker._plain_collect = launch_spy, collect_spy
    out = eng.generate(prompts, sps)
    for a, b in zip(out, ref):
        assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
    assert len(launches) > 10, "the plain steps were not pipelined"
    # a batch that changed (a request stopped, the waiting one came in) is launched as soon as the
    # step before is read, before its tokens go back to the scheduler (Worker.relaunch_changed)
    assert any(changed), f"no changed batch was launched while its step before was collected: {changed}"
    # the step launched ahead of the last request's stop is wasted, its slot freed when it stopped
    assert eng.runner.kv.num_free == free0


class StandInQueueSafeGraphs:
    """Mock of CudaGraphRunner (CPU has no CUDA graphs): every decode step may be queued behind
    the one before (as with the Triton decode attention), and every forward runs eagerly."""

    def queue_safe_decode(self, batch: int, kv_tokens: int) -> bool:
        return True

    def forward(self, fb, input_ids=None):
        return None


@pytest.mark.parametrize("algorithm", ["NONE", "ENTMTP"])
def test_plain_steps_launched_before_the_step_before_is_read_give_the_same_tokens_with_a_stand_in_graph_runner(
        runner, engine, algorithm):
    """Plain steps launched ahead, fed by the step before's argmax on the device, its KV slot
    placed between each prefix and the new slot (Worker._plain_launch(after=...)): with requests
    stopping at different steps and one waiting, tokens equal plain decoding, steps really are
    launched ahead, and every KV slot comes back. ENTMTP with a library that never drafts takes
    the same steps."""
    from srt_entmtp.spec.worker import PACKAGE

    kw = {} if algorithm == "NONE" else {"speculative_algorithm": "ENTMTP", "drafter": "medusa", "lookup_tokens": 0,
                                         "tree_library": str(PACKAGE / "spec" / "libraries" / "medusa_gpu.json")}
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                            max_running_requests=3, chunked_prefill_size=64, **kw))
    eng.runner.graphs = StandInQueueSafeGraphs()
    prompts = _prompts(eng, 4)
    free_run = engine.generate(prompts[:1], SamplingParams(max_new_tokens=16, ignore_eos=True))[0]
    sps = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (11, 4, 16)]
    sps.append(SamplingParams(max_new_tokens=16, stop_token_ids=[free_run.output_ids[6]]))
    ref = [engine.generate([p], sp)[0] for p, sp in zip(prompts, sps)]
    free0 = eng.runner.kv.num_free
    ahead = []
    launch = eng.worker._plain_launch
    eng.worker._plain_launch = lambda reqs, toks, after=None: ahead.append(after is not None) or launch(reqs, toks, after)
    out = eng.generate(prompts, sps)
    for a, b in zip(out, ref):
        assert a.output_ids == b.output_ids and a.finish_reason == b.finish_reason
    assert sum(ahead) > 10, f"steps launched ahead: {sum(ahead)} of {len(ahead)}"
    assert eng.runner.kv.num_free == free0
    eng.worker.launch_ahead = False
    ahead.clear()
    assert [r.output_ids for r in eng.generate(prompts[:2], sps[:2])] == [r.output_ids for r in ref[:2]]
    assert ahead and not any(ahead), "launch_ahead = False launches every step from host tokens"
