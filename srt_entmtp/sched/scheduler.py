"""Continuous batching: admit, chunk prefills, decode the running set, retire finished requests.

One `step()` is one forward pass: a prefill batch if any admitted request still has prompt
tokens (up to `chunk_tokens` of them, split across requests), otherwise one decode step for
every running request. Admission is bounded by --max-running-requests and by KV slots: each
request reserves its prompt, its max_new_tokens and one step's worth of draft tree, so a step
never finds the cache full. A finished or aborted request frees its slots at once.
"""
from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass

from srt_entmtp.sched.request import Request, Status
from srt_entmtp.worker import Worker

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity (the server answers 503 with Retry-After)."""


@dataclass
class StepOutput:
    req: Request
    new_ids: list[int]      # tokens appended to the output this step (after stop truncation)
    finished: bool
    spec: dict | None = None  # this step's speculation, per request: tree, task, accepted, entropy


class Scheduler:
    def __init__(self, worker: Worker, *, max_running: int = 16, max_waiting: int = 256, chunk_tokens: int = 512,
                 eos_ids: tuple[int, ...] = (), detokenizer=None):
        self.worker = worker
        self.kv = worker.kv
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.chunk_tokens = chunk_tokens
        self.eos_ids = set(eos_ids)
        self.detok = detokenizer
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.stats = collections.Counter()

    # ---- admission -------------------------------------------------------------------------
    def add(self, req: Request, bounded: bool = True) -> None:
        """Queue a request; online submissions are bounded by max_waiting (offline batches are not)."""
        if bounded and len(self.waiting) >= self.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.max_waiting} requests)")
        req.t_arrival = time.monotonic()
        self.waiting.append(req)

    def _reserve(self, req: Request) -> int:
        """Slots the request may still take: the rest of its prompt and outputs, plus one tree."""
        left = len(req.prompt_ids) + req.sampling.max_new_tokens - req.num_kv
        return max(left, 0) + self.worker.max_new_slots_per_step()

    def _admit(self) -> list[StepOutput]:
        """Move waiting requests into the running set; returns the ones rejected outright."""
        rejected = []
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting[0]
            need = self._reserve(req)
            held = sum(self._reserve(r) for r in self.running)
            if self.kv.num_free - held < need:
                if not self.running:
                    log.error("%s needs %d KV slots, the pool has %d: rejected", req.rid, need, self.kv.num_free)
                    self.waiting.popleft()
                    self._finish(req, "abort")
                    rejected.append(StepOutput(req, [], True))
                    continue
                break
            self.waiting.popleft()
            req.status = Status.PREFILL
            self.worker.on_admit(req)
            self.running.append(req)
        return rejected

    def abort(self, rid: str) -> Request | None:
        for q in (self.waiting, self.running):
            for req in q:
                if req.rid == rid:
                    req.aborted = True
                    if req in self.waiting:
                        self.waiting.remove(req)
                        req.status = Status.FINISHED
                        req.finish_reason = "abort"
                    else:
                        self._finish(req, "abort")
                        self.running.remove(req)
                    return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        rejected = self._admit()
        if not self.running:
            return rejected
        prefilling = [r for r in self.running if r.status is Status.PREFILL]
        if prefilling:
            budget, reqs, lens = self.chunk_tokens, [], []
            for r in prefilling:
                if budget <= 0:
                    break
                n = min(len(r.prompt_ids) - r.num_prefilled, budget)
                reqs.append(r)
                lens.append(n)
                budget -= n
            new = self.worker.prefill(reqs, lens)
            self.stats["prefill_steps"] += 1
            self.stats["prefill_tokens"] += sum(lens)
            for r in reqs:
                if r.rid in new:
                    r.status = Status.DECODE
        else:
            reqs = list(self.running)
            new = self.worker.decode(reqs)
            self.stats["decode_steps"] += 1
        outputs = rejected
        for r in reqs:
            if r.rid in new:
                outputs.append(self._append(r, new[r.rid]))
        self.running = [r for r in self.running if not r.finished]
        return outputs

    def _append(self, req: Request, ids: list[int]) -> StepOutput:
        now = time.monotonic()
        if req.t_first_token is None:
            req.t_first_token = now
        req.t_last_token = now
        sp = req.sampling
        kept, reason = [], None
        for t in ids:
            kept.append(t)
            if (t in self.eos_ids and not sp.ignore_eos) or t in sp.stop_token_ids:
                reason = "stop"
                break
            if len(req.output_ids) + len(kept) >= sp.max_new_tokens:
                reason = "length"
                break
        req.output_ids.extend(kept)
        self.stats["generated_tokens"] += len(kept)
        if reason is None and sp.stop and self.detok is not None and self.detok.hits_stop(req):
            reason = "stop"
        if reason:
            self._finish(req, reason)
        info = getattr(self.worker, "step_info", None)
        return StepOutput(req, kept, req.finished, spec=info.get(req.rid) if info else None)

    def _finish(self, req: Request, reason: str) -> None:
        req.finish_reason = reason
        req.status = Status.FINISHED
        self.worker.on_finish(req)
