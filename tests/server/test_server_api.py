"""OpenAI-compatible endpoints, /generate, /health, /v1/models against a real server."""
from __future__ import annotations

import json

import openai
import pytest

SEA = [{"role": "user", "content": "Write one sentence about the sea."}]


def sse_events(text: str) -> list[str]:
    """The data payloads of an SSE body, in order; asserts the framing is `data: ...` + blank line."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        events.append(block[len("data: "):])
    return events


def test_health_and_models(server, http):
    r = http.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [server.model]
    assert models["data"][0]["max_model_len"] == 4096
    assert http.get(f"/v1/models/{server.model}").json()["id"] == server.model
    r = http.get("/v1/models/no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_chat_non_streaming(server, client):
    r = client.chat.completions.create(model=server.model, messages=SEA, max_tokens=12, temperature=0)
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == server.model
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.message.role == "assistant"
    assert isinstance(c.message.content, str) and c.message.content.strip()
    assert c.finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 5
    assert 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    if c.finish_reason == "length":
        assert u.completion_tokens == 12


def test_chat_streaming_matches_non_streaming(server, client, http):
    kw = {"model": server.model, "messages": SEA, "max_tokens": 16, "temperature": 0}
    full = client.chat.completions.create(**kw)
    text = full.choices[0].message.content

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    first = chunks[0]
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert all(ch.id == first.id for ch in chunks)
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    content = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert "".join(content) == text
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [full.choices[0].finish_reason]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == full.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == full.usage.prompt_tokens
    assert usage_chunk.usage.total_tokens == full.usage.total_tokens

    # the raw wire format
    body = {**kw, "messages": SEA, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    assert objs[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" in o for o in objs)            # include_usage: usage (null) on every chunk
    assert objs[-1]["choices"] == [] and objs[-1]["usage"]["total_tokens"] == full.usage.total_tokens
    fin = objs[-2]["choices"][0]
    assert fin["finish_reason"] == full.choices[0].finish_reason and fin["delta"] == {}
    assert all(o["usage"] is None for o in objs[:-1])
    assert "".join(o["choices"][0]["delta"].get("content", "") for o in objs[:-1]) == text

    # without include_usage: no usage key and no usage chunk
    with http.stream("POST", "/v1/chat/completions", json={**kw, "stream": True}) as r:
        events = sse_events(r.read().decode())
    objs = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]"
    assert all("usage" not in o and o["choices"] for o in objs)


def test_completions(server, client, http):
    kw = {"model": server.model, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    r = client.completions.create(**kw)
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    text = r.choices[0].text
    assert text.strip()
    assert r.usage.completion_tokens <= 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason

    # a list of one string is the same prompt
    r2 = client.completions.create(**{**kw, "prompt": ["The capital of France is"]})
    assert r2.choices[0].text == text
    # token ids
    r3 = http.post("/v1/completions", json={**kw, "prompt": [504, 3575, 282]}).json()
    assert r3["usage"]["prompt_tokens"] == 3 and r3["choices"][0]["text"]


def test_default_completions_max_tokens_is_16(server, http):
    r = http.post("/v1/completions", json={"model": server.model, "prompt": "Once upon a time", "temperature": 0,
                                           "ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 16 and r["choices"][0]["finish_reason"] == "length"


def test_stop_string_cuts_output(server, client):
    kw = {"model": server.model, "messages": SEA, "max_tokens": 16, "temperature": 0}
    text = client.chat.completions.create(**kw).choices[0].message.content
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[2]
    cut = text[:text.index(stop)]
    r = client.chat.completions.create(stop=[stop], **kw)
    assert r.choices[0].message.content == cut
    assert r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       client.chat.completions.create(stop=stop, stream=True, **kw) if ch.choices)
    assert streamed == cut


def test_seeded_sampling_reproducible(server, client):
    kw = {"model": server.model, "messages": [{"role": "user", "content": "Tell me a short story."}],
              "max_tokens": 16, "temperature": 0.8, "extra_body": {"ignore_eos": True}}

    def run(seed):
        return client.chat.completions.create(seed=seed, **kw)

    a, b = run(1234), run(1234)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.completion_tokens == 16
    others = {run(s).choices[0].message.content for s in (1, 2, 3)}
    assert others - {a.choices[0].message.content}, "different seeds all gave the seed-1234 text"


def test_harmless_openai_fields_are_ignored(server, http):
    body = {"model": server.model, "messages": SEA, "max_tokens": 2, "temperature": 0, "user": "u1",
            "store": False, "metadata": {"a": "b"}, "logprobs": False, "response_format": {"type": "text"},
            "parallel_tool_calls": True, "tool_choice": "none", "n": 1, "presence_penalty": 0,
            "frequency_penalty": 0.0, "logit_bias": {}, "service_tier": "auto", "some_future_field": 1,
            "messages_extra": None}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2


def test_message_forms(server, http):
    parts = {"model": server.model, "max_tokens": 4, "temperature": 0, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]},
    ]}
    r = http.post("/v1/chat/completions", json=parts)
    assert r.status_code == 200, r.text
    # developer is accepted as system: same prompt, same prompt length
    dev = {**parts, "messages": [{"role": "developer", "content": "You are terse."}, parts["messages"][1]]}
    r2 = http.post("/v1/chat/completions", json=dev)
    assert r2.status_code == 200
    assert r2.json()["usage"]["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert r2.json()["choices"][0]["message"]["content"] == r.json()["choices"][0]["message"]["content"]


def test_entmtp_extension_passes_through(server, http):
    body = {"model": server.model, "messages": SEA, "max_tokens": 3, "temperature": 0,
            "entmtp": {"task": "code", "policy": "entmtp"}}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    stats = r.json()["entmtp"]
    assert stats["task"] == "code"
    assert set(stats) >= {"spec_verify_ct", "spec_accept_length", "tree_choices", "lookup_accepted_tokens",
                          "mean_entropy", "task"}
    g = http.post("/generate", json={"text": "def f(x):", "sampling_params": {"max_new_tokens": 2},
                                     "entmtp": {"task": "math"}}).json()
    assert g["meta_info"]["task"] == "math"


def test_default_server_drafts_from_the_prompt_lookup_branch(server, http):
    """`make serve`'s configuration (MTP heads, the CPU library with its 8-token lookup branch):
    a text that repeats itself gets tokens accepted from the lookup chain, reported per request."""
    text = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10. 1, 2, 3, 4, 5, 6, 7, 8, 9, 10. 1, 2, 3, 4,"
    r = http.post("/generate", json={"text": text, "sampling_params": {"max_new_tokens": 24, "temperature": 0,
                                                                        "ignore_eos": True}})
    assert r.status_code == 200, r.text
    m = r.json()["meta_info"]
    assert m["lookup_accepted_tokens"] > 0 and m["spec_accept_length"] > 1.5, m


def test_generate_native(server, http):
    body = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                     "ignore_eos": True}}
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["output_ids"]) == 8 and out["text"].strip()
    m = out["meta_info"]
    assert m["prompt_tokens"] > 0 and m["completion_tokens"] == 8 and m["finish_reason"] == "length"
    for key in ("spec_verify_ct", "spec_accept_length", "tree_choices", "lookup_accepted_tokens", "mean_entropy",
                "task"):
        assert key in m
    assert m["e2e_latency"] > 0

    # same prompt as token ids; streaming gives cumulative text ending in the same result
    r2 = http.post("/generate", json={"input_ids": [504, 3575, 282], "sampling_params": {"max_new_tokens": 4}})
    assert r2.status_code == 200 and r2.json()["meta_info"]["prompt_tokens"] == 3
    with http.stream("POST", "/generate", json={**body, "stream": True}) as s:
        events = sse_events(s.read().decode())
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    texts = [o["text"] for o in objs]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))
    assert objs[-1]["text"] == out["text"] and objs[-1]["output_ids"] == out["output_ids"]
    assert objs[-1]["meta_info"]["finish_reason"] == "length"


def test_openai_client_error_types(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=SEA, max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=server.model, messages=SEA, max_tokens=2, n=2)
    assert e.value.body["param"] == "n"


def test_unknown_route_and_method(server, http):
    r = http.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
