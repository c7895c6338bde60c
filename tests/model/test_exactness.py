"""The native runner against transformers on the same weights: logits, greedy tokens, tree masks."""
from __future__ import annotations

import torch

from srt_entmtp.model.forward_batch import ForwardBatch
from srt_entmtp.model.tokenizer import encode_chat
from tests.conftest import load_prompts

EMPTY = torch.empty(0, dtype=torch.long)


def _prefill(runner, seqs):
    slots = [runner.kv.alloc(len(s)) for s in seqs]
    out = runner.forward(ForwardBatch.build([torch.tensor(s) for s in seqs], [EMPTY] * len(seqs), slots))
    return out, slots


def test_logits_match_transformers_on_a_ragged_batch(runner, hf_model, tokenizer):
    texts = ["def fibonacci(n):\n    ", "The capital of France is", "Natalia sold clips to 48 of her friends in April",
             "Write a short story about a lighthouse keeper who"]
    seqs = [tokenizer(t)["input_ids"] for t in texts]
    out, slots = _prefill(runner, seqs)
    try:
        off = 0
        for s in seqs:
            with torch.no_grad():
                ref = hf_model(torch.tensor([s])).logits[0].float()
            diff = (ref - out.logits[off:off + len(s)]).abs().max().item()
            assert diff < 1e-3, f"max |logit diff| {diff} for {s[:5]}..."
            off += len(s)
    finally:
        for s in slots:
            runner.kv.free(s)


def _hf_greedy(hf_model, ids, n):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                pad_token_id=0)
    return out[0, len(ids):].tolist()


def _our_greedy(runner, prompts, n):
    """Batched greedy decoding straight on the runner (no scheduler), all prompts together."""
    out, slots = _prefill(runner, prompts)
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    toks = [[int(out.logits[e].argmax())] for e in ends]
    for _ in range(n - 1):
        new = [runner.kv.alloc(1) for _ in prompts]
        o = runner.forward(ForwardBatch.build([torch.tensor([t[-1]]) for t in toks], slots, new))
        slots = [torch.cat([s, x]) for s, x in zip(slots, new)]
        for t, nxt in zip(toks, o.logits.argmax(-1).tolist()):
            t.append(nxt)
    for s in slots:
        runner.kv.free(s)
    return toks


def test_greedy_tokens_equal_transformers_generate_alone_and_batched(runner, hf_model, tokenizer):
    rows = load_prompts(per_family=4)  # 20 prompts, all five prompt sets
    prompts = [encode_chat(tokenizer, [{"role": "user", "content": r["prompt"]}]) for r in rows]
    assert len({len(p) for p in prompts}) > 5, "the batch should be ragged"
    n = 16
    ref = [_hf_greedy(hf_model, p, n) for p in prompts]
    alone = [_our_greedy(runner, [p], n)[0] for p in prompts]
    batched = _our_greedy(runner, prompts, n)
    for r, a, b, row in zip(ref, alone, batched, rows):
        assert a == r, f"{row['task']} prompt {row['id']}: alone {a} != transformers {r}"
        assert b == r, f"{row['task']} prompt {row['id']}: batched {b} != transformers {r}"


def test_tree_mask_nodes_match_plain_forward_of_their_paths(runner, tokenizer):
    """A tree of candidate continuations verified in one pass: each node's logits must equal
    those of a plain causal forward over the prefix + that node's path."""
    prefix = tokenizer("Once upon a time, in a small village,")["input_ids"]
    # tree over 6 nodes: parents encode paths; tokens arbitrary but real
    parents = [-1, 0, 0, 1, 1, 3]
    tokens = [tokenizer(" there")["input_ids"][0], 264, 1535, 2999, 506, 2060]
    n = len(parents)
    depth = [0] * n
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, p in enumerate(parents):
        mask[i, i] = True
        j = p
        while j >= 0:
            mask[i, j] = True
            j = parents[j]
        depth[i] = int(mask[i].sum()) - 1
    pre_slots = runner.kv.alloc(len(prefix))
    runner.forward(ForwardBatch.build([torch.tensor(prefix)], [EMPTY], [pre_slots]))
    tree_slots = runner.kv.alloc(n)
    pos = torch.tensor(depth) + len(prefix)
    out = runner.forward(ForwardBatch.build([torch.tensor(tokens)], [pre_slots], [tree_slots], positions=[pos],
                                            custom_masks=[mask]))
    runner.kv.free(tree_slots)
    runner.kv.free(pre_slots)
    for i in range(n):
        path = [tokens[j] for j in range(n) if mask[i, j]]
        ref, slots = _prefill(runner, [prefix + path])
        runner.kv.free(slots[0])
        diff = (ref.logits[-1] - out.logits[i]).abs().max().item()
        assert diff < 1e-3, f"node {i} (path {path}) differs by {diff}"


def test_bfloat16_runner_tracks_transformers_bfloat16(runner, tokenizer):
    from transformers import AutoModelForCausalLM

    from srt_entmtp.model.runner import ModelRunner

    r16 = ModelRunner(runner.model_dir, dtype="bfloat16", kv_slots=1024)
    hf16 = AutoModelForCausalLM.from_pretrained(runner.model_dir, dtype=torch.bfloat16).eval()
    ids = tokenizer("def add(a, b):\n    return")["input_ids"]
    out, _ = _prefill(r16, [ids])
    with torch.no_grad():
        ref = hf16(torch.tensor([ids])).logits[0].float()
    ours = out.logits
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    assert (ours - ref).abs().max().item() < 0.5  # bf16 rounding, not a different model
