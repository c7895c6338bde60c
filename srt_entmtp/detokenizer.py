"""Incremental detokenisation for streaming, and stop-string matching."""
from __future__ import annotations

from srt_entmtp.sched.request import Request


class Detokenizer:
    def __init__(self, tokenizer):
        self.tok = tokenizer

    def text(self, req: Request) -> str:
        """Output text so far, cut at the first stop string (which is not included)."""
        text = self.tok.decode(req.output_ids, skip_special_tokens=True)
        for s in req.sampling.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        return text

    def hits_stop(self, req: Request) -> bool:
        # a stop string lies within the last few tokens, so only the tail needs decoding
        tail = self.tok.decode(req.output_ids[-64:], skip_special_tokens=True)
        return any(s in tail for s in req.sampling.stop)

    def delta(self, req: Request) -> str:
        """New text since the last call; holds back a trailing partial UTF-8 character and any
        tail that could still become a stop string."""
        text = self.text(req)
        if not req.finished:
            if text.endswith("\ufffd"):
                text = text[:-1]
            for s in req.sampling.stop:  # hold back a suffix that is a prefix of a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        text = text[:-k]
                        break
        new = text[req.stream_text_sent:]
        req.stream_text_sent = max(len(text), req.stream_text_sent)
        return new
