"""Workers run one scheduler step on the model: prefill chunks, and decode steps.

`Worker` does prefill (shared by every decoding algorithm) and plain autoregressive decoding
(`--speculative-algorithm NONE`); `spec.worker.SpecWorker` overrides `decode` with
draft -> ragged tree verify -> accept. Workers own KV slots of tokens they compute and hand
back, per request, the list of new tokens; the scheduler applies stop rules.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from srt_entmtp.model import staging
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.sampling import sample
from srt_entmtp.sched.request import Request
from srt_entmtp.spec.entropy import entropy_from_logits

_EMPTY = torch.empty(0, dtype=torch.long)


def same_batch(a: list[Request], b: list[Request]) -> bool:
    """Whether two running batches are the same requests in the same order (a pipelined step
    relaunches only an unchanged batch)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


@dataclass
class PromptChunk:
    """A launched prompt chunk (Worker.launch_prefill): its results, or what to read them from."""
    reqs: list[Request]
    done: list[Request]                      # the requests whose prompt this chunk completes
    results: dict[str, list[int]] | None = None  # first tokens, once known
    hidden: torch.Tensor | None = None       # [len(done), H] last hidden states (side stream)
    host: torch.Tensor | None = None         # pinned: first tokens, then prompt entropies
    event: torch.cuda.Event | None = None    # recorded after both copies (None: the CPU, done at once)
    deferred: bool = False                   # done, but reported one call late (CPU tests)
    joins: bool = False                      # its requests decode before its first tokens are read


@dataclass
class _PlainStep:
    """A greedy plain step launched and not yet read."""
    reqs: list[Request]
    slots: dict[int, np.ndarray]     # id(request) -> its new KV slot (on_finish takes it back)
    next_tokens: torch.Tensor        # the step's argmax on the device (feeds a step launched ahead)
    host: torch.Tensor               # pinned copy of next_tokens
    done: torch.cuda.Event | None    # recorded after that copy


