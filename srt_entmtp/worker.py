"""Workers run one scheduler step on the model: prefill chunks, and decode steps.

`Worker` does prefill (shared by every decoding algorithm) and plain autoregressive decoding
(`--speculative-algorithm NONE`); `spec.worker.SpecWorker` overrides `decode` with
draft -> ragged tree verify -> accept. Workers own KV slots of tokens they compute and hand
back, per request, the list of new tokens; the scheduler applies stop rules.
"""
from __future__ import annotations

import torch

from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.sampling import sample
from srt_entmtp.sched.request import Request

_EMPTY = torch.empty(0, dtype=torch.long)


class Worker:
    algorithm = "NONE"

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.kv = runner.kv

    def max_new_slots_per_step(self) -> int:
        """KV slots one decode step may take per request (the scheduler reserves them)."""
        return 1

    def on_admit(self, req: Request) -> None:
        """A request enters the running set (spec workers set up per-request state here)."""

    def on_finish(self, req: Request) -> None:
        """A request leaves: free its KV."""
        self.kv.free(req.kv_slots)
        req.kv_slots = _EMPTY

    def prefill(self, reqs: list[Request], chunk_lens: list[int]) -> dict[str, list[int]]:
        """Run prompt chunks for several requests in one forward; return the first token of each
        request whose prompt is now complete."""
        tokens, prefixes, done = [], [], []
        slots = self.kv.alloc_many(chunk_lens)
        last_index = 0
        for req, n in zip(reqs, chunk_lens):
            a = req.num_prefilled
            tokens.append(torch.tensor(req.prompt_ids[a:a + n], dtype=torch.long))
            prefixes.append(req.kv_slots)
            last_index += n
            if a + n == len(req.prompt_ids):
                done.append((req, last_index - 1))
        fb = ForwardBatch.build(tokens, prefixes, slots, device=self.runner.device,
                                logits_indices=torch.tensor([i for _, i in done], dtype=torch.long))
        out = self.runner.forward(fb)
        for req, new, n in zip(reqs, slots, chunk_lens):
            req.kv_slots = torch.cat([req.kv_slots, new])
            req.num_prefilled += n
        results = {}
        if done:
            first = sample(out.logits, [r.sampling for r, _ in done], [r.generator for r, _ in done])
            for j, (req, _) in enumerate(done):
                req.last_hidden = out.hidden[j]
                results[req.rid] = [int(first[j])]
            self.after_prefill([r for r, _ in done], out.logits)
        return results

    def after_prefill(self, reqs: list[Request], logits: torch.Tensor) -> None:
        """Hook for spec workers (seed the entropy estimate from the prompt's last logits)."""

    def decode(self, reqs: list[Request]) -> dict[str, list[int]]:
        """One autoregressive step: each request's pending token in, one new token out."""
        return self.plain_step(reqs)[0]

    def plain_step(self, reqs: list[Request]):
        """The autoregressive step; also returns the forward's output (valid until the next forward)."""
        slots = self.kv.alloc(len(reqs))
        # with decode graphs the batch stays on the host: the graph runner sends it up in two copies
        fb = ForwardBatch.build_decode([r.pending_token for r in reqs], [r.kv_slots for r in reqs], slots,
                                       device="cpu" if self.runner.graphs is not None else self.runner.device)
        out = self.runner.forward(fb)
        nxt = sample(out.logits, [r.sampling for r in reqs], [r.generator for r in reqs]).tolist()
        for r, s in zip(reqs, slots.split(1)):
            r.kv_slots = torch.cat([r.kv_slots, s])
        return {r.rid: [t] for r, t in zip(reqs, nxt)}, out
