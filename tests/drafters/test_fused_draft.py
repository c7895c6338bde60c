"""The fused draft level (spec/drafters/fused_draft.py and the two matmul forms it adds to
model/small_linear.py) against the torch ops it replaces, and the real MTP heads drafting the
same trees both ways. Without CUDA the kernels run in Triton's interpreter (conftest.py sets
TRITON_INTERPRET=1) in float32; on the GPU the model takes this path itself (tests/gpu)."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_checks import DEV, DT, TOL, needs_triton, rand, rms

pytestmark = needs_triton


@pytest.mark.parametrize("M", [1, 6, 19])
@pytest.mark.parametrize("gather", [False, True])
def test_norm2_linear_is_both_norms_side_by_side_then_linear(M, gather):
    """[RMSNorm(a) | RMSNorm(table[rows])] @ W.T, with K = 2 x 72 so a K tile straddles the seam."""
    from srt_entmtp.model.small_linear import norm2_linear

    g = torch.Generator().manual_seed(M + 100 * gather)
    H, V = 72, 50
    a, la, lb, w = rand(M, H, g=g), rand(H, g=g), rand(H, g=g), rand(40, 2 * H, g=g, scale=0.1)
    table = rand(V if gather else M, H, g=g)
    rows = torch.randint(0, V, (M,), generator=g).to(DEV) if gather else None
    b = table[rows] if gather else table
    want = F.linear(torch.cat([rms(a, la, 1e-5), rms(b, lb, 1e-5)], -1), w)
    got = norm2_linear(a, la, table, rows, lb, w, 1e-5, config=(16, 64, 4, 2))
    assert torch.allclose(got.float(), want.float(), atol=TOL, rtol=TOL), (got.float() - want.float()).abs().max()


@pytest.mark.parametrize("M", [1, 7, 19])
def test_norm_linear_add_rows_adds_each_rows_table_row_to_the_normed_matmul(M):
    """RMSNorm(h) @ W.T + table[rows]: the MTP block's input projection with the token's half
    read from a per-token table (fused_draft.TOKEN_TABLE); rows repeat and skip table rows."""
    from srt_entmtp.model.small_linear import norm_linear_add_rows

    g = torch.Generator().manual_seed(M)
    h, ln, w, table = rand(M, 72, g=g), rand(72, g=g), rand(40, 72, g=g, scale=0.1), rand(50, 40, g=g)
    rows = torch.randint(0, 50, (M,), generator=g).to(DEV)
    want = F.linear(rms(h, ln, 1e-5), w).float() + table[rows].float()
    got = norm_linear_add_rows(h, ln, w, 1e-5, table, rows, config=(16, 64, 4, 2))
    assert torch.allclose(got.float(), want, atol=TOL, rtol=TOL), (got.float() - want).abs().max()


@pytest.mark.parametrize("M, N, k", [(1, 300, 5), (9, 1000, 12), (20, 520, 1)])
@pytest.mark.parametrize("norm", [True, False])
def test_norm_linear_topk_candidates_hold_every_rows_top_k(M, N, k, norm):
    """The best k of the tiles' candidates are torch.topk of the full logits, value and index;
    each tile's candidates come best first and point at their own logits."""
    from srt_entmtp.model.small_linear import norm_linear_topk

    g = torch.Generator().manual_seed(M * N + k)
    h, ln, w = rand(M, 64, g=g), rand(64, g=g), rand(N, 64, g=g, scale=0.2)
    logits = F.linear(rms(h, ln, 1e-6) if norm else h, w).float()
    bn = 128
    v, i = norm_linear_topk(h, ln if norm else None, w, 1e-6, k, config=(bn, 32, 4, 2))
    tiles = -(-N // bn)
    assert v.shape == i.shape == (M, tiles * k)
    real = v > float("-inf")
    assert torch.allclose(logits.gather(1, i.long().clamp(max=N - 1))[real], v[real], atol=TOL, rtol=TOL)
    vt = v.view(M, tiles, k)
    assert bool((vt[..., :-1] >= vt[..., 1:]).all()), "a tile's candidates are best first"
    top_v, j = v.topk(k, dim=1)
    want_v, want_i = logits.topk(k, dim=1)
    assert torch.allclose(top_v, want_v, atol=TOL, rtol=TOL)
    if DT == torch.float32:  # distinct values: the same tokens
        assert torch.equal(i.long().gather(1, j), want_i)


def test_pick_takes_each_childs_rank_th_candidate_of_its_parent_row():
    from srt_entmtp.spec.drafters.fused_draft import pick

    g = torch.Generator().manual_seed(7)
    B, w, C, c, k = 3, 4, 40, 5, 6
    top_v = torch.randn(B * w, C, generator=g).to(DEV)
    top_i = torch.randint(0, 1000, (B * w, C), generator=g, dtype=torch.int32).to(DEV)
    parent_full = torch.randint(0, w, (B, 9), generator=g).to(DEV)   # wider tables, sliced as the layout's are
    rank_full = torch.randint(0, k, (B, 9), generator=g).to(DEV)
    vocab = torch.randperm(1000, generator=g).to(DEV)
    parent, rank = parent_full[:, 2:2 + c], rank_full[:, 2:2 + c]
    order = top_v.argsort(dim=1, descending=True)
    for voc, warps in ((None, None), (vocab, None), (vocab, 1)):  # warps: the kernel's, then one warp a program
        got = pick(top_v, top_i, parent, rank, w, k, voc, warps)
        rows = torch.arange(B, device=DEV).view(B, 1) * w + parent
        want = top_i.long().gather(1, order)[rows, rank]
        assert torch.equal(got, want if voc is None else vocab[want])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter form; on the GPU tests/gpu checks bf16")
@pytest.mark.parametrize("kind", ["mtp", "hydra"])
def test_fused_levels_draft_the_tokens_of_the_torch_form(runner, monkeypatch, kind):
    """The real heads (float32, this CPU) fill the same trees with the fused kernels (run in the
    interpreter: the CUDA-only gates are opened) as with torch's ops, token for token: MTP with
    its fused block, Hydra with the fused projection and top-k after its own step."""
    from srt_entmtp.model import small_linear
    from srt_entmtp.spec.drafters import fused_draft, load_drafter
    from srt_entmtp.spec.tree import Tree
    from srt_entmtp.spec.tree_layout import LayoutTable, TreeLayout
    from srt_entmtp.spec.worker import default_heads_dir

    d = load_drafter(default_heads_dir(kind), runner)
    d.quantize_for_inference("model")
    rng = random.Random(5)
    trees = [Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]),
             Tree.from_paths([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]), Tree.from_paths([]),
             Tree.from_paths(sorted({tuple(rng.randrange(3) for _ in range(2)) for _ in range(4)} | {(0,), (1,), (2,)}))]
    lay = TreeLayout.covering(trees)
    table = LayoutTable(lay, trees, "cpu")
    rows = torch.tensor([table.rows[t] for t in trees])
    g = torch.Generator().manual_seed(1)
    B = len(trees)
    hidden = torch.randn(B, d.hidden_size, generator=g)
    roots = torch.randint(0, d.vocab_size, (B,), generator=g)
    args = (hidden, roots, lay, table.parent_in_level[rows], table.rank[rows])
    ref = d.propose_layout(*args)
    calls = []
    monkeypatch.setattr(small_linear, "usable", lambda x, rows=None: (rows or x.shape[0]) <= small_linear.SMALL_M)
    monkeypatch.setattr(fused_draft, "usable", lambda dr, x, k: calls.append(x.shape[0]) or x.shape[0] <= small_linear.SMALL_M)
    got = d.propose_layout(*args)
    assert len(calls) == lay.depth, "every level took the fused path"
    for t, r in zip(trees, rows.tolist()):
        real = table.slot_of_node[r]
        assert got[trees.index(t), real].tolist() == ref[trees.index(t), real].tolist(), t.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter form; on the GPU tests/gpu checks bf16")
