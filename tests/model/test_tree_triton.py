"""The Triton tree-attention kernel (model/attention/tree_triton.py) against plain softmax
attention. On a machine without CUDA it runs in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1), in float32; with CUDA, compiled, in bfloat16."""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton is not installed (pip install triton runs these in its interpreter)")

H, KH, D = 9, 3, 64


def random_tree_masks(B: int, S: int, g: torch.Generator) -> torch.Tensor:
    m = torch.zeros(B, S, S, dtype=torch.bool)
    for b in range(B):
        for i in range(S):
            if i:
                m[b, i] = m[b, int(torch.randint(0, i, (1,), generator=g))]
            m[b, i, i] = True
    return m


def reference(q, kc, vc, prefix, slots, masks, scale):
    """Per request: softmax over its prefix keys (all visible) and tree keys (its mask), GQA."""
    S = masks.shape[1]
    outs = []
    for b, p in enumerate(prefix):
        keys = slots[b]
        k = kc[keys].float().repeat_interleave(H // KH, 1)  # [L, H, D]
        v = vc[keys].float().repeat_interleave(H // KH, 1)
        qb = q[b * S:(b + 1) * S].float()                     # [S, H, D]
        s = torch.einsum("shd,lhd->hsl", qb, k) * scale
        vis = torch.cat([torch.ones(S, p, dtype=torch.bool), masks[b]], 1)
        s = s.masked_fill(~vis, float("-inf"))
        outs.append(torch.einsum("hsl,lhd->shd", s.softmax(-1), v))
    return torch.cat(outs)


# a lone node; splits over several key blocks; a one-key prefix (padding requests); row tiles; 64 nodes
# merge_last: the last split of each program's rows merges them (tickets), not the merge kernel
# merge_programs: the merge kernel's row blocks (merge_rows) of 4 rows by default, of 16 and 64 with fewer
# programs asked for, each with a partial last block
@pytest.mark.parametrize("merge_last, merge_programs", [(False, 256), (True, 256), (False, 64), (False, 8)])
@pytest.mark.parametrize("B, S, prefix, nsplit", [(1, 1, [5], 1), (1, 9, [70], 4), (2, 5, [1, 130], 1),
                                                  (3, 33, [3, 64, 200], 3), (1, 64, [17], 2), (2, 1, [300, 20], 8)])
def test_tree_attention_kernel_matches_softmax_attention(B, S, prefix, nsplit, merge_last, merge_programs,
                                                         monkeypatch):
    from srt_entmtp.model.attention import tree_triton
    from srt_entmtp.model.attention.tree_triton import ancestor_bits, tree_attention

    monkeypatch.setattr(tree_triton, "MERGE_PROGRAMS", merge_programs)

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(B * 100 + S)
    total = sum(prefix) + B * S
    kc = torch.randn(total + 7, KH, D, generator=g).to(dt)
    vc = torch.randn(total + 7, KH, D, generator=g).to(dt)
    q = torch.randn(B * S, H, D, generator=g).to(dt)
    perm = torch.randperm(total + 6, generator=g)[:total] + 1  # scattered slots, never slot 0
    slots, a = [], 0
    for p in prefix:
        slots.append(perm[a:a + p + S])
        a += p + S
    masks = random_tree_masks(B, S, g)
    kv_indptr = torch.tensor([0] + [p + S for p in prefix], dtype=torch.int32).cumsum(0).to(torch.int32)
    kv_indices = torch.cat(slots).to(torch.int32)
    out = torch.zeros(B * S, H, D, dtype=dt)
    part_o = torch.zeros(nsplit, B * S, H, D)
    part_lse = torch.zeros(nsplit, B * S, H)
    block_m = max(16, min(64, 1 << (S * H // KH - 1).bit_length()))
    to = (lambda t: t.to(dev))
    tiles = -(-S * (H // KH) // block_m)
    tickets = to(torch.zeros(B * KH * tiles, dtype=torch.int32)) if merge_last else None
    want = reference(q, kc, vc, prefix, slots, masks, D ** -0.5)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    for _ in range(2):  # twice: the tickets are left at zero for the next launch
        res = tree_attention(to(q), to(kc), to(vc), to(kv_indptr), to(kv_indices), to(ancestor_bits(masks)),
                             to(out.clone()), to(part_o), to(part_lse), D ** -0.5, S, nsplit, block_m, tickets=tickets)
        assert torch.allclose(res.float().cpu(), want, atol=tol, rtol=tol), (res.float().cpu() - want).abs().max()
        if tickets is not None:
            assert (tickets == 0).all()


@pytest.mark.parametrize("nsplit", [1, 3])
@pytest.mark.parametrize("merge_last", [False, True])
def test_tree_attention_hides_the_skipped_key_range(nsplit, merge_last):
    """With skip = [lo, hi) per request, those keys of its range are invisible: the same as
    attending over the range with them removed (a step launched ahead of the one before it
    hides that step's rejected tree tail this way)."""
    from srt_entmtp.model.attention.tree_triton import ancestor_bits, tree_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(11 + nsplit)
    B, S = 3, 6
    before = [40, 9, 130]            # keys before the tree: prefix then the earlier tree's slots
    skips = [(30, 38), (9, 9), (0, 0)]  # request 0 hides 8 keys, request 1 none (empty), 2 none
    total = sum(before) + B * S
    kc = torch.randn(total + 1, KH, D, generator=g).to(dt)
    vc = torch.randn(total + 1, KH, D, generator=g).to(dt)
    q = torch.randn(B * S, H, D, generator=g).to(dt)
    slots = list((torch.randperm(total, generator=g) + 1).split([p + S for p in before]))
    masks = random_tree_masks(B, S, g)
    kv_indptr = torch.tensor([0] + [p + S for p in before], dtype=torch.int32).cumsum(0).to(torch.int32)
    skip = torch.tensor(skips, dtype=torch.int32).t().contiguous()
    block_m = max(16, min(64, 1 << (S * H // KH - 1).bit_length()))
    to = (lambda t: t.to(dev))
    res = tree_attention(to(q), to(kc), to(vc), to(kv_indptr), to(torch.cat(slots).to(torch.int32)),
                         to(ancestor_bits(masks)), to(torch.zeros(B * S, H, D, dtype=dt)),
                         to(torch.zeros(nsplit, B * S, H, D)), to(torch.zeros(nsplit, B * S, H)), D ** -0.5, S,
                         nsplit, block_m, skip=to(skip),
                         tickets=to(torch.zeros(B * KH * 2, dtype=torch.int32)) if merge_last else None)
    kept = [torch.cat([sl[:lo], sl[hi:]]) for sl, (lo, hi) in zip(slots, skips)]
    want = reference(q, kc, vc, [p - (hi - lo) for p, (lo, hi) in zip(before, skips)], kept, masks, D ** -0.5)
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    assert torch.allclose(res.float().cpu(), want, atol=tol, rtol=tol), (res.float().cpu() - want).abs().max()


def test_merge_rows_give_about_the_asked_programs_in_power_of_two_blocks():
    from srt_entmtp.model.attention.tree_triton import MERGE_MIN_ROWS, MERGE_PROGRAMS, merge_rows

    for rows in (1, 9, 135, 1080, 4096, 20000, 10 ** 6):
        r = merge_rows(rows)
        assert r & (r - 1) == 0 and MERGE_MIN_ROWS <= r <= 64
        programs = -(-rows // r)
        assert r == 64 or programs < 2 * MERGE_PROGRAMS, (rows, r)
        assert r == MERGE_MIN_ROWS or programs > MERGE_PROGRAMS // 4, (rows, r)


def test_ancestor_bits_set_bit_j_of_row_i_for_mask_i_j():
    from srt_entmtp.model.attention.tree_triton import ancestor_bits

    g = torch.Generator().manual_seed(1)
    m = random_tree_masks(2, 64, g)
    bits = ancestor_bits(m)
    for b in range(2):
        for i in (0, 5, 63):
            row = int(bits[b, i]) & (2**64 - 1)
            assert [(row >> j) & 1 for j in range(64)] == m[b, i].int().tolist()
    with pytest.raises(ValueError, match="at most 64"):
        ancestor_bits(torch.ones(1, 65, 65, dtype=torch.bool))


def test_decode_attention_matches_the_sdpa_backend_on_a_padded_decode_batch():
    """The decode graphs' attention (a one-node tree a request) planned from a decode
    ForwardBatch padded as the graph runner pads it, against the SDPA backend's decode on the
    real requests; the padding requests write only slot 0."""
    from srt_entmtp.model.attention.sdpa import SdpaBackend
    from srt_entmtp.model.attention.tree_triton import DecodeAttention
    from srt_entmtp.model.cuda_graph import pad_batch
    from srt_entmtp.model.forward_batch import ForwardBatch
    from srt_entmtp.model.kv_cache import KVPool

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(7)
    kv = KVPool(1, 400, KH, D, dt, dev)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g).to(dt))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g).to(dt))
    prefixes = [kv.alloc(n) for n in (3, 150, 64)]
    new = kv.alloc(3)
    fb = ForwardBatch.build_decode([1, 2, 3], prefixes, new, device="cpu")
    q = torch.randn(3, H, D, generator=g).to(dev, dt)
    k_new, v_new = torch.randn(3, KH, D, generator=g).to(dev, dt), torch.randn(3, KH, D, generator=g).to(dev, dt)

    ref = SdpaBackend(kv, H, KH, D)
    ref.plan(fb.to(dev))
    want = ref.run(0, q, k_new, v_new).float().cpu()

    out_slots = torch.zeros(4, dtype=torch.long, device=dev)
    attn = DecodeAttention(kv, H, KH, D, out_slots, batch=4, kv_capacity=400)
    fbp = pad_batch(fb, 4, 4)
    assert attn.fits(fbp) and not attn.fits(pad_batch(fb, 5, 5))
    attn.plan(fbp)
    out_slots.copy_(fbp.out_slots)
    q4 = torch.cat([q, torch.randn(1, H, D, generator=g).to(dev, dt)])
    got = attn.run(0, q4, torch.cat([k_new, k_new[:1]]), torch.cat([v_new, v_new[:1]]))[:3].float().cpu()
    tol = 2e-2 if dt == torch.bfloat16 else 1e-4
    assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
    assert attn.nsplit > 1, "a batch of 4 should split its keys to fill the GPU"
    assert torch.equal(kv.k[0][new], k_new) and torch.equal(kv.v[0][new], v_new), "new K/V stored in their slots"
    assert torch.equal(kv.k[0][0], k_new[0]), "the padding token writes slot 0, and only slot 0"
