"""CUDA-graph bucketing and padding, checked on CPU (the capture itself runs in tests/gpu).

A replayed graph computes a batch padded with dummy requests that read and write only the
reserved KV slot 0. Here the padded batch runs through the real model with the SDPA backend:
the real rows must equal the unpadded forward, and no real KV slot may change. And every batch
the engine can send within the limits must find a captured shape.
"""
from __future__ import annotations

import torch

from srt_entmtp.model.cuda_graph import CudaGraphRunner, decode_batches, pad_batch, verify_shapes
from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.spec.drafters.bench import bench_tree


def _tree_batch(runner, prefixes, trees, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = runner.kv
    pre = [kv.alloc(p) for p in prefixes]
    runner.forward(ForwardBatch.build([torch.randint(100, 5000, (p,), generator=g) for p in prefixes],
                                      [torch.empty(0, dtype=torch.long)] * len(prefixes), pre,
                                      logits_indices=torch.tensor([0])))
    new = [kv.alloc(t.num_nodes) for t in trees]
    toks = [torch.randint(100, 5000, (t.num_nodes,), generator=g) for t in trees]
    pos = [p + t.depths for p, t in zip(prefixes, trees)]
    fb = ForwardBatch.build(toks, pre, new, positions=pos, custom_masks=[t.mask for t in trees])
    return fb, pre + new


def test_padded_tree_batch_gives_the_same_rows_and_touches_only_slot_0(runner):
    trees = [bench_tree(n) for n in (7, 1, 12)]
    fb, slots = _tree_batch(runner, [20, 9, 33], trees)
    try:
        ref = runner.forward(fb)
        ref_h, ref_l = ref.hidden.clone(), ref.logits.clone()
        k_before = runner.kv.k[:, 1:].clone()
        padded = pad_batch(fb, batch=6, tokens=32)
        assert padded.batch_size == 6 and padded.num_tokens == 32
        assert padded.q_lens[3:] == [1, 1, 32 - fb.num_tokens - 2] and padded.kv_lens[3:] == [1, 1, 1]
        assert bool((padded.out_slots[fb.num_tokens:] == 0).all())
        out = runner.forward(padded)
        torch.testing.assert_close(out.hidden[:fb.num_tokens], ref_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits[:fb.num_tokens], ref_l, rtol=1e-4, atol=1e-4)
        # real slots hold exactly what they held (the same K was rewritten by the same tokens)
        torch.testing.assert_close(runner.kv.k[:, 1:], k_before, rtol=0, atol=1e-6)
    finally:
        for s in slots:
            runner.kv.free(s)


def test_pad_batch_rejects_shapes_it_cannot_reach(runner):
    fb, slots = _tree_batch(runner, [5, 6], [bench_tree(4), bench_tree(4)])
    try:
        for batch, tokens in [(1, 16), (3, 8), (2, 9)]:  # fewer requests; too few tokens; spare tokens, no dummy
            try:
                pad_batch(fb, batch, tokens)
            except ValueError:
                continue
            raise AssertionError(f"pad_batch accepted {batch} requests / {tokens} tokens")
    finally:
        for s in slots:
            runner.kv.free(s)


def test_every_batch_within_the_limits_finds_a_graph_shape(runner):
    assert decode_batches(64)[:5] == [1, 2, 4, 8, 16] and decode_batches(64)[-1] == 64
    assert decode_batches(3) == [1, 2, 3]
    max_nodes = 63
    for max_batch in (1, 8, 64):
        shapes = verify_shapes(max_batch, max_nodes)
        assert all(n >= b for b, n in shapes)
        graphs = CudaGraphRunner(runner, max_batch, max_nodes, decode=False)
        graphs.graphs = {(b, n, t): (b, n) for b, n, t in graphs.shapes}  # stand-ins: _pick only looks shapes up
        for b in range(1, max_batch + 1):
            for n in sorted({b, 2 * b, b * max_nodes // 2, b * max_nodes}):
                mask = torch.ones(1, dtype=torch.bool)
                fb = ForwardBatch(input_ids=torch.zeros(n, dtype=torch.long), positions=None, out_slots=None,
                                  qo_indptr=None, kv_indptr=None, kv_indices=None, q_lens=[1] * b, kv_lens=[1] * b,
                                  custom_mask=mask)
                got = graphs._pick(fb)
                assert got is not None, f"no verify graph for {b} requests / {n} tokens (max batch {max_batch})"
                batch, tokens = got
                assert batch > b and tokens >= n + batch - b and tokens < 2 * (n + batch - b) + 2
        decode = CudaGraphRunner(runner, max_batch, 0, decode=True)
        decode.graphs = {(b, n, t): (b, n) for b, n, t in decode.shapes}
        for b in range(1, max_batch + 1):
            fb = ForwardBatch(input_ids=torch.zeros(b, dtype=torch.long), positions=None, out_slots=None,
                              qo_indptr=None, kv_indptr=None, kv_indices=None, q_lens=[1] * b, kv_lens=[1] * b)
            assert decode._pick(fb) is not None
        # beyond the limits: eager
        fb = ForwardBatch(input_ids=torch.zeros(max_batch + 1, dtype=torch.long), positions=None, out_slots=None,
                          qo_indptr=None, kv_indptr=None, kv_indices=None, q_lens=[1] * (max_batch + 1),
                          kv_lens=[1] * (max_batch + 1))
        assert decode._pick(fb) is None


def test_decode_and_verify_graphs_of_the_same_size_are_told_apart(runner):
    """The decode graph for 2 requests and the one-request verify graph of 2 tokens (plus its
    padding request) are both (2 requests, 2 tokens); each batch must get its own kind (keys
    without the kind once made a 2-request decode step replay the tree graph)."""
    both = CudaGraphRunner(runner, 8, 4, decode=True)
    assert (2, 2, False) in both.shapes and (2, 2, True) in both.shapes
    both.graphs = {s: s for s in both.shapes}
    decode = ForwardBatch(input_ids=torch.zeros(2, dtype=torch.long), positions=None, out_slots=None, qo_indptr=None,
                          kv_indptr=None, kv_indices=None, q_lens=[1, 1], kv_lens=[1, 1])
    tree = ForwardBatch(input_ids=torch.zeros(1, dtype=torch.long), positions=None, out_slots=None, qo_indptr=None,
                        kv_indptr=None, kv_indices=None, q_lens=[1], kv_lens=[1], custom_mask=torch.ones(1, dtype=torch.bool))
    assert both._pick(decode) == (2, 2, False)
    assert both._pick(tree) == (2, 2, True)


def test_only_decode_graphs_planned_in_turn_may_be_queued_behind_the_step_before(runner):
    """Worker launches a plain step before the one before is read only where the decode graph
    plans through buffers used in turn (the Triton decode attention; stand-in attention objects
    here) and its KV capacity holds the batch plus the padding requests' one key each."""
    from types import SimpleNamespace

    from srt_entmtp.model.cuda_graph import CapturedForward

    graphs = CudaGraphRunner(runner, 8, 0, decode=True)
    graphs.graphs = {(b, n, t): CapturedForward(SimpleNamespace(batch=b, kv_capacity=100 * b, plans_in_turn=b != 4),
                                                None) for b, n, t in graphs.shapes}
    assert graphs.shapes[:4] == [(1, 1, False), (2, 2, False), (4, 4, False), (8, 8, False)]
    assert graphs.queue_safe_decode(1, 50) and graphs.queue_safe_decode(2, 200)
    assert not graphs.queue_safe_decode(1, 101), "over the graph's KV capacity: eager"
    assert not graphs.queue_safe_decode(3, 10), "padded to the 4-request graph, planned by FlashInfer here"
    assert graphs.queue_safe_decode(5, 797) and not graphs.queue_safe_decode(5, 798), "797 + 3 padding keys <= 800"
    assert not graphs.queue_safe_decode(9, 10), "beyond the largest graph: eager"


def test_padded_prompt_chunks_give_the_same_rows_and_touch_only_slot_0(runner):
    """A prefill graph's padding: dummy requests with as many keys (slot 0) as tokens, so their
    causal rows have keys; the real rows, one of them continuing a prefix, are unchanged."""
    g = torch.Generator().manual_seed(3)
    kv = runner.kv
    pre = [kv.alloc(n) for n in (0, 12, 0)]
    runner.forward(ForwardBatch.build([torch.randint(100, 5000, (12,), generator=g)], [torch.empty(0, dtype=torch.long)],
                                      [pre[1]], logits_indices=torch.tensor([11])))
    new = [kv.alloc(n) for n in (9, 5, 17)]
    fb = ForwardBatch.build([torch.randint(100, 5000, (n,), generator=g) for n in (9, 5, 17)], pre, new,
                            logits_indices=torch.tensor([8, 13, 30]))
    try:
        ref = runner.forward(fb)
        ref_h, ref_l = ref.hidden.clone(), ref.logits.clone()
        k_before = runner.kv.k[:, 1:].clone()
        padded = pad_batch(fb, batch=5, tokens=64, causal=True)
        assert padded.q_lens[3:] == [1, 64 - 31 - 1] and padded.kv_lens[3:] == padded.q_lens[3:]
        assert int(padded.kv_indptr[-1]) == padded.kv_indices.numel() == sum(fb.kv_lens) + 33
        assert bool((padded.kv_indices[sum(fb.kv_lens):] == 0).all()) and bool((padded.out_slots[31:] == 0).all())
        out = runner.forward(padded)
        torch.testing.assert_close(out.hidden, ref_h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.logits, ref_l, rtol=1e-4, atol=1e-4)
        # the real rows rewrite their own slots (the same K up to the batch's matmul rounding);
        # every other slot but 0 is untouched
        written = torch.zeros(runner.kv.k.shape[1] - 1, dtype=torch.bool)
        written[fb.out_slots - 1] = True
        torch.testing.assert_close(runner.kv.k[:, 1:][:, written], k_before[:, written], rtol=0, atol=1e-4)
        assert torch.equal(runner.kv.k[:, 1:][:, ~written], k_before[:, ~written])
    finally:
        for s in pre + new:
            kv.free(s)


def test_every_prompt_chunk_within_the_chunk_size_finds_a_prefill_shape(runner):
    from srt_entmtp.model.cuda_graph import prefill_shapes

    assert prefill_shapes(1, 512) == [(2, n) for n in (16, 32, 64, 128, 256, 528)]
    assert max(b for b, _ in prefill_shapes(64, 512)) == 17 and all(n > b for b, n in prefill_shapes(64, 512))
    for max_batch in (1, 3, 16, 64):
        graphs = CudaGraphRunner(runner, max_batch, 0, decode=False, prefill_tokens=512)
        assert not graphs.shapes and graphs.prefill_shapes
        for b in range(1, min(max_batch, 16) + 1):
            for n in sorted({b, 3 * b, 100, 511, 512} - set(range(b))):
                fb = ForwardBatch(input_ids=torch.zeros(n, dtype=torch.long), positions=None, out_slots=None,
                                  qo_indptr=None, kv_indptr=None, kv_indices=None, q_lens=[1] * b, kv_lens=[1] * b)
                got = graphs._pick_prefill(fb)
                assert got is not None, f"no prefill graph for {b} requests / {n} tokens (max batch {max_batch})"
                batch, tokens = got
                assert batch > b and tokens >= n + batch - b
                assert tokens <= max(16, 2 * (n + batch - b)) or tokens == 528, (b, n, got)
        # more requests than the largest bucket: eager
        many = min(max_batch, 16) + 1
        fb = ForwardBatch(input_ids=torch.zeros(many, dtype=torch.long), positions=None, out_slots=None,
                          qo_indptr=None, kv_indptr=None, kv_indices=None, q_lens=[1] * many, kv_lens=[1] * many)
        assert graphs._pick_prefill(fb) is None


def test_prefill_keeps_its_hidden_states_past_the_next_graph_replay_mocked_graph(runner):
    """A prefill graph returns views of static buffers that its next replay rewrites. Mocked on
    CPU: a stand-in for the graph runner copies the eager result into one static buffer and
    returns views of it. Each request's last hidden state (the drafters' input) must still be its
    own after the next request's prefill."""
    from srt_entmtp.sched.request import Request, SamplingParams
    from srt_entmtp.worker import Worker

    class StaticOutputs:  # the part of CudaGraphRunner.forward a prefill sees
        def __init__(self):
            self.hidden = torch.zeros(4, runner.config.hidden_size)
            self.logits = torch.zeros(4, runner.config.vocab_size)
            self.replays = 0

        def forward(self, fb, input_ids=None):
            runner.graphs = None
            try:
                out = runner.forward(fb)
            finally:
                runner.graphs = self
            k = out.hidden.shape[0]
            self.hidden[:k].copy_(out.hidden)
            self.logits[:k].copy_(out.logits)
            self.replays += 1
            return self.hidden[:k], self.logits[:k]

    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(100, 5000, (n,), generator=g).tolist() for n in (11, 7)]
    worker = Worker(runner)
    reqs = [Request(p, SamplingParams(max_new_tokens=4)) for p in prompts]
    try:
        ref = []
        for r in reqs:  # eager: a fresh tensor each
            worker.prefill([r], [len(r.prompt_ids)])
            ref.append(r.last_hidden.clone())
        for r in reqs:
            worker.on_finish(r)
            r.num_prefilled = 0
        fake = StaticOutputs()
        runner.graphs = fake
        for r in reqs:
            worker.prefill([r], [len(r.prompt_ids)])
        assert fake.replays == 2
        for r, h in zip(reqs, ref):
            torch.testing.assert_close(r.last_hidden, h, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(ref[0], ref[1])
    finally:
        runner.graphs = None
        for r in reqs:
            worker.on_finish(r)
