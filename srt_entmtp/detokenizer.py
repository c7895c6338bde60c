"""Incremental detokenisation for streaming, and stop-string matching.

Each step decodes only the tokens since the last confirmed character boundary (the offsets
trick vLLM and SGLang use): decode ids[prefix:] and ids[prefix:read], and the difference is
the new text. A step whose new text ends in U+FFFD (a UTF-8 character split across tokens) is
not confirmed yet, so its bytes are retried with the next token. Cost per step is O(new
tokens), not O(output length).
"""
from __future__ import annotations

from srt_entmtp.sched.request import Request


class Detokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def _advance(self, req: Request) -> str:
        """Confirmed text plus, once the request has finished, any unconfirmed tail."""
        ids = req.output_ids
        if req.detok_read < len(ids):
            before = self._decode(ids[req.detok_prefix:req.detok_read])
            after = self._decode(ids[req.detok_prefix:])
            if len(after) > len(before) and not after.endswith("\ufffd"):
                req.detok_text += after[len(before):]
                req.detok_prefix, req.detok_read = req.detok_read, len(ids)
        text = req.detok_text
        if req.finished and req.detok_read < len(ids):
            text += self._decode(ids[req.detok_prefix:])[len(self._decode(ids[req.detok_prefix:req.detok_read])):]
        return text

    def text(self, req: Request) -> str:
        """Output text so far, cut at the first stop string (which is not included)."""
        text = self._advance(req)
        for s in req.sampling.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def hits_stop(self, req: Request) -> bool:
        # a stop string lies within the last few tokens, so only the tail needs decoding
        tail = self._decode(req.output_ids[-64:])
        return any(s in tail for s in req.sampling.stop)

    def delta(self, req: Request) -> str:
        """New text since the last call; holds back a trailing partial UTF-8 character and any
        tail that could still become a stop string."""
        text = self.text(req)
        if not req.finished:
            text = text.removesuffix("\ufffd")
            for s in req.sampling.stop:  # hold back a suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        new = text[req.stream_text_sent:]
        req.stream_text_sent = max(len(text), req.stream_text_sent)
        return new
