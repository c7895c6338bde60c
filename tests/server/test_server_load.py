"""Back-pressure, client disconnects and /metrics against a real server."""
from __future__ import annotations

import asyncio
import json
import time

import httpx

MSG = [{"role": "user", "content": "Count from one to one hundred."}]
REQUIRED_METRICS = {
    "entmtp_time_to_first_token_seconds": "histogram",
    "entmtp_inter_token_latency_seconds": "histogram",
    "entmtp_e2e_request_latency_seconds": "histogram",
    "entmtp_num_running_reqs": "gauge",
    "entmtp_num_waiting_reqs": "gauge",
    "entmtp_kv_free_slots": "gauge",
    "entmtp_prompt_tokens_total": "counter",
    "entmtp_generation_tokens_total": "counter",
    "entmtp_spec_verify_steps_total": "counter",
    "entmtp_requests_total": "counter",
    "entmtp_spec_accept_length": "histogram",
    "entmtp_tree_choices_total": "counter",
    "entmtp_entropy_nats": "histogram",
}


def wait_for(pred, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def idle(server) -> dict:
    """Wait until the engine holds no request; return the metrics then."""
    def check():
        m = server.metrics()
        return m if m["entmtp_num_running_reqs"] == 0 and m["entmtp_num_waiting_reqs"] == 0 else None

    m = wait_for(check, 30)
    assert m, "the engine did not go idle"
    return m


def test_metrics_exposes_names_and_counts(server, http):
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name, kind in REQUIRED_METRICS.items():
        assert f"# TYPE {name} {kind}" in r.text, name
    before = idle(server)
    body = {"model": server.model, "messages": MSG, "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    out = http.post("/v1/chat/completions", json=body).json()
    after = server.metrics()
    assert after["entmtp_generation_tokens_total"] - before["entmtp_generation_tokens_total"] == 5
    assert after["entmtp_prompt_tokens_total"] - before["entmtp_prompt_tokens_total"] == out["usage"]["prompt_tokens"]
    key = 'entmtp_requests_total{finish_reason="length"}'
    assert after[key] - before.get(key, 0) == 1
    for h in ("entmtp_time_to_first_token_seconds", "entmtp_e2e_request_latency_seconds"):
        assert after[h + "_count"] - before[h + "_count"] == 1
    assert after["entmtp_inter_token_latency_seconds_count"] - before["entmtp_inter_token_latency_seconds_count"] == 4
    e2e = after["entmtp_e2e_request_latency_seconds_sum"] - before["entmtp_e2e_request_latency_seconds_sum"]
    ttft = after["entmtp_time_to_first_token_seconds_sum"] - before["entmtp_time_to_first_token_seconds_sum"]
    assert 0 < ttft <= e2e < 60
    assert after["entmtp_kv_free_slots"] == before["entmtp_kv_free_slots"] > 0


async def _burst(server, n: int, max_tokens: int):
    body = {"model": server.model, "messages": MSG, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    limits = httpx.Limits(max_connections=n + 4)
    async with httpx.AsyncClient(base_url=server.base, timeout=120, limits=limits) as c:
        return await asyncio.gather(*[c.post("/v1/chat/completions", json=body) for _ in range(n)])


def test_queue_full_gives_503_with_retry_after(server, http):
    start = idle(server)
    n = 3 * (server.max_running + server.max_waiting)
    responses = asyncio.run(_burst(server, n, max_tokens=16))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    rejected = [r for r in responses if r.status_code == 503]
    served = [r for r in responses if r.status_code == 200]
    assert rejected, f"no request was refused out of {n} concurrent: {codes}"
    assert len(served) >= 1
    for r in rejected:
        assert r.headers.get("retry-after") == "1"
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "service_unavailable_error" and err["message"]
    for r in served:
        assert r.json()["usage"]["completion_tokens"] == 16
    end = idle(server)
    assert end["entmtp_kv_free_slots"] == start["entmtp_kv_free_slots"]
    # the server still serves
    ok = http.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, "max_tokens": 2})
    assert ok.status_code == 200


def test_streaming_disconnect_frees_kv(server, http):
    start = idle(server)
    free0 = start["entmtp_kv_free_slots"]
    aborted0 = start.get('entmtp_requests_total{finish_reason="abort"}', 0)
    body = {"model": server.model, "messages": MSG, "max_tokens": 1000, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.Client(base_url=server.base, timeout=60) as c, c.stream("POST", "/v1/chat/completions", json=body) as s:
        lines = s.iter_lines()  # kept open: leaving a for-loop over it would close the connection
        got = 0
        while got < 3:
            line = next(lines)
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                got += 1
        during = server.metrics()
        assert during["entmtp_num_running_reqs"] == 1, server.log()
        assert during["entmtp_kv_free_slots"] < free0          # the stream holds KV
    # the client is gone: the request is aborted and its KV freed within a few seconds
    freed = wait_for(lambda: server.metrics()["entmtp_kv_free_slots"] == free0, 5)
    assert freed, f"KV not freed: {server.metrics()['entmtp_kv_free_slots']} != {free0}"
    m = server.metrics()
    assert m["entmtp_num_running_reqs"] == 0
    assert m['entmtp_requests_total{finish_reason="abort"}'] == aborted0 + 1
    r = http.post("/v1/chat/completions", json={"model": server.model, "messages": MSG, "max_tokens": 3,
                                                "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


def test_waiting_client_disconnect_frees_kv(server, http):
    """A non-streaming client that gives up (timeout) also aborts its request."""
    start = idle(server)
    free0 = start["entmtp_kv_free_slots"]
    aborted0 = start.get('entmtp_requests_total{finish_reason="abort"}', 0)
    body = {"model": server.model, "prompt": "Count:", "max_tokens": 1000, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=server.base, timeout=httpx.Timeout(60, read=1.5)) as c:
        try:
            c.post("/v1/completions", json=body)
            raise AssertionError("a 1000-token completion finished within 1.5 s")
        except httpx.ReadTimeout:
            pass
    # 1000 tokens take far longer than this wait: only an abort frees the KV this soon
    freed = wait_for(lambda: server.metrics()["entmtp_kv_free_slots"] == free0, 5)
    assert freed, "KV not freed after the client went away"
    m = server.metrics()
    assert m["entmtp_num_running_reqs"] == 0
    assert m['entmtp_requests_total{finish_reason="abort"}'] == aborted0 + 1
    assert http.post("/v1/chat/completions", json={"model": server.model, "messages": MSG,
                                                   "max_tokens": 2}).status_code == 200