def test_draft_tree_drafts_the_tokens_of_propose_layout_from_the_pools(runner, monkeypatch):
    """The device step's whole-tree draft (fused_draft.draft_tree: a kernel for the roots and every
    level's state rows, the first kernel of each level gathering them, pick writing into the
    step's token buffer) gives propose_layout's tokens for the real MTP heads, with the requests'
    states and roots read from pools at scattered rows, some roots given and some from the pool."""
    from srt_entmtp.model import small_linear
    from srt_entmtp.spec.drafters import fused_draft, load_drafter
    from srt_entmtp.spec.tree import Tree
    from srt_entmtp.spec.tree_layout import LayoutTable, TreeLayout
    from srt_entmtp.spec.worker import default_heads_dir

    d = load_drafter(default_heads_dir("mtp"), runner)
    d.quantize_for_inference("model")
    trees = [Tree.from_paths([[0], [1], [2], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 1, 0]]),
             Tree.from_paths([[0], [0, 0], [0, 0, 0], [0, 0, 0, 0]]), Tree.from_paths([]),
             Tree.from_paths([[0], [1], [0, 0], [1, 0], [1, 1]])]
    lay = TreeLayout.covering(trees)
    table = LayoutTable(lay, trees, "cpu")
    B, S = len(trees), lay.num_slots
    rows = torch.tensor([table.rows[t] for t in trees])
    g = torch.Generator().manual_seed(3)
    hidden_pool = torch.randn(9, d.hidden_size, generator=g)
    roots_pool = torch.randint(0, d.vocab_size, (9,), generator=g)
    req = torch.tensor([7, 2, 5, 0])
    root_in = torch.tensor([-1, int(torch.randint(0, d.vocab_size, (1,), generator=g)), -1, -1])
    roots = torch.where(root_in >= 0, root_in, roots_pool[req])
    ref = d.propose_layout(hidden_pool[req], roots, lay, table.parent_in_level[rows], table.rank[rows])
    monkeypatch.setattr(small_linear, "usable", lambda x, rows=None: (rows or x.shape[0]) <= small_linear.SMALL_M)
    monkeypatch.setattr(fused_draft, "usable", lambda dr, x, k: x.shape[0] <= small_linear.SMALL_M)
    assert fused_draft.tree_usable(d, hidden_pool, B, lay)
    monkeypatch.setattr(fused_draft, "FUSED_INPUTS", False)
    assert not fused_draft.tree_usable(d, hidden_pool, B, lay), "the switch turns it off"
    out = torch.full((B + 2, S), -7)   # a bucket's buffer: rows past B stay untouched
    fused_draft.draft_tree(d, hidden_pool, roots_pool, req, root_in, table, rows, out[:B])
    assert bool((out[B:] == -7).all())
    for b, (t, r) in enumerate(zip(trees, rows.tolist())):
        real = table.slot_of_node[r]
        assert out[b, real].tolist() == ref[b, real].tolist(), t.name


