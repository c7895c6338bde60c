"""Prometheus metrics of one server (its own CollectorRegistry, so several apps can coexist).

Per-request latencies are observed from the request's StepOutputs (engine thread), measured from
the moment the HTTP handler received the request; token and speculation counters come from the
engine's step listener, so they count every step the engine runs.
"""
from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 20.0, 60.0)
_E2E = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ACCEPT = (1, 1.5, 2, 2.5, 3, 3.5, 4, 5, 6, 7, 8, 10, 12, 16)
_ENTROPY = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        p = "entmtp_"
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time from request receipt to its first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram(p + "inter_token_latency_seconds", "Time between consecutive output tokens "
                             "(a step that emits k tokens counts k intervals of step/k)", buckets=_LATENCY, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Time from request receipt to its last token",
                             buckets=_E2E, registry=r)
        self.running = Gauge(p + "num_running_reqs", "Requests in the running batch", registry=r)
        self.waiting = Gauge(p + "num_waiting_reqs", "Requests waiting for admission", registry=r)
        self.kv_free = Gauge(p + "kv_free_slots", "Free token slots in the KV cache pool", registry=r)
        sched = engine.scheduler
        self.running.set_function(lambda: len(sched.running))
        self.waiting.set_function(lambda: len(sched.waiting))
        self.kv_free.set_function(lambda: engine.runner.kv.num_free)
        self.prompt_tokens = Counter(p + "prompt_tokens_total", "Prompt tokens prefilled", registry=r)
        self.gen_tokens = Counter(p + "generation_tokens_total", "Output tokens generated", registry=r)
        self.verify_steps = Counter(p + "spec_verify_steps_total", "Speculative verify steps (one per request "
                                    "per step)", registry=r)
        self.requests = Counter(p + "requests_total", "Finished requests by finish reason (abort = cancelled "
                                "or failed)", ["finish_reason"], registry=r)
        self.accept_len = Histogram(p + "spec_accept_length", "Tokens emitted per verify step (accepted drafts "
                                    "+ the bonus token)", buckets=_ACCEPT, registry=r)
        self.tree_choices = Counter(p + "tree_choices_total", "Verify steps by task family and chosen tree",
                                    ["task", "tree"], registry=r)
        self.entropy = Histogram(p + "entropy_nats", "Rolling next-token entropy estimate seen by the tree "
                                 "policy, per verify step", buckets=_ENTROPY, registry=r)
        self.trees_per_step = Histogram(p + "spec_trees_per_step", "Distinct trees verified together in one "
                                        "ragged verify step", buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self.step_latency = Histogram(p + "step_latency_seconds", "Duration of one engine step (one forward "
                                      "pass)", buckets=_LATENCY, registry=r)

    # engine thread: after every step
    def on_step(self, outs, step_seconds: float) -> None:
        self.step_latency.observe(step_seconds)
        n = sum(len(o.new_ids) for o in outs)
        if n:
            self.gen_tokens.inc(n)
        trees = {o.spec.get("tree") for o in outs if o.spec}
        if trees:
            self.trees_per_step.observe(len(trees))
        for o in outs:
            spec = o.spec
            if not spec:
                continue
            self.verify_steps.inc()
            acc = spec.get("accepted")
            tokens = acc + 1 if isinstance(acc, (int, float)) else len(o.new_ids)
            self.accept_len.observe(tokens)
            self.tree_choices.labels(task=str(spec.get("task") or o.req.task or "general"),
                                     tree=str(spec.get("tree") or "none")).inc()
            ent = spec.get("entropy")
            if isinstance(ent, (int, float)):
                self.entropy.observe(float(ent))

    # engine thread: one of our requests produced output (or finished)
    def on_output(self, gen, out) -> None:
        now = time.monotonic()
        n = len(out.new_ids)
        if n:
            if gen.t_first is None:
                gen.t_first = now
                self.ttft.observe(now - gen.t0)
                self.prompt_tokens.inc(len(out.req.prompt_ids))
            else:
                dt = (now - gen.t_last) / n
                for _ in range(n):
                    self.itl.observe(dt)
            gen.t_last = now
        if out.finished:
            reason = out.req.finish_reason or "abort"
            self.requests.labels(finish_reason=reason).inc()
            if reason != "abort":
                self.e2e.observe(now - gen.t0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
