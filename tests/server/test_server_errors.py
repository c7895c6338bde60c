"""Every bad input gets an OpenAI-shaped error with the right status, type and param, and no traceback."""
from __future__ import annotations

import json

import pytest

M = "__MODEL__"  # replaced by the served model name
MSG = [{"role": "user", "content": "Hi"}]
CHAT, COMP, GEN = "/v1/chat/completions", "/v1/completions", "/generate"


def chat(**kw):
    return {"model": M, "messages": MSG, "max_tokens": 4, **kw}


def comp(**kw):
    return {"model": M, "prompt": "Hi", "max_tokens": 4, **kw}


# (id, path, body: dict | raw str, status, param, code)
CASES = [
    ("malformed-json", CHAT, '{"model": "m", "messages": [', 400, None, "invalid_json"),
    ("body-not-object", CHAT, "[1, 2]", 400, None, "invalid_json"),
    ("empty-body", CHAT, "", 400, None, None),
    ("missing-model", CHAT, {"messages": MSG}, 400, "model", "missing_required_parameter"),
    ("unknown-model", CHAT, {**chat(), "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("missing-messages", CHAT, {"model": M}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT, chat(messages=[]), 400, "messages", None),
    ("messages-not-list", CHAT, chat(messages="Hi"), 400, "messages", None),
    ("content-wrong-type", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content", None),
    ("content-missing", CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", None),
    ("image-part", CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content", None),
    ("bad-role", CHAT, chat(messages=[{"role": "robot", "content": "Hi"}]), 400, "messages[0].role", None),
    ("tool-role", CHAT, chat(messages=[MSG[0], {"role": "tool", "content": "x"}]), 400, "messages[1].role", None),
    ("n-2", CHAT, chat(n=2), 400, "n", "unsupported_parameter"),
    ("n-0", CHAT, chat(n=0), 400, "n", "unsupported_parameter"),
    ("max-tokens-over-context", CHAT, chat(max_tokens=5000), 400, "max_tokens", "context_length_exceeded"),
    ("max-completion-tokens-over-context", CHAT, chat(max_completion_tokens=100000), 400, "max_completion_tokens",
     "context_length_exceeded"),
    ("max-tokens-zero", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-string", CHAT, chat(max_tokens="many"), 400, "max_tokens", "invalid_type"),
    ("max-tokens-fraction", CHAT, chat(max_tokens=2.5), 400, "max_tokens", None),
    ("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature", None),
    ("temperature-string", CHAT, chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("top-p-zero", CHAT, chat(top_p=0), 400, "top_p", None),
    ("top-p-over-one", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("top-k-negative", CHAT, chat(top_k=-5), 400, "top_k", None),
    ("stop-wrong-type", CHAT, chat(stop=5), 400, "stop", None),
    ("stop-empty-string", CHAT, chat(stop=[""]), 400, "stop", None),
    ("stop-too-many", CHAT, chat(stop=[f"s{i}" for i in range(17)]), 400, "stop", None),
    ("stream-not-bool", CHAT, chat(stream="yes"), 400, "stream", None),
    ("stream-options-without-stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options",
     None),
    ("seed-too-big", CHAT, chat(seed=2**70), 400, "seed", None),
    ("presence-penalty", CHAT, chat(presence_penalty=0.5), 400, "presence_penalty", "unsupported_parameter"),
    ("frequency-penalty", CHAT, chat(frequency_penalty=1), 400, "frequency_penalty", "unsupported_parameter"),
    ("logprobs", CHAT, chat(logprobs=True), 400, "logprobs", "unsupported_parameter"),
    ("top-logprobs", CHAT, chat(top_logprobs=3), 400, "top_logprobs", "unsupported_parameter"),
    ("tools", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "tools",
     "unsupported_parameter"),
    ("response-format-json", CHAT, chat(response_format={"type": "json_object"}), 400, "response_format",
     "unsupported_parameter"),
    ("logit-bias", CHAT, chat(logit_bias={"50": 10}), 400, "logit_bias", "unsupported_parameter"),
    ("entmtp-bad-task", CHAT, chat(entmtp={"task": "poetry"}), 400, "entmtp.task", None),
    ("entmtp-unknown-key", CHAT, chat(entmtp={"tree_name": "x"}), 400, "entmtp.tree_name", "unknown_parameter"),
    ("entmtp-not-object", CHAT, chat(entmtp="fast"), 400, "entmtp", None),
    ("prompt-too-long", COMP, comp(prompt="hello " * 5000), 400, "prompt", "context_length_exceeded"),
    ("completion-missing-prompt", COMP, {"model": M}, 400, "prompt", "missing_required_parameter"),
    ("completion-empty-prompt", COMP, comp(prompt=""), 400, "prompt", None),
    ("completion-batched-prompt", COMP, comp(prompt=["a", "b"]), 400, "prompt", None),
    ("completion-prompt-wrong-type", COMP, comp(prompt={"text": "a"}), 400, "prompt", None),
    ("completion-token-id-out-of-range", COMP, comp(prompt=[1, 10**9]), 400, "prompt", None),
    ("completion-token-id-negative", COMP, comp(prompt=[1, -3]), 400, "prompt", None),
    ("completion-echo", COMP, comp(echo=True), 400, "echo", "unsupported_parameter"),
    ("completion-best-of", COMP, comp(best_of=3), 400, "best_of", "unsupported_parameter"),
    ("completion-unknown-model", COMP, {**comp(), "model": "davinci"}, 404, "model", "model_not_found"),
    ("generate-no-prompt", GEN, {"sampling_params": {"max_new_tokens": 2}}, 400, "text", None),
    ("generate-both-prompts", GEN, {"text": "a", "input_ids": [1]}, 400, "text", None),
    ("generate-max-new-tokens-zero", GEN, {"text": "a", "sampling_params": {"max_new_tokens": 0}}, 400,
     "sampling_params.max_new_tokens", None),
    ("generate-over-context", GEN, {"text": "a", "sampling_params": {"max_new_tokens": 9000}}, 400,
     "sampling_params.max_new_tokens", "context_length_exceeded"),
    ("generate-bad-temperature", GEN, {"text": "a", "sampling_params": {"temperature": -2}}, 400,
     "sampling_params.temperature", None),
    ("generate-penalty", GEN, {"text": "a", "sampling_params": {"frequency_penalty": 0.3}}, 400,
     "sampling_params.frequency_penalty", "unsupported_parameter"),
    ("generate-bad-input-ids", GEN, {"input_ids": ["a"]}, 400, "input_ids[0]", None),
]


@pytest.mark.parametrize("path,body,status,param,code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(server, http, path, body, status, param, code):
    if isinstance(body, dict):
        raw = json.dumps(body).replace(M, server.model)
    else:
        raw = body
    r = http.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert "Traceback" not in r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and len(err["message"]) > 5
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code


def test_context_error_states_both_numbers(server, http):
    r = http.post(CHAT, json={"model": server.model, "messages": MSG, "max_tokens": 5000})
    msg = r.json()["error"]["message"]
    assert "4096" in msg and "5000" in msg, msg
    r = http.post(CHAT, json={"model": server.model, "messages": MSG, "max_completion_tokens": 6000})
    msg = r.json()["error"]["message"]
    assert "4096" in msg and "6000" in msg and "max_completion_tokens" in msg, msg


def test_errors_do_not_disturb_a_running_request(server, http):
    """A stream in flight keeps going, complete and correct, while bad requests come and go."""
    import httpx

    body = {"model": server.model, "messages": MSG, "max_tokens": 24, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.Client(base_url=server.base, timeout=60) as other, other.stream("POST", CHAT, json=body) as s:
        lines = s.iter_lines()
        first = next(x for x in lines if x.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        for path, b, status, _, _ in [c[1:] for c in CASES[:12]]:
            raw = json.dumps(b).replace(M, server.model) if isinstance(b, dict) else b
            assert http.post(path, content=raw, headers={"Content-Type": "application/json"}).status_code == status
        rest = [x[6:] for x in lines if x.startswith("data: ")]
    assert rest[-1] == "[DONE]"
    assert json.loads(rest[-2])["usage"]["completion_tokens"] == 24
    assert http.get("/health").status_code == 200
