"""The verify graph's bookkeeping (spec/verify_kernels.py): its input kernel and the two tail kernels, run here in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1), compiled where CUDA is (both in float32),
against the torch form they replace on CUDA. The torch form itself is checked end to end by test_device_step.py's token-for-token
tests; on the GPU the kernels run inside the verify graphs of tests/gpu."""
from __future__ import annotations

import random

import pytest
import torch

from srt_entmtp.model.kv_cache import KVPool
from srt_entmtp.spec.entropy import entropy_from_logits
from srt_entmtp.spec.tree import Tree
from srt_entmtp.spec.tree_layout import LayoutTable, TreeLayout
from srt_entmtp.spec.verify_kernels import (
    accept_torch,
    accept_triton,
    argmax_entropy,
    verify_inputs_torch,
    verify_inputs_triton,
)
from tests.kernel_checks import DEV, needs_triton
from tests.spec.test_device_step import TREES

pytestmark = needs_triton
ROOT_ONLY = Tree.from_paths([])


@pytest.mark.parametrize("V", [7, 2048, 5001])
def test_argmax_entropy_matches_torch_with_ties_first(V):
    g = torch.Generator().manual_seed(V)
    x = torch.randn(9, V, generator=g) * 3
    x[1] = 0.0                                   # all tied: index 0, entropy log V
    top = x[2].max() + 1
    x[2, V // 2], x[2, V - 1] = top, top         # a tie across lanes: the first wins
    x[3, : V // 3] = float("-inf")               # masked entries contribute nothing
    x[4] *= 40                                   # nearly one-hot
    x = x.to(DEV)
    pred, ent = argmax_entropy(x)
    assert torch.equal(pred, x.argmax(-1))
    assert pred[1] == 0 and pred[2] == V // 2
    assert torch.allclose(ent, entropy_from_logits(x), rtol=1e-5, atol=1e-5)


def _case(seed: int, hit: float):
    """A batch of placed trees, drafted tokens whose children match the parent's argmax with
    probability `hit`, the verify logits saying so, a KV pool and the per-request pools."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lay = TreeLayout.covering(TREES)
    tab = LayoutTable(lay, TREES + [ROOT_ONLY], "cpu")
    S, V, H, cap = lay.num_slots, 40, 12, 9
    rows = [tab.rows[rng.choice(TREES)] for _ in range(5)] + [tab.rows[ROOT_ONLY]] * 2  # two padding requests
    B = len(rows)
    row = torch.tensor(rows)
    pred = torch.randint(0, V, (B, S), generator=g)
    tokens = torch.randint(0, V, (B, S), generator=g)
    par = tab.parent[row]
    logits = torch.randn(B * S, V, generator=g)
    logits[torch.arange(B * S), pred.view(-1)] = 10.0   # the argmax is pred
    tie = torch.randint(0, V, (B * S,), generator=g)
    some = torch.rand(B * S, generator=g) < 0.3           # and ties it elsewhere: the first one counts
    logits[torch.arange(B * S)[some], tie[some]] = 10.0
    pred.view(-1).copy_(logits.argmax(-1))
    for b in range(B):
        for s in range(1, S):
            if rng.random() < hit:
                tokens[b, s] = pred[b, par[b, s]]
    kv = KVPool(num_layers=3, num_slots=B * S + 20, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    slots = torch.randperm(B * S + 20, generator=g)[: 5 * S] + 1
    out_slots = torch.cat([slots, torch.zeros((B - 5) * S, dtype=torch.long)]).view(B, S)
    req = torch.tensor([3, 0, 7, 1, 5, cap, cap])
    return {"tokens": tokens, "logits": logits, "hidden": torch.randn(B * S, H, generator=g), "table": tab,
            "row": row, "req": req, "out_slots": out_slots, "kv": kv,
            "hidden_pool": torch.randn(cap + 1, H, generator=g), "roots": torch.zeros(cap + 1, dtype=torch.long),
            "kept": torch.zeros(cap + 1, dtype=torch.long),
            "result": torch.full((B, lay.depth + 2), -7, dtype=torch.long), "entropy": torch.zeros(B, lay.depth + 1)}


def _copy(case: dict, device) -> dict:
    """The case on `device` (every tensor and the KV pool copied; the table rebuilt there)."""
    out = {}
    for k, v in case.items():
        if isinstance(v, KVPool):
            kv = KVPool(v.k.shape[0], v.num_slots, v.k.shape[2], v.k.shape[3], v.k.dtype, device=device)
            kv.k.copy_(v.k)
            kv.v.copy_(v.v)
            out[k] = kv
        elif isinstance(v, LayoutTable):
            out[k] = LayoutTable(v.layout, v.trees, device)
        else:
            out[k] = v.to(device, copy=True)
    return out


@pytest.mark.parametrize("seed,hit", [(0, 0.0), (1, 0.6), (2, 0.95), (3, 1.0)])
@pytest.mark.parametrize("split", [False, True])
def test_accept_kernel_matches_torch_tail(seed, hit, split, monkeypatch):
    """split: the argmax and entropies in chunks (verify_kernels.SPLIT_ARGMAX) of 16 logits here,
    so a row of 40 spans three, the last one short, and ties fall in different chunks."""
    from srt_entmtp.spec import verify_kernels

    monkeypatch.setattr(verify_kernels, "SPLIT_ARGMAX", split)
    monkeypatch.setattr(verify_kernels, "ARGMAX_BLOCK", 16)
    ref = _case(seed, hit)
    got = _copy(ref, DEV)
    accept_torch(**ref)
    accept_triton(**got)
    got = _copy(got, "cpu")
    real = slice(0, 5)  # padding requests share the spare pool row; their results are never read
    assert torch.equal(got["result"], ref["result"])
    assert torch.allclose(got["entropy"], ref["entropy"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["kv"].k, ref["kv"].k) and torch.equal(got["kv"].v, ref["kv"].v)
    r = ref["req"][real]
    for pool in ("hidden_pool", "roots", "kept"):
        assert torch.equal(got[pool][r], ref[pool][r]), pool
    acc = ref["result"][real, 0]
    if hit == 0.0:
        assert bool((acc == 0).all())
    if hit == 1.0:  # every drafted node right: each request keeps its tree's full depth
        depths = [ref["table"].trees[int(t)].depth for t in ref["row"][real]]
        assert acc.tolist() == depths
    if hit >= 0.6:
        assert bool((acc > 0).any())  # some path moved KV, so the copy was exercised


def test_verify_inputs_kernel_matches_torch():
    """ids, positions, ancestor bits and the hidden key range, with some requests launched after
    an unread step (ahead > 0: the prefix grows by that step's kept count, read on the device)."""
    case = _case(4, 0.5)
    tab, row, req, tokens = case["table"], case["row"], case["req"], case["tokens"]
    B, S = tokens.shape
    g = torch.Generator().manual_seed(5)
    known = torch.randint(1, 300, (B,), generator=g)
    ahead = torch.tensor([0, 23, 0, 23, 23, 0, 0])
    kept = torch.randint(1, 6, (10,), generator=g)
    outs = {}
    for name, fn, dev in (("torch", verify_inputs_torch, "cpu"), ("triton", verify_inputs_triton, DEV)):
        t = LayoutTable(tab.layout, tab.trees, dev)
        ids = torch.zeros(B * S, dtype=torch.long, device=dev)
        pos, anc = torch.zeros_like(ids), torch.zeros(B, S, dtype=torch.long, device=dev)
        skip = torch.zeros(2, B, dtype=torch.int32, device=dev)
        fn(tokens.to(dev), t, row.to(dev), req.to(dev), known.to(dev), ahead.to(dev), kept.to(dev), ids, pos, anc, skip)
        outs[name] = [x.cpu() for x in (ids, pos, anc, skip)]
    for a, b in zip(outs["torch"], outs["triton"]):
        assert torch.equal(a, b)
    prefix = known + torch.where(ahead > 0, kept[req], 0)
    assert torch.equal(outs["triton"][1].view(B, S)[:, 0], prefix)       # the root sits at the prefix length
    assert torch.equal(outs["triton"][3][1] - outs["triton"][3][0], (known + ahead - prefix).int())
