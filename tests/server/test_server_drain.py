"""SIGTERM drains: running requests finish, new ones get 503, the process exits 0."""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx


def test_sigterm_drains_running_requests(start_server):
    srv = start_server()
    n_tokens = 64
    body = {"model": srv.model, "messages": [{"role": "user", "content": "Tell me about the moon."}],
            "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True}
    results: dict = {}

    def plain():
        with httpx.Client(base_url=srv.base, timeout=120) as c:
            results["plain"] = c.post("/v1/chat/completions", json=body)

    def streamed():
        with httpx.Client(base_url=srv.base, timeout=120) as c, c.stream("POST", "/v1/chat/completions",
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as s:
            results["stream_status"] = s.status_code
            results["stream"] = [x[6:] for x in s.iter_lines() if x.startswith("data: ")]

    threads = [threading.Thread(target=plain), threading.Thread(target=streamed)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        m = srv.metrics()
        if m["entmtp_num_running_reqs"] == 2 and m["entmtp_generation_tokens_total"] >= 4:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the two requests never ran together: {srv.metrics()}")

    srv.proc.send_signal(signal.SIGTERM)
    # while draining: not healthy, new requests refused with 503 + Retry-After
    deadline = time.monotonic() + 5
    while httpx.get(srv.base + "/health", timeout=5).status_code != 503:
        assert time.monotonic() < deadline, "/health still 200 after SIGTERM"
        time.sleep(0.02)
    r = httpx.post(srv.base + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=10)
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "shutting_down"
    assert "plain" not in results, "the request finished before the drain was observed; test is not meaningful"

    for t in threads:
        t.join(timeout=120)
    plain_resp = results["plain"]
    assert plain_resp.status_code == 200, plain_resp.text
    out = plain_resp.json()
    assert out["usage"]["completion_tokens"] == n_tokens and out["choices"][0]["finish_reason"] == "length"
    assert results["stream_status"] == 200
    events = results["stream"]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["usage"]["completion_tokens"] == n_tokens
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events[:-2]
                   if json.loads(e)["choices"])
    assert text == out["choices"][0]["message"]["content"]

    rc = srv.proc.wait(timeout=60)  # exits by itself once drained
    assert rc == 0, srv.log()
    log = srv.log(100000)
    assert "drained" in log and "Traceback" not in log, log
