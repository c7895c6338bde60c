"""Prompt chunks beside decode steps (Scheduler.overlap_prefill, Worker.launch_prefill).

On CUDA a chunk admitted while other requests decode runs on a side stream and its requests join
the batch once its first tokens are read. There is no second stream on the CPU, so these tests
use the worker's `defer_chunks` mode: the chunk runs at once but its tokens are handed over a step
later, which drives the scheduler through the same states (the others decode while the chunk's
requests wait in PREFILL; they join later; an abort meets a chunk still pending). The GPU form is
tested in tests/gpu/test_gpu.py."""
import pytest

from srt_entmtp.engine import Engine, EngineArgs
from srt_entmtp.sched.request import SamplingParams, SpecOptions, Status
from tests.conftest import load_prompts


@pytest.fixture(scope="module")
def prompts(runner):
    rows = load_prompts(per_family=2, seed=3)[:5]
    eng = Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=1024, context_length=1024))
    return rows, [eng.tokenize_chat([{"role": "user", "content": r["prompt"]}]) for r in rows]


def _engine(runner, algorithm: str) -> Engine:
    return Engine(EngineArgs(model_path=str(runner.model_dir), kv_slots=8192, context_length=2048,
                             max_running_requests=2, speculative_algorithm=algorithm))


@pytest.mark.parametrize("algorithm", ["NONE", "ENTMTP"])
def test_deferred_chunks_beside_decode_steps_give_the_tokens_of_serial_chunks(runner, prompts, algorithm):
    rows, ids = prompts
    # different lengths: requests finish at different steps, so later prompts are admitted one by one
    sps = [SamplingParams(max_new_tokens=4 + 9 * i, ignore_eos=True) for i in range(len(ids))]
    specs = [SpecOptions(task=r["task"]) for r in rows]
    serial = _engine(runner, algorithm)  # overlap_prefill is off by default
    ref = [r.output_ids for r in serial.generate(ids, sps, specs)]
    assert serial.scheduler.stats["prefills_beside"] == 0

    eng = _engine(runner, algorithm)
    eng.scheduler.overlap_prefill, eng.worker.defer_chunks = True, True
    waited = []  # per step: requests still in PREFILL while others decoded
    eng.step_listeners.append(lambda outs, dt: waited.append(sum(
        r.status is Status.PREFILL for r in eng.scheduler.running) if eng.scheduler._chunk is not None else 0))
    free0 = eng.runner.kv.num_free
    out = eng.generate(ids, sps, specs)
    assert [r.output_ids for r in out] == ref
    assert eng.scheduler.stats["prefills_beside"] >= 2 and max(waited) >= 1
    assert all(r.t_first_token is not None and len(r.output_ids) == sp.max_new_tokens for r, sp in zip(out, sps))
    assert eng.runner.kv.num_free == free0 and eng.scheduler._chunk is None


def test_abort_of_a_request_whose_chunk_is_pending(runner, prompts):
    _, ids = prompts
    eng = _engine(runner, "ENTMTP")
    eng.scheduler.overlap_prefill, eng.worker.defer_chunks = True, True
    free0 = eng.runner.kv.num_free
    reqs = [eng.make_request(p, SamplingParams(max_new_tokens=4 + 6 * i, ignore_eos=True)) for i, p in enumerate(ids[:3])]
    for r in reqs:
        eng.scheduler.add(r, bounded=False)
    while eng.scheduler._chunk is None:  # the third request's chunk, launched beside the second's decode
        eng.scheduler.step()
        assert eng.scheduler.has_work()
    victim = eng.scheduler._chunk.reqs[0]
    assert victim is reqs[2] and victim.status is Status.PREFILL
    eng.scheduler.abort(victim.rid)
    assert victim.finished and victim.finish_reason == "abort" and not victim.output_ids
    while eng.scheduler.has_work():
        eng.scheduler.step()
    assert victim.output_ids == [] and reqs[1].finish_reason == "length"
    assert len(reqs[1].output_ids) == 10
    assert eng.runner.kv.num_free == free0 and eng.scheduler._chunk is None
