"""Helpers for tests of the device speculative step (spec/device_step.py), on CPU and GPU."""
from __future__ import annotations


class EagerReplay:
    """A CUDA graph's stand-in: replay = run what it would have captured, now."""

    def __init__(self, fn):
        self.replay = fn


def install_graph_stand_ins(eng, context: int = 2048) -> None:
    """Give every (layout, batch bucket) of the engine's device step a Triton TreeAttention and
    stand-ins for its draft and verify graphs (no CUDA here), so steps are planned and fed as in
    a graph replay, and may be launched after an unread step as with real graphs."""
    from srt_entmtp.model.attention import tree_triton
    from srt_entmtp.spec.device_step import batch_buckets

    step, cfg = eng.worker.device_step, eng.runner.config
    for li, sh in enumerate(step.shapes):
        S = sh.layout.num_slots
        for B in ([1] if sh.lone else batch_buckets(step.max_batch)):
            attn = tree_triton.TreeAttention(eng.runner.kv, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                             sh.out_slots[:B * S], B, S, B * (context + S))
            step.graphs[(li, B)] = (attn, EagerReplay(lambda sh=sh, B=B: step._draft_body(sh, B)),
                                    EagerReplay(lambda sh=sh, B=B, attn=attn: step._verify_body(sh, B, attn)))


def record_changed_launches(step) -> list[bool]:
    """Spy on step.launch_verify: for each verify launched after an unread step of other
    requests (a batch that changed), whether a joining request was among its own."""
    changed: list[bool] = []
    launch = step.launch_verify

    def spy(d, after=None):
        if after is not None and [id(r) for r in after.reqs] != [id(r) for r in d.reqs]:
            changed.append(any(r.joining for r in d.reqs))
        return launch(d, after=after)
    step.launch_verify = spy
    return changed
