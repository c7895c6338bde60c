"""Continuous batching: admit, chunk prefills, decode the running set, retire finished requests.

One `step()` is a prefill batch if any admitted request still has prompt tokens (up to
`chunk_tokens` of them, split across requests), otherwise one decode step for every running
request. Where the worker can (CUDA, prefill graphs: `Worker.launch_prefill`), a chunk admitted
while others decode runs beside their decode steps instead: the step launches it and decodes the
others, and its requests join the batch once its first tokens are read (at most one such chunk
at a time). That is `overlap_prefill = True` (`--overlap-prefill`); it is off by default, since on
the H200 it ran level with chunks between steps, or slower (docs/gpu.md).

Where the worker can (`Worker.can_join`: the device speculative step, greedy prompts that complete
in the chunk), a chunk's requests may *join ahead* instead (`join_ahead`; `--join-ahead`, off by
default: experimental, wrong tokens on the H100 until its uploads were fenced, docs/gpu.md): the
chunk is launched without reading its first tokens, and its requests decode with the others in
the same step, their first step queued behind the chunk on the device, launched after the step in
flight (spec/worker.py). Their first tokens are read on the next step, or as soon as a step of
theirs comes back, and always go out before any token of those steps. So an admission costs the
chunk's forward on the device and no round trip through the host.

Admission is bounded by --max-running-requests and by KV slots: each request reserves its prompt,
its max_new_tokens and one step's worth of draft tree, so a step never finds the cache full. A finished or aborted request frees its slots at once.
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
        # a prompt chunk may run beside the decode steps (Worker.launch_prefill): its requests wait
        # in the running set, still in PREFILL, until its first tokens are read; one at a time.
        # Off by default: on the H200 it did not beat chunks between steps (docs/gpu.md)
        self.overlap_prefill = False
        # a chunk's requests may join the decode batch before their first tokens are read (Worker.can_join).
        # Off by default (EngineArgs.join_ahead): experimental, wrong tokens on the H100 until fenced (docs/gpu.md)
        self.join_ahead = False
        self._chunk = None

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
                        chunk = self._chunk if self._chunk is not None and req in self._chunk.reqs else None
                        if chunk is not None:
                            self.worker.finish_prefill(chunk, block=True)  # its KV is written before it is freed
                        self._finish(req, "abort")
                        self.running.remove(req)
                        if chunk is not None and all(r.finished for r in chunk.reqs):
                            self._chunk = None  # nobody is left to take its first tokens
                    return req
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        outputs = self._admit()
        if self._chunk is not None:  # a prompt chunk running beside the decode steps, or one whose requests joined
            decoding = any(r.status is Status.DECODE for r in self.running)
            new = self.worker.finish_prefill(self._chunk, block=self._chunk.joins or not decoding)
            if new is not None:
                outputs += self._prefilled(self._chunk.reqs, new)
                self._chunk = None
        if not self.running:
            return outputs
        prefilling = [r for r in self.running if r.status is Status.PREFILL]
        if prefilling and self._chunk is None:
            budget, reqs, lens = self.chunk_tokens, [], []
            for r in prefilling:
                if budget <= 0:
                    break
                n = min(len(r.prompt_ids) - r.num_prefilled, budget)
                reqs.append(r)
                lens.append(n)
                budget -= n
            self.stats["prefill_steps"] += 1
            self.stats["prefill_tokens"] += sum(lens)
            if self.overlap_prefill and any(r.status is Status.DECODE for r in self.running):
                chunk = self.worker.launch_prefill(reqs, lens, beside=True)
                new = self.worker.finish_prefill(chunk)
                if new is None:  # it runs beside: the decoding requests take this step's decode meanwhile
                    self._chunk = chunk
                    self.stats["prefills_beside"] += 1
            elif self.join_ahead and self.worker.can_join(reqs, lens):
                self._chunk, new = self.worker.launch_prefill(reqs, lens, join=True), None
                self.stats["prefills_joined"] += 1  # its requests decode in this step already
            else:
                new = self.worker.prefill(reqs, lens)
            if new is not None:
                outputs += self._prefilled(reqs, new)
                self.running = [r for r in self.running if not r.finished]
                return outputs
        reqs = [r for r in self.running if r.status is Status.DECODE or r.joining]
        if reqs:
            new = self.worker.decode(reqs)
            self.stats["decode_steps"] += 1
            chunk = self._chunk
            if chunk is not None and chunk.joins and any(r.rid in new for r in chunk.done):
                # a step of joining requests came back already: their first tokens go out before it
                outputs += self._prefilled(chunk.reqs, self.worker.finish_prefill(chunk, block=True))
                self._chunk = None
            outputs += [self._append(r, new[r.rid]) for r in reqs if r.rid in new and not r.finished]
        self.running = [r for r in self.running if not r.finished]
        return outputs

    def _prefilled(self, reqs: list[Request], new: dict[str, list[int]]) -> list[StepOutput]:
        """Requests whose prompt a chunk completed start decoding with its first token."""
        outputs = []
        for r in reqs:
            if r.rid in new and not r.finished:  # (aborted while its chunk ran)
                r.status = Status.DECODE
                outputs.append(self._append(r, new[r.rid]))
        return outputs

    def _append(self, req: Request, ids: list[int]) -> StepOutput:
        now = time.monotonic()
        if req.t_first_token is None:
            req.t_first_token = now
        req.t_last_token = now
        sp = req.sampling
        kept, reason = ids, None
        room = sp.max_new_tokens - len(req.output_ids)
        eos = () if sp.ignore_eos else self.eos_ids
        for j, t in enumerate(ids):  # the first stop token or the length limit ends the output there
            if t in eos or t in sp.stop_token_ids:
                kept, reason = ids[: j + 1], "stop"
                break
            if j + 1 >= room:
                kept, reason = ids[: j + 1], "length"
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
