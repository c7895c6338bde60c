"""Speculation over real HTTP: an ENTMTP server answers token for token like a NONE server at
temperature 0, with requests of all four task families in flight together so that one verify
step mixes different trees."""
from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai

from tests.conftest import load_prompts


def _chat_all(base: str, model: str, rows: list[dict]) -> list[tuple[str, int]]:
    async def go():
        client = openai.AsyncOpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=600)
        try:
            tasks = [client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": r["prompt"]}], temperature=0, max_tokens=24,
                extra_body={"entmtp": {"task": r["task"]}}) for r in rows]
            out = await asyncio.gather(*tasks)
        finally:
            await client.close()
        return [(o.choices[0].message.content, o.usage.completion_tokens) for o in out]

    return asyncio.run(go())


def _histogram(base: str, name: str) -> dict[str, float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "_bucket"):
            le = line.split('le="')[1].split('"')[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


def test_entmtp_server_equals_none_server_with_mixed_trees_in_a_step(start_server):
    rows = load_prompts(per_family=3, seed=2)  # 15 prompts over code, math, chat (2 sets), writing
    assert len({r["task"] for r in rows}) == 4
    # the prior library has several trees per family (a calibrated one may have one for all)
    prior = Path(__file__).resolve().parents[2] / "srt_entmtp" / "spec" / "libraries" / "default.json"
    spec = start_server("--speculative-algorithm", "ENTMTP", "--max-running-requests", "16",
                        "--max-waiting-requests", "32", "--tree-library", str(prior))
    plain = start_server("--speculative-algorithm", "NONE", "--max-running-requests", "16",
                         "--max-waiting-requests", "32")
    got = _chat_all(spec.base, spec.model, rows)
    want = _chat_all(plain.base, plain.model, rows)
    for (g, gn), (w, wn), r in zip(got, want, rows):
        assert (g, gn) == (w, wn), f"{r['task']} prompt {r['id']}: ENTMTP {g!r} != NONE {w!r}"
    hist = _histogram(spec.base, "entmtp_spec_trees_per_step")
    assert hist["+Inf"] > 0, "no verify steps were recorded"
    assert hist["1.0"] < hist["+Inf"], f"no verify step mixed two or more trees: {hist}"
    assert _histogram(plain.base, "entmtp_spec_trees_per_step").get("+Inf", 0) == 0
