"""Incremental detokenisation equals a full decode, whatever the chunking of tokens."""
import random

import pytest

from srt_entmtp.detokenizer import Detokenizer
from srt_entmtp.sched.request import Request, SamplingParams, Status

TEXTS = [
    "def add(a, b):\n    return a + b  # ✓ done",
    "Les élèves ont mangé 3½ crêpes 🥞🥞 — 東京で寿司を食べました。",
    "emoji run 👩‍👩‍👧‍👦🇫🇷🙂 then ascii, tabs\tand\nnewlines",
    "Ünïcödé ∑ x² ≤ ∞ ; 한국어 텍스트 ; русский текст",
]


@pytest.fixture(scope="module")
def tok():
    from srt_entmtp.model.loader import resolve_model_path
    from srt_entmtp.model.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model_path(None))


def _stream(detok, ids, chunks, stop=()):
    req = Request([1], SamplingParams(stop=list(stop)))
    out, i = [], 0
    for n in chunks:
        req.output_ids.extend(ids[i:i + n])
        i += n
        if i >= len(ids):
            req.status = Status.FINISHED
        out.append(detok.delta(req))
    return req, "".join(out)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streamed_deltas_equal_full_decode(tok, text, seed):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    rng = random.Random(seed)
    chunks, left = [], len(ids)
    while left:  # 1 token a step (plain decoding) up to 5 (accepted speculative paths)
        n = min(left, rng.randint(1, 5) if seed else 1)
        chunks.append(n)
        left -= n
    req, streamed = _stream(Detokenizer(tok), ids, chunks)
    assert streamed == full
    assert Detokenizer(tok).text(req) == full
    assert "\ufffd" not in streamed  # every multi-byte character arrived whole


def test_partial_character_is_held_back_until_complete(tok):
    ids = tok("🥞", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the pancake emoji should span several byte-level tokens"
    detok = Detokenizer(tok)
    req = Request([1], SamplingParams())
    req.output_ids.append(ids[0])
    assert detok.delta(req) == ""
    req.output_ids.extend(ids[1:])
    req.status = Status.FINISHED
    assert detok.delta(req) == "🥞"


def test_stop_string_cuts_text_and_is_not_streamed(tok):
    text = "alpha beta STOP gamma delta"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    _, streamed = _stream(Detokenizer(tok), ids, [1] * len(ids), stop=["STOP"])
    assert streamed == "alpha beta "
