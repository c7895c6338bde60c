"""Engine: tokenizer + scheduler + worker + model runner, driven by one background thread.

Two ways in:
  * offline: `engine.generate(prompts, sampling)` runs the scheduler in the caller's thread
    until those requests finish (benchmarks, data generation, tests);
  * online: `engine.start()` then `engine.submit(req, on_output)`; the loop thread calls
    `on_output(StepOutput)` after every step that touched the request (the server bridges
    this into asyncio). `abort(rid)` and `shutdown(drain=True)` are thread-safe.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from srt_entmtp.detokenizer import Detokenizer
from srt_entmtp.model.runner import ModelRunner
from srt_entmtp.model.tokenizer import encode_chat, load_tokenizer
from srt_entmtp.sched.request import ParamError, Request, SamplingParams, SpecOptions
from srt_entmtp.sched.scheduler import QueueFullError, Scheduler, StepOutput

log = logging.getLogger(__name__)

ALGORITHMS = ("ENTMTP", "STATIC", "NONE")
DRAFTERS = ("medusa", "hydra", "mtp")
SPEC_POLICIES = ("entmtp", "static", "confidence", "none")


@dataclass
class EngineArgs:
    model_path: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    attention_backend: str = "auto"
    context_length: int | None = 4096
    kv_slots: int | None = None
    max_running_requests: int = 16
    max_waiting_requests: int = 256
    chunked_prefill_size: int = 512
    speculative_algorithm: str = "NONE"
    drafter: str = "mtp"
    draft_heads: str | None = None       # heads directory; None = the shipped default for the drafter
    tree_library: str | None = None      # library JSON; None = the shipped default
    static_tree: str | None = None       # tree name for STATIC (None = the library's general default)
    draft_dtype: str = "auto"            # auto: int8 draft heads where they run (CPU float32); int8; model
    lookup_tokens: int | None = None     # prompt-lookup branch length; None = the library's setting, 0 = off
    cuda_graph: bool = True              # capture decode / verify forwards on CUDA (flashinfer backend)
    cuda_graph_max_bs: int = 64          # largest batch with a graph; bigger batches run eagerly
    cuda_graph_min_tree_nodes: int = 0   # capture verify graphs for trees at least this big (calibration)
    prefill_cuda_graph: bool = True      # prompt chunks replay graphs too (cuda_graph.py: prefill shapes)
    overlap_prefill: bool = False        # a chunk admitted while others decode runs beside their steps (CUDA, graphs)
    spec_step: str = "auto"              # greedy speculative steps: device (fixed-shape, graphs), host; auto = device on CUDA
    tree_attention: str = "auto"         # the graphs' attention: auto = Triton's tree kernel where it runs (decode steps as one-node trees), flashinfer
    pipeline: bool = True                # launch the next greedy step of an unchanged batch before the tokens go back
    join_ahead: bool = False             # a new greedy request decodes before its first token is read (device spec
                                         # steps); off: experimental (wrong tokens on the H100 until fenced, docs/gpu.md)
    extra: dict = field(default_factory=dict)


class Engine:
    def __init__(self, args: EngineArgs | None = None, **kw):
        self.args = args = args or EngineArgs(**kw)
        if args.speculative_algorithm not in ALGORITHMS:
            raise ValueError(f"--speculative-algorithm {args.speculative_algorithm!r}: choose {', '.join(ALGORITHMS)}")
        self.runner = ModelRunner(args.model_path, dtype=args.dtype, device=args.device,
                                  attention_backend=args.attention_backend, context_length=args.context_length,
                                  kv_slots=args.kv_slots)
        self.tokenizer = load_tokenizer(self.runner.model_dir)
        self.model_name = self.runner.model_dir.name
        self.context_length = self.runner.context_length
        self.worker = self._make_worker()
        if not args.pipeline:
            self.worker.pipeline = False
        if args.cuda_graph and self.runner.device.type == "cuda":
            # plain decode steps (NONE, and speculative steps where no request drafts), and tree
            # verification bounded by the library's largest tree
            plain = args.speculative_algorithm == "NONE"
            self.runner.capture_cuda_graphs(min(args.max_running_requests, args.cuda_graph_max_bs),
                                            max_tree_nodes=0 if plain else max(self.worker.max_new_slots_per_step(),
                                                                               args.cuda_graph_min_tree_nodes),
                                            decode_attention=args.tree_attention,
                                            prefill_tokens=args.chunked_prefill_size if args.prefill_cuda_graph else 0,
                                            prefill_beside=args.overlap_prefill)
            step = getattr(self.worker, "device_step", None)
            if step is not None and self.runner.graphs is not None:
                step.capture(min(args.max_running_requests, args.cuda_graph_max_bs), self.runner.graphs.workspace)
        cfg = self.runner.config
        eos = set(cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = tuple(sorted(eos))
        self.detok = Detokenizer(self.tokenizer)
        self.scheduler = Scheduler(self.worker, max_running=args.max_running_requests,
                                   max_waiting=args.max_waiting_requests, chunk_tokens=args.chunked_prefill_size,
                                   eos_ids=self.eos_ids, detokenizer=self.detok)
        self.scheduler.overlap_prefill = args.overlap_prefill
        # both halves on or off together: chunks unread before their requests decode, and changed
        # batches launched behind the step in flight
        self.scheduler.join_ahead = args.join_ahead
        if hasattr(self.worker, "launch_changed"):
            self.worker.launch_changed = args.join_ahead
        self._inbox: queue.Queue = queue.Queue()
        self._callbacks: dict[str, Callable[[StepOutput], None]] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._draining = False
        self.step_listeners: list[Callable[[list[StepOutput], float], None]] = []

    def _make_worker(self):
        a = self.args
        if a.speculative_algorithm == "NONE":
            from srt_entmtp.worker import Worker

            return Worker(self.runner)
        from srt_entmtp.spec.worker import SpecWorker

        return SpecWorker.create(self.runner, algorithm=a.speculative_algorithm, drafter=a.drafter,
                                 heads_path=a.draft_heads, library_path=a.tree_library, static_tree=a.static_tree,
                                 capacity=max(256, a.max_running_requests), draft_dtype=a.draft_dtype,
                                 lookup_tokens=a.lookup_tokens, spec_step=a.spec_step,
                                 tree_attention=a.tree_attention, max_batch=a.max_running_requests)

    # ---- building requests --------------------------------------------------------------------
    def tokenize_chat(self, messages: list[dict]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def make_request(self, prompt_ids: list[int], sampling: SamplingParams, spec: SpecOptions | None = None,
                     rid: str | None = None, prompt_text: str = "") -> Request:
        sampling.validate()
        if not prompt_ids:
            raise ParamError("prompt", "the prompt is empty")
        vocab = self.runner.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ParamError("prompt", f"token id {bad[0]} is outside this model's vocabulary [0, {vocab})")
        if spec is not None:
            self._check_spec(spec)
        total = len(prompt_ids) + sampling.max_new_tokens
        if total > self.context_length:
            raise ParamError("max_tokens", f"this model's context length is {self.context_length} tokens; the prompt has "
                             f"{len(prompt_ids)} and max_tokens asks for {sampling.max_new_tokens} ({total} in all)")
        return Request(prompt_ids, sampling, spec, rid=rid, prompt_text=prompt_text)

    def _check_spec(self, spec: SpecOptions) -> None:
        from srt_entmtp.spec.classify import TASK_FAMILIES

        if spec.task is not None and spec.task not in TASK_FAMILIES:
            raise ParamError("entmtp.task", f"task {spec.task!r} is not one of {', '.join(TASK_FAMILIES)}")
        if spec.policy is not None and spec.policy not in SPEC_POLICIES:
            raise ParamError("entmtp.policy", f"policy {spec.policy!r} is not one of {', '.join(SPEC_POLICIES)}")
        if spec.tree is not None and hasattr(self.worker, "tree_by_name"):
            try:
                self.worker.tree_by_name(spec.tree)
            except (KeyError, ValueError):
                names = ", ".join(self.worker.tree_names())
                raise ParamError("entmtp.tree", f"no tree named {spec.tree!r} in the tree library; known: {names}") from None

    # ---- offline ----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], sampling: SamplingParams | list[SamplingParams] | None = None,
                 spec: SpecOptions | list[SpecOptions] | None = None) -> list[Request]:
        """Run the given prompts to completion in this thread (the loop thread must not be running)."""
        assert self._thread is None, "generate() is the offline API; use submit() while the loop runs"
        n = len(prompts)
        sps = sampling if isinstance(sampling, list) else [sampling or SamplingParams()] * n
        specs = spec if isinstance(spec, list) else [spec] * n
        reqs = [self.make_request(p, SamplingParams(**vars(s)), sp) for p, s, sp in zip(prompts, sps, specs)]
        for r in reqs:
            self.scheduler.add(r, bounded=False)
        left = 0  # the first unfinished request: checking all of them every step is O(n) host work a step
        while left < n:
            if reqs[left].finished:
                left += 1
                continue
            self._step()
        return reqs

    def generate_text(self, prompt: str, *, chat: bool = True, **sampling) -> str:
        ids = self.tokenize_chat([{"role": "user", "content": prompt}]) if chat else self.tokenize(prompt)
        req = self.generate([ids], SamplingParams(**sampling))[0]
        return self.detok.text(req)

    def _step(self) -> list[StepOutput]:
        t0 = time.perf_counter()
        outs = self.scheduler.step()
        dt = time.perf_counter() - t0
        for fn in self.step_listeners:
            fn(outs, dt)
        return outs

    # ---- online -------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="entmtp-engine", daemon=True)
        self._thread.start()

    def submit(self, req: Request, on_output: Callable[[StepOutput], None]) -> None:
        """Queue a request; raises QueueFullError when the waiting queue is full."""
        if self._draining:
            raise QueueFullError("server is shutting down")
        if len(self.scheduler.waiting) + self._inbox.qsize() >= self.scheduler.max_waiting:
            raise QueueFullError(f"waiting queue full ({self.scheduler.max_waiting} requests)")
        self._inbox.put(("add", req, on_output))

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid, None))

    def shutdown(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop taking requests; with drain, let the running ones finish first."""
        self._draining = True
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout
        while drain and (self.scheduler.has_work() or not self._inbox.empty()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=5)
        self._thread = None

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.05) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, obj, cb = item
            if kind == "add":
                self._callbacks[obj.rid] = cb
                try:
                    self.scheduler.add(obj)
                except QueueFullError:
                    obj.finish_reason = "abort"
                    self._notify(cb, StepOutput(obj, [], True))
                    self._callbacks.pop(obj.rid, None)
            elif kind == "abort":
                req = self.scheduler.abort(obj)
                cb2 = self._callbacks.pop(obj, None)
                if req is not None and cb2 is not None:
                    self._notify(cb2, StepOutput(req, [], True))
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._drain_inbox(block=not self.scheduler.has_work())
            if not self.scheduler.has_work():
                continue
            try:
                outs = self._step()
            except Exception:  # a bug in one step must not kill the server: fail the batch, go on
                log.exception("engine step failed; aborting the running requests")
                outs = []
                for req in list(self.scheduler.running):
                    self.scheduler.abort(req.rid)
                    outs.append(StepOutput(req, [], True))
            for o in outs:
                cb = self._callbacks.get(o.req.rid)
                if cb is not None:
                    self._notify(cb, o)
                if o.finished:
                    self._callbacks.pop(o.req.rid, None)

    @staticmethod
    def _notify(cb: Callable[[StepOutput], None], out: StepOutput) -> None:
        """A failing callback is the caller's bug: log it, never let it stop the loop."""
        try:
            cb(out)
        except Exception:
            log.exception("output callback for %s failed", out.req.rid)

    @property
    def alive(self) -> bool:
        """True while the loop thread runs (the server's /health reads this)."""
        return self._thread is not None and self._thread.is_alive()
