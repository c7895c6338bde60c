"""The speculative metrics, fed synthetic StepOutputs (the real server runs without speculation here)."""
from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from srt_entmtp.sched.request import Request, SamplingParams, SpecOptions
from srt_entmtp.sched.scheduler import StepOutput
from srt_entmtp.server.metrics import ServerMetrics


def samples(metrics: ServerMetrics) -> dict:
    out = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_spec_step_metrics():
    engine = SimpleNamespace(scheduler=SimpleNamespace(running=[1, 2], waiting=[3]),
                             runner=SimpleNamespace(kv=SimpleNamespace(num_free=123)))
    m = ServerMetrics(engine)
    req = Request([1, 2, 3], SamplingParams(), SpecOptions(task="code"))
    outs = [StepOutput(req, [5, 6, 7], False, spec={"tree": "deep", "task": "code", "accepted": 2, "entropy": 0.7}),
            StepOutput(req, [8], False, spec={"tree": "flat", "task": "code", "accepted": 0, "entropy": 2.5}),
            StepOutput(req, [9], False, spec=None)]
    m.on_step(outs, 0.02)
    s = samples(m)
    assert s[("entmtp_spec_verify_steps_total", ())] == 2
    assert s[("entmtp_generation_tokens_total", ())] == 5
    assert s[("entmtp_spec_accept_length_count", ())] == 2
    assert s[("entmtp_spec_accept_length_sum", ())] == 3 + 1
    assert s[("entmtp_tree_choices_total", (("task", "code"), ("tree", "deep")))] == 1
    assert s[("entmtp_tree_choices_total", (("task", "code"), ("tree", "flat")))] == 1
    assert s[("entmtp_entropy_nats_count", ())] == 2
    assert abs(s[("entmtp_entropy_nats_sum", ())] - 3.2) < 1e-9
    assert s[("entmtp_num_running_reqs", ())] == 2
    assert s[("entmtp_num_waiting_reqs", ())] == 1
    assert s[("entmtp_kv_free_slots", ())] == 123


def test_request_latency_metrics():
    engine = SimpleNamespace(scheduler=SimpleNamespace(running=[], waiting=[]),
                             runner=SimpleNamespace(kv=SimpleNamespace(num_free=0)))
    m = ServerMetrics(engine)
    req = Request([1, 2, 3, 4], SamplingParams())
    gen = SimpleNamespace(t0=time.monotonic() - 0.5, t_first=None, t_last=None)
    m.on_output(gen, StepOutput(req, [5], False))
    m.on_output(gen, StepOutput(req, [6, 7, 8], False))
    req.finish_reason = "length"
    m.on_output(gen, StepOutput(req, [], True))
    s = samples(m)
    assert s[("entmtp_time_to_first_token_seconds_count", ())] == 1
    assert s[("entmtp_time_to_first_token_seconds_sum", ())] >= 0.5
    assert s[("entmtp_inter_token_latency_seconds_count", ())] == 3
    assert s[("entmtp_prompt_tokens_total", ())] == 4
    assert s[("entmtp_requests_total", (("finish_reason", "length"),))] == 1
    assert s[("entmtp_e2e_request_latency_seconds_count", ())] == 1