class Worker:
    algorithm = "NONE"

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.kv = runner.kv
        # pipeline greedy steps one deep: None = plain steps where decode graphs run (CUDA) and
        # device speculative steps always; False = never (an A/B switch for benchmarks)
        self.pipeline = None
        # launch a plain step before the one before it is read, where the decode graph allows
        # (None: wherever it does; False: never, an A/B switch for benchmarks)
        self.launch_ahead = None
        # launch the first step of a batch that changed (requests finished or were admitted) as
        # soon as the step before is read, before its tokens go back to the scheduler, as an
        # unchanged batch's is (False: on the next call, as before 2026-12-07; an A/B switch)
        self.relaunch_changed = True
        self._plain_inflight: _PlainStep | None = None  # the pipelined plain step in flight
        self._next_host = None  # two (pinned buffer for a step's next tokens, its event), used in turn
        self._host_turn = 0
        # CPU tests of chunks beside decode steps (no side stream there): a chunk asked to run beside
        # runs at once but hands its first tokens over a step late, through the same scheduler states
        self.defer_chunks = False
        self._prefill_stream = None
        self.prompt_entropy = False  # whether seed_estimates wants each prompt's last entropy

    def max_new_slots_per_step(self) -> int:
        """KV slots one decode step may take per request (the scheduler reserves them)."""
        return 1

    def on_admit(self, req: Request) -> None:
        """A request enters the running set (spec workers set up per-request state here)."""

    def on_finish(self, req: Request) -> None:
        """A request leaves: free its KV (and its slot in a pipelined step in flight, which the
        device writes before any later use of it: all work is on one stream)."""
        self.kv.free(req.kv_slots)
        req.kv_slots = _EMPTY
        if self._plain_inflight is not None:
            sl = self._plain_inflight.slots.pop(id(req), None)
            if sl is not None:
                self.kv.free(sl)

    def prefill(self, reqs: list[Request], chunk_lens: list[int]) -> dict[str, list[int]]:
        """Run prompt chunks for several requests in one forward; return the first token of each
        request whose prompt is now complete."""
        return self.finish_prefill(self.launch_prefill(reqs, chunk_lens), block=True)

    def can_join(self, reqs: list[Request], chunk_lens: list[int]) -> bool:
        """Whether this chunk's requests may join the decode batch before their first tokens are
        read (`launch_prefill(join=True)`). Plain steps take their input tokens from the host: no."""
        return False

    def launch_prefill(self, reqs: list[Request], chunk_lens: list[int], beside: bool = False,
                       join: bool = False) -> PromptChunk:
        """Start a prompt-chunk forward. beside=True (the scheduler asks when other requests are
        decoding): where it can, the chunk runs on a side stream and this returns at once, so the
        decode steps launched meanwhile run beside it instead of waiting behind it; its first
        tokens are read by `finish_prefill`. It can on CUDA when the chunk replays a prefill graph
        captured apart from the step graphs (`CudaGraphRunner.can_prefill_beside`), every request is
        greedy and completes its prompt in this chunk. Elsewhere the chunk runs on the stream of
        everything else, as `prefill`.

        join=True (only where `can_join` said yes): the chunk runs on the stream of everything else
        and this returns without reading it; each request's first token (the argmax) and hidden
        state go to the decode step's pools on the device (`pool_prompts`), and the request is
        `joining`: the scheduler decodes it with the others at once, and reads its first token
        (`finish_prefill`) before any token of its own steps."""
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
        # built on the host: a prefill graph uploads it in one copy, an eager forward moves it
        fb = ForwardBatch.build(tokens, prefixes, slots, logits_indices=torch.tensor([i for _, i in done], dtype=torch.long))
        for req, new, n in zip(reqs, slots, chunk_lens):  # the forward reads none of these: fb holds them
            req.append_kv(new)
            req.num_prefilled += n
        if join:
            return self._launch_unread(reqs, [r for r, _ in done], fb, None, join=True)
        side, deferred = None, False
        if beside and len(done) == len(reqs) and all(r.sampling.greedy for r in reqs):
            g = self.runner.graphs
            if g is not None and g.can_prefill_beside(fb):
                if self._prefill_stream is None:
                    self._prefill_stream = torch.cuda.Stream(self.runner.device)
                side = self._prefill_stream
            deferred = side is None and self.defer_chunks
        if side is None:
            return PromptChunk(reqs, done=[r for r, _ in done], results=self._first_tokens(done, fb), deferred=deferred)
        # the side stream starts after everything queued so far (the tree slots of a finished
        # request's step in flight may be among this chunk's slots); later steps run beside it
        side.wait_stream(torch.cuda.current_stream())
        return self._launch_unread(reqs, [r for r, _ in done], fb, side)

    def _launch_unread(self, reqs: list[Request], done: list[Request], fb: ForwardBatch, side, join: bool = False
                       ) -> PromptChunk:
        """The chunk's forward on `side` (None: the current stream), its first tokens (greedy) and
        prompt entropies queued to the host behind an event, nothing read."""
        n, cuda = len(done), self.runner.device.type == "cuda"
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            out = self.runner.forward(fb)
            first = out.logits.argmax(-1)
            hidden = out.hidden.clone()  # a prefill graph's output is a static buffer the next forward rewrites
            if join:
                self.pool_prompts(done, hidden, first)
            host = torch.empty(2 * n, dtype=torch.float64, pin_memory=cuda)
            host[:n].copy_(first, non_blocking=True)
            if self.prompt_entropy:
                host[n:].copy_(entropy_from_logits(out.logits), non_blocking=True)
            event = torch.cuda.Event() if cuda else None
            if event is not None:
                staging.record(event)
        if join:
            for j, req in enumerate(done):
                req.last_hidden, req.joining = hidden[j], True
        return PromptChunk(reqs, done=done, hidden=hidden, host=host, event=event, joins=join)

    def pool_prompts(self, reqs: list[Request], hidden: torch.Tensor, first: torch.Tensor) -> None:
        """Hook for workers that can_join: put each finished prompt's hidden state and first token
        (device tensors) where its first decode step reads them."""

    def finish_prefill(self, chunk: PromptChunk, block: bool = False) -> dict[str, list[int]] | None:
        """The first tokens of a launched chunk's finished prompts, or None while it still runs
        (block=False). A deferred chunk (CPU tests) is done on its second call."""
        if chunk.results is not None:
            if chunk.deferred and not block:
                chunk.deferred = False
                return None
            return chunk.results
        ev = chunk.event
        if ev is not None:  # (None: the CPU, where the chunk is done)
            if not block and not ev.query():
                return None
            ev.synchronize()
            if not chunk.joins:  # made on the side stream, used on this one from now on
                main = torch.cuda.current_stream()
                main.wait_event(ev)
                chunk.hidden.record_stream(main)
        n = len(chunk.done)
        first = chunk.host[:n].long().tolist()
        for j, req in enumerate(chunk.done):
            if chunk.joins:  # its hidden state was set at launch; its steps since may have moved it on
                req.joining = False
            else:
                req.last_hidden = chunk.hidden[j]
        if self.prompt_entropy:
            self.seed_estimates(chunk.done, chunk.host[n:].float())
        chunk.results = {r.rid: [t] for r, t in zip(chunk.done, first)}
        return chunk.results

    def _first_tokens(self, done, fb: ForwardBatch) -> dict[str, list[int]]:
        out = self.runner.forward(fb)
        if not done:
            return {}
        reqs = [r for r, _ in done]
        first = sample(out.logits, [r.sampling for r in reqs], [r.generator for r in reqs])
        hidden = out.hidden.clone()  # a prefill graph's output is a static buffer the next forward rewrites
        for j, req in enumerate(reqs):
            req.last_hidden = hidden[j]
        if self.prompt_entropy:
            self.seed_estimates(reqs, entropy_from_logits(out.logits).cpu())
        return {r.rid: [int(t)] for r, t in zip(reqs, first.tolist())}

    def seed_estimates(self, reqs: list[Request], entropy: torch.Tensor) -> None:
        """Hook for spec workers (prompt_entropy = True): each finished prompt's last next-token
        entropy, [len(reqs)] on the host, seeds its estimate."""

    def decode(self, reqs: list[Request]) -> dict[str, list[int]]:
        """One autoregressive step: each request's pending token in, one new token out."""
        return self.plain_decode(reqs)

    # ---- plain steps, pipelined ---------------------------------------------------------------
    def plain_decode(self, reqs: list[Request]) -> dict[str, list[int]]:
        """A plain step's tokens. Greedy batches with decode graphs are pipelined: the next step of
        an unchanged batch is launched before this step's tokens go back to the scheduler, so its
        stop checks, streaming and metrics run while the GPU works (the speculative device step
        does the same, spec/worker.py). Where the decode graph is planned through buffers used in
        turn (the Triton decode attention), the next step is launched even before this step's
        tokens are read, fed by its argmax on the device, so the GPU never waits for the host
        between steps. A request that stops meanwhile wastes its token of the step launched
        ahead; a batch that changed is launched once this step is read (`relaunch_changed`)."""
        if self._plain_inflight is not None:
            return self._plain_collect(reqs)
        if not self._pipelines(reqs):
            return self.plain_step(reqs)[0]
        self._plain_inflight = self._plain_launch(reqs, [r.pending_token for r in reqs])
        return self._plain_collect(reqs)

    def _pipelines(self, reqs: list[Request]) -> bool:
        on = self.runner.graphs is not None if self.pipeline is None else self.pipeline
        return on and all(r.sampling.greedy for r in reqs)

    def _plain_launch(self, reqs: list[Request], tokens: list[int] | None, after: _PlainStep | None = None
                      ) -> _PlainStep:
        """Launch a greedy plain step from host tokens, or (tokens None) from the step `after`,
        still in flight: its argmax on the device, its slots between each prefix and the new slot."""
        n = len(reqs)
        slots = self.kv.alloc(n)
        if after is None:
            fb = ForwardBatch.build_decode(tokens, [r.kv_slots for r in reqs], slots, device="cpu")
            nxt = self.runner.forward(fb).logits.argmax(-1)
        else:
            pending = torch.from_numpy(np.concatenate([after.slots[id(r)] for r in reqs]))
            fb = ForwardBatch.build_decode([0] * n, [r.kv_slots for r in reqs], slots, device="cpu",
                                           pending_slots=pending)
            nxt = self.runner.forward(fb, input_ids=after.next_tokens).logits.argmax(-1)
        # two pinned buffers and events, used in turn: with a step launched ahead, two are in flight
        if self._next_host is None or self._next_host[0][0].numel() < n:
            self._next_host = [(torch.zeros(max(n, 64), dtype=torch.long, pin_memory=nxt.is_cuda),
                                torch.cuda.Event() if nxt.is_cuda else None) for _ in range(2)]
            self._host_turn = 0
        host, done = self._next_host[self._host_turn]
        self._host_turn ^= 1
        host[:n].copy_(nxt, non_blocking=True)
        if done is not None:
            staging.record(done)
        return _PlainStep(reqs, dict(zip(map(id, reqs), slots.numpy().reshape(n, 1))), nxt, host, done)

    def _launches_ahead(self, reqs: list[Request], step: _PlainStep) -> bool:
        """Whether the step after `step` can be launched before `step` is read: the same batch,
        greedy, and a decode graph that may be queued behind another (CudaGraphRunner.queue_safe_decode)."""
        g = self.runner.graphs
        if self.launch_ahead is False or g is None or not same_batch(step.reqs, reqs) or not self._pipelines(reqs):
            return False
        return g.queue_safe_decode(len(reqs), sum(r.num_kv + 2 for r in reqs))

    def _plain_collect(self, reqs: list[Request]) -> dict[str, list[int]]:
        step, self._plain_inflight = self._plain_inflight, None
        ahead = self._plain_launch(reqs, None, after=step) if self._launches_ahead(reqs, step) else None
        if step.done is not None:
            step.done.synchronize()
        toks = step.host[: len(step.reqs)].tolist()
        results = {}
        for r, t in zip(step.reqs, toks):
            s = step.slots.get(id(r))
            if s is None:  # finished while the step ran (on_finish freed its slot)
                continue
            r.append_kv(s)
            results[r.rid] = [t]
        if ahead is not None:
            self._plain_inflight = ahead
        elif len(results) == len(step.reqs) and same_batch(step.reqs, reqs) and self._pipelines(reqs):
            self._plain_inflight = self._plain_launch(reqs, [results[r.rid][0] for r in reqs])
        elif self.relaunch_changed and reqs and not any(r.joining for r in reqs) and self._pipelines(reqs) \
                and self._relaunches_plain(reqs):
            # a batch that changed: each request's input is the token just read, or a new request's
            # first token; else the GPU would wait through the scheduler's bookkeeping and the next call
            self._plain_inflight = self._plain_launch(
                reqs, [results[r.rid][0] if r.rid in results else r.pending_token for r in reqs])
        return results

    def _relaunches_plain(self, reqs: list[Request]) -> bool:
        """Whether a changed batch's next step is a plain step (a speculative worker's may draft)."""
        return True

    def plain_step(self, reqs: list[Request]):
        """The autoregressive step; also returns the forward's output (valid until the next forward)."""
        slots = self.kv.alloc(len(reqs))
        # with decode graphs the batch stays on the host: the graph runner sends it up in two copies
        fb = ForwardBatch.build_decode([r.pending_token for r in reqs], [r.kv_slots for r in reqs], slots,
                                       device="cpu" if self.runner.graphs is not None else self.runner.device)
        out = self.runner.forward(fb)
        nxt = sample(out.logits, [r.sampling for r in reqs], [r.generator for r in reqs]).tolist()
        for r, s in zip(reqs, slots.numpy().reshape(-1, 1)):
            r.append_kv(s)
        return {r.rid: [t] for r, t in zip(reqs, nxt)}, out