def test_draft_configs_file_sets_the_level_kernels_configs_and_names_a_bad_key(tmp_path, monkeypatch):
    """ENTMTP_DRAFT_CONFIGS (what bench_draft.py --kernels writes) sets fused_draft.CONFIGS,
    PICK_WARPS and TOKEN_TABLE; a key that is not a kernel of the level is refused with the file's name."""
    from srt_entmtp.spec.drafters import fused_draft

    monkeypatch.setattr(fused_draft, "CONFIGS", dict.fromkeys(fused_draft.CONFIGS))
    monkeypatch.setattr(fused_draft, "PICK_WARPS", 4)
    monkeypatch.setattr(fused_draft, "TOKEN_TABLE", True)
    f = tmp_path / "draft.json"
    f.write_text('{"proj": null, "down": [32, 128, 2, 3], "topk": [64, 64, 4, 2], "pick_warps": 1, "token_table": false}')
    monkeypatch.setenv("ENTMTP_DRAFT_CONFIGS", str(f))
    fused_draft._load_overrides()
    assert fused_draft.CONFIGS == {"proj": None, "gate_up": None, "down": (32, 128, 2, 3), "topk": (64, 64, 4, 2)}
    assert fused_draft.PICK_WARPS == 1 and fused_draft.topk_tile() == 64 and not fused_draft.TOKEN_TABLE
    f.write_text('{"top_k": [64, 64, 4, 2]}')
    with pytest.raises(ValueError, match=r"draft\.json: unknown keys \['top_k'\]"):
        fused_draft._load_overrides()
