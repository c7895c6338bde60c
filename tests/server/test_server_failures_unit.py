"""Failure paths that a healthy engine never takes, driven through a fake engine in-process:
a bug in a handler gives a 500 without internals, and a request the engine drops gives a 500
(or an error event on a stream) instead of a hung connection."""
from __future__ import annotations

import json
import threading
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

import srt_entmtp.server.app as app_module
from srt_entmtp.sched.request import Request, Status
from srt_entmtp.server.app import create_app

SECRET = "secret internal detail"


class FakeEngine:
    """Accepts requests and silently drops them, as the scheduler does with one it can never admit."""
    model_name = "fake"
    context_length = 64

    def __init__(self):
        self.scheduler = SimpleNamespace(running=[], waiting=[])
        self.runner = SimpleNamespace(kv=SimpleNamespace(num_free=1000, num_slots=1000),
                                      config=SimpleNamespace(vocab_size=100))
        self.worker = SimpleNamespace(max_new_slots_per_step=lambda: 1)
        self.step_listeners = []
        self.aborted = []

    def tokenize(self, text):
        raise RuntimeError(SECRET)

    def tokenize_chat(self, messages):
        return [1, 2, 3]

    def make_request(self, prompt_ids, sampling, spec=None, rid=None, prompt_text=""):
        sampling.validate()
        return Request(prompt_ids, sampling, spec, rid=rid)

    def submit(self, req, on_output):
        req.status = Status.FINISHED
        req.finish_reason = "abort"

    def abort(self, rid):
        self.aborted.append(rid)


@pytest.fixture
def client(monkeypatch):
    monkeypatch.setattr(app_module, "WATCHDOG_S", 0.05)
    app = create_app(FakeEngine(), start_engine=False)
    app.state.entmtp.ready = True  # no lifespan: a hung request must not hang the fixture's teardown
    return TestClient(app, raise_server_exceptions=False)


def post(client, path, body, timeout=10.0):
    """POST in a daemon thread, so that a request that never ends fails the test instead of hanging it."""
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", client.post(path, json=body)), daemon=True)
    t.start()
    t.join(timeout)
    assert "r" in out, f"{path} did not answer within {timeout}s"
    return out["r"]


def test_unexpected_exception_is_a_clean_500(client):
    r = post(client, "/v1/completions", {"model": "fake", "prompt": "hi"})
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and err["code"] == "internal_error"
    assert SECRET not in r.text and "Traceback" not in r.text


def test_dropped_request_fails_instead_of_hanging(client):
    r = post(client, "/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "x"}],
                                              "max_tokens": 4})
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "aborted"


def test_dropped_streaming_request_ends_with_error_event(client):
    body = {"model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "stream": True}
    r = post(client, "/v1/chat/completions", body)
    assert r.status_code == 200
    events = [b[len("data: "):] for b in r.text.split("\n\n") if b]
    assert json.loads(events[0])["choices"][0]["delta"]["role"] == "assistant"
    assert json.loads(events[-2])["error"]["type"] == "server_error"
    assert events[-1] == "[DONE]"
