"""Drafters fill ragged batches of different trees; checked node by node against plain-torch
re-implementations of each head, through save/load, in bf16, and with a compressed vocabulary."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from srt_entmtp.spec.drafters import (
    DRAFTERS,
    HeadsLoadError,
    HydraDrafter,
    MedusaDrafter,
    create_drafter,
    load_drafter,
)
from srt_entmtp.spec.ragged import RaggedTreeBatch
from srt_entmtp.spec.tree import Tree

TREES = [
    [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (0, 1, 0), (0, 0, 0, 0)],
    [(0,), (0, 0), (0, 0, 0)],                      # a chain
    [],                                             # root only
    [(0,), (1,), (1, 0), (1, 1), (1, 2), (1, 2, 0)],
]
ARCH = {"medusa": {"num_heads": 4, "num_layers": 2}, "hydra": {"num_heads": 4, "intermediate_size": 48},
        "mtp": {"intermediate_size": 64, "train_depth": 3}}


def _randomise(d, seed=0):
    """Non-zero parameters, so that every depth is a different function."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in d.named_parameters():
            scale = 1.0 if "norm" in name else (0.5 if p.dim() > 1 else 0.1)
            base = 1.0 if "norm" in name else 0.0
            p.copy_(base + scale * torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 1))
    return d


def make(kind, runner, draft_vocab=None, seed=0):
    return _randomise(create_drafter(kind, runner, draft_vocab=draft_vocab, **ARCH[kind]), seed).eval()


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def reference_logits(d, h, path):
    """Plain re-implementation: logits (full vocabulary) of x_{t+1+D} given h [H] and path x_{t+1..t+D}."""
    W = d.lm_head.float()
    emb = d.embed.float()
    eps = d.eps
    D = len(path)
    if d.kind == "medusa":
        x = h.float()
        for layer in range(d.num_layers):
            x = x + F.silu(d.weight[D - 1, layer].float() @ x + d.bias[D - 1, layer].float())
        return W @ x
    s = h.float()
    for i, tok in enumerate(path):
        e = emb[tok]
        if d.kind == "hydra":
            z = torch.cat([_rms(s, d.norm_state[i].float(), eps), _rms(e, d.norm_emb[i].float(), eps)])
            s = s + d.w2[i].float() @ F.silu(d.w1[i].float() @ z + d.b1[i].float())
        else:
            z = torch.cat([_rms(s, d.norm_state.float(), eps), _rms(e, d.norm_emb.float(), eps)])
            u = d.proj.float() @ z
            g, v = (d.gate_up.float() @ _rms(u, d.norm_mlp.float(), eps)).chunk(2)
            s = u + d.down.float() @ (F.silu(g) * v)
    if d.kind == "mtp":
        s = _rms(s, d.norm_out.float(), eps)
    return W @ s


def _setup(runner, seed=1):
    trees = [Tree.from_paths(p) for p in TREES]
    batch = RaggedTreeBatch.build(trees, [5, 17, 9, 30])
    g = torch.Generator().manual_seed(seed)
    hidden = runner.model.final_norm * torch.randn(len(trees), runner.config.hidden_size, generator=g)
    roots = torch.tensor([1234, 42, 7, 9000])
    return trees, batch, hidden, roots


def _check_against_reference(d, trees, batch, hidden, roots, out, vocab=None):
    T = batch.num_tokens
    assert out.node_tokens.shape == (T,) and out.node_tokens.dtype == torch.long
    assert out.node_probs.shape == (T,) and out.path_conf.shape == (T,)
    assert out.node_probs.dtype == torch.float32 and out.path_conf.dtype == torch.float32
    indptr = batch.node_indptr.tolist()
    assert out.node_tokens[indptr[:-1]].tolist() == roots.tolist()
    assert out.node_probs[indptr[:-1]].tolist() == [1.0] * len(trees)
    checked = 0
    for b, tree in enumerate(trees):
        a = indptr[b]
        for j in range(1, tree.num_nodes):
            chain, k = [], j
            while k > 0:
                chain.append(k)
                k = int(tree.parents[k])
            chain = chain[::-1]                      # depth-1 .. depth-d nodes of this path
            path = [int(roots[b])] + [int(out.node_tokens[a + c]) for c in chain[:-1]]
            logits = reference_logits(d, hidden[b], path)
            if vocab is not None:
                logits = logits[vocab]
            rank = int(tree.ranks[j])
            top = logits.topk(rank + 1).indices
            want = int(top[rank]) if vocab is None else int(vocab[top[rank]])
            assert int(out.node_tokens[a + j]) == want, (b, j, tree.paths[j])
            p = torch.softmax(logits, -1)[top[rank]]
            assert float(out.node_probs[a + j]) == pytest.approx(float(p), rel=1e-4, abs=1e-7)
            conf = torch.prod(out.node_probs[[a + c for c in chain]])
            assert float(out.path_conf[a + j]) == pytest.approx(float(conf), rel=1e-5, abs=1e-9)
            checked += 1
    assert checked == sum(t.num_nodes - 1 for t in trees)


@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_fills_ragged_batch_like_reference(runner, kind):
    d = make(kind, runner)
    trees, batch, hidden, roots = _setup(runner)
    out = d.propose(hidden, roots, batch)
    _check_against_reference(d, trees, batch, hidden, roots, out)
    if kind == "medusa":
        # node (d, r) is head d's r-th candidate whatever its parent; siblings are distinct
        a = batch.node_indptr[0].item()
        t0 = trees[0]
        by_dr = {}
        for j in range(1, t0.num_nodes):
            key = (int(t0.depths[j]), int(t0.ranks[j]))
            by_dr.setdefault(key, set()).add(int(out.node_tokens[a + j]))
        assert all(len(v) == 1 for v in by_dr.values())
    for b, tree in enumerate(trees):
        a = batch.node_indptr[b].item()
        for row in tree.children.tolist():
            kids = [out.node_tokens[a + c].item() for c in row if c >= 0]
            assert len(kids) == len(set(kids))


@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_sequential_drafts_depend_on_the_path(runner, kind):
    """Two requests with the same h but different roots: the same drafts and probabilities
    for Medusa, different draft distributions for Hydra and MTP."""
    d = make(kind, runner)
    tree = Tree.from_paths([(0,), (0, 0)])
    batch = RaggedTreeBatch.build([tree, tree], [3, 3])
    h = runner.model.final_norm * torch.randn(1, runner.config.hidden_size, generator=torch.Generator().manual_seed(3))
    out = d.propose(h.repeat(2, 1), torch.tensor([100, 30000]), batch)
    same = torch.equal(out.node_tokens[1:3], out.node_tokens[4:6]) and torch.equal(out.node_probs[1:3], out.node_probs[4:6])
    assert same == (kind == "medusa")


def test_medusa_untrained_is_the_base_lm_head(runner):
    d = MedusaDrafter(runner, num_heads=2)
    tree = Tree.from_paths([(0,), (1,), (0, 0)])
    batch = RaggedTreeBatch.build([tree], [4])
    h = runner.model.final_norm * torch.randn(1, runner.config.hidden_size, generator=torch.Generator().manual_seed(5))
    out = d.propose(h, torch.tensor([3]), batch)
    top = runner.model.logits(h)[0].topk(2).indices.tolist()
    assert out.node_tokens.tolist() == [3, top[0], top[1], top[0]]


def test_compressed_vocab_maps_candidates_back(runner):
    g = torch.Generator().manual_seed(11)
    vocab = torch.randperm(runner.config.vocab_size, generator=g)[:3000]
    for kind in DRAFTERS:
        d = make(kind, runner, draft_vocab=vocab)
        assert d.draft_vocab_size == 3000
        assert torch.equal(d.out_weight, runner.model.lm_head[vocab])
        trees, batch, hidden, roots = _setup(runner)
        out = d.propose(hidden, roots, batch)
        nonroot = torch.ones(batch.num_tokens, dtype=torch.bool)
        nonroot[batch.node_indptr[:-1]] = False
        assert torch.isin(out.node_tokens[nonroot], vocab).all()
        _check_against_reference(d, trees, batch, hidden, roots, out, vocab=vocab)
        assert d.to_full(torch.tensor([0, 2999])).tolist() == [int(vocab[0]), int(vocab[2999])]
    with pytest.raises(ValueError, match="repeated"):
        MedusaDrafter(runner, draft_vocab=torch.tensor([1, 2, 2]))
    with pytest.raises(ValueError, match=r"\[0, 49152\)"):
        MedusaDrafter(runner, draft_vocab=torch.tensor([1, 49152]))


def test_bfloat16_runs_and_agrees_at_depth_one(runner):
    vocab = torch.arange(0, 49152, 6)  # a compressed head keeps bf16 matmuls cheap on CPU
    for kind in DRAFTERS:
        d = make(kind, runner, draft_vocab=vocab)
        trees, batch, hidden, roots = _setup(runner)
        ref = d.propose(hidden, roots, batch)
        d16 = make(kind, runner, draft_vocab=vocab).to(torch.bfloat16)
        out = d16.propose(hidden.bfloat16(), roots, batch)
        assert out.node_probs.dtype == torch.float32
        assert ((out.node_probs > 0) & (out.node_probs <= 1)).all()
        assert out.node_tokens[batch.node_indptr[:-1]].tolist() == roots.tolist()
        first = batch.node_indptr[:-1] + 1   # each non-empty tree's (0,) node
        keep = torch.tensor([t.num_nodes > 1 for t in trees])
        agree = (out.node_tokens[first[keep]] == ref.node_tokens[first[keep]]).float().mean()
        assert agree >= 0.66, kind


def test_depth_limits(runner):
    deep = RaggedTreeBatch.build([Tree.from_paths([(0,) * k for k in range(1, 7)])], [2])
    h = torch.randn(1, runner.config.hidden_size)
    for kind in ("medusa", "hydra"):
        with pytest.raises(ValueError, match="depth 6 .* reach depth 4"):
            make(kind, runner).propose(h, torch.tensor([1]), deep)
    mtp = make("mtp", runner)
    assert mtp.trained_depth == 3 and mtp.max_depth > 1000
    out = mtp.propose(h, torch.tensor([1]), deep)   # unrolled past its trained depth
    assert out.node_tokens.shape == (7,)
    with pytest.raises(ValueError, match=r"hidden must be \[1, 576\]"):
        mtp.propose(torch.randn(2, 576), torch.tensor([1, 2]), deep)


@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_save_load_round_trip(runner, kind, tmp_path):
    vocab = torch.arange(100, 2100) if kind == "mtp" else None
    d = make(kind, runner, draft_vocab=vocab)
    d.training_summary = {"steps": 7}
    d.save(tmp_path / "f32", dtype=torch.float32)
    _, batch, hidden, roots = _setup(runner)
    want = d.propose(hidden, roots, batch)
    back = load_drafter(tmp_path / "f32", runner)
    assert type(back) is type(d) and back.arch() == d.arch()
    got = back.propose(hidden, roots, batch)
    assert torch.equal(got.node_tokens, want.node_tokens)
    assert torch.equal(got.node_probs, want.node_probs) and torch.equal(got.path_conf, want.path_conf)
    cfg = json.loads((tmp_path / "f32" / "config.json").read_text())
    assert cfg["format"] == "entmtp-heads" and cfg["version"] == 1 and cfg["kind"] == kind
    assert cfg["base_model"] == runner.model_dir.name and cfg["hidden_size"] == 576 and cfg["vocab_size"] == 49152
    assert cfg["draft_vocab_size"] == (2000 if vocab is not None else 0) and cfg["training"] == {"steps": 7}
    # bf16 file: half the bytes, loads into the base model's dtype
    d.save(tmp_path / "bf16")
    f32 = (tmp_path / "f32" / "model.safetensors").stat().st_size
    b16 = (tmp_path / "bf16" / "model.safetensors").stat().st_size
    assert b16 < 0.6 * f32
    again = DRAFTERS[kind].load(tmp_path / "bf16", runner)
    assert again.param_dtype == runner.model.dtype and not any(p.requires_grad for p in again.parameters())


def _edit(dir_, **changes):
    f = dir_ / "config.json"
    cfg = json.loads(f.read_text())
    cfg.update(changes)
    f.write_text(json.dumps(cfg))


def test_mismatch_errors_name_the_file(runner, tmp_path):
    d = make("hydra", runner)
    for key, bad, pattern in [("hidden_size", 960, "hidden_size 960.* has hidden_size 576"),
                              ("vocab_size", 32000, "vocab_size 32000.* has vocab_size 49152"),
                              ("base_model", "Qwen2-0.5B", "base model 'Qwen2-0.5B'.* is 'SmolLM2-135M-Instruct'")]:
        dd = tmp_path / key
        d.save(dd)
        _edit(dd, **{key: bad})
        with pytest.raises(HeadsLoadError, match=pattern) as e:
            load_drafter(dd, runner)
        assert str(dd / "config.json") in str(e.value)
    # a bare LlamaModel does not know its checkpoint's name: the weights probe still tells models apart
    dd = tmp_path / "probe"
    d.save(dd)
    assert isinstance(load_drafter(dd, runner.model), HydraDrafter)
    cfg = json.loads((dd / "config.json").read_text())
    _edit(dd, base_probe=[v + 0.05 for v in cfg["base_probe"]])
    for base in (runner, runner.model):
        with pytest.raises(HeadsLoadError, match="embedding weights differ from the loaded model's") as e:
            load_drafter(dd, base)
        assert str(dd / "config.json") in str(e.value)
    d.save(tmp_path / "ok")
    with pytest.raises(HeadsLoadError, match="kind is 'hydra', expected 'medusa'"):
        MedusaDrafter.load(tmp_path / "ok", runner)
    assert isinstance(HydraDrafter.load(tmp_path / "ok", runner.model, base_name=runner.model_dir.name), HydraDrafter)
    _edit(tmp_path / "ok", arch={"num_heads": 3, "intermediate_size": 48})
    with pytest.raises(HeadsLoadError, match=r"model.safetensors: tensor '\w+' has shape"):
        load_drafter(tmp_path / "ok", runner)
    with pytest.raises(HeadsLoadError, match="not found"):
        load_drafter(tmp_path / "missing", runner)


def test_probe_tolerates_a_bfloat16_base(runner, tmp_path):
    from types import SimpleNamespace

    from srt_entmtp.spec.drafters.base import check_base, read_config

    make("medusa", runner).save(tmp_path / "m")
    cfg = read_config(tmp_path / "m")
    bf16 = SimpleNamespace(cfg=runner.model.cfg, embed=runner.model.embed.bfloat16())
    check_base(cfg, tmp_path / "m", bf16, None)               # same weights, rounded: accepted
    other = SimpleNamespace(cfg=runner.model.cfg, embed=runner.model.embed.roll(1, dims=0))
    with pytest.raises(HeadsLoadError, match="embedding weights differ"):
        check_base(cfg, tmp_path / "m", other, None)


@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_shipped_heads_load_and_fill_trees(runner, kind):
    from pathlib import Path

    import srt_entmtp
    from srt_entmtp.spec.drafters.base import read_config

    path = Path(srt_entmtp.__file__).parent / "heads" / kind
    cfg = read_config(path)
    assert cfg["kind"] == kind and cfg["base_model"] == runner.model_dir.name and cfg["training"]["steps"] > 0
    assert (path / "model.safetensors").stat().st_size < 20 * 2**20  # hydra (I=1024, 5 heads) is 17 MiB
    d = load_drafter(path, runner.model)
    assert (d.draft_vocab is not None) == (kind == "mtp")
    _, batch, hidden, roots = _setup(runner)
    out = d.propose(hidden, roots, batch)
    assert out.node_tokens[batch.node_indptr[:-1]].tolist() == roots.tolist()
    assert ((out.node_probs > 0) & (out.node_probs <= 1)).all()


@pytest.mark.parametrize("kind", list(DRAFTERS))
def test_int8_drafting_stays_close_to_float_and_fills_the_same_trees(runner, kind):
    """quantize_for_inference: int8 weights change the draft logits by a few percent, so the
    candidate ranking mostly survives (the shipped heads); drafts are only
    proposals, so this costs acceptance, never correctness (tests/test_spec_worker.py)."""
    from pathlib import Path

    import srt_entmtp
    from srt_entmtp.model.linear import int8_available

    if not int8_available(runner.device, runner.dtype):
        pytest.skip(f"int8 linears need a CPU float32 model (have {runner.device}, {runner.dtype})")
    d = load_drafter(Path(srt_entmtp.__file__).parent / "heads" / kind, runner.model)
    _, batch, hidden, roots = _setup(runner)
    path = torch.randint(100, 2000, (hidden.shape[0], 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = [x.float() for x in d.path_logits(hidden, path)]
        ref_draft = d.propose(hidden, roots, batch)
        assert d.quantize_for_inference("auto") and d.int8
        q = [x.float() for x in d.path_logits(hidden, path)]
        q_draft = d.propose(hidden, roots, batch)
    for a, b in zip(ref, q):
        assert float((a - b).norm() / a.norm()) < 0.1
        assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.75
    assert q_draft.node_tokens.shape == ref_draft.node_tokens.shape
    assert q_draft.node_tokens[batch.node_indptr[:-1]].tolist() == roots.tolist()
    assert not d.quantize_for_inference("model") and not d.int8
    with torch.no_grad():
        assert torch.equal(d.path_logits(hidden, path)[0].float(), ref[0])  # back to the float weights
    with pytest.raises(ValueError, match="auto, int8 or model"):
        d.quantize_for_inference("int4")
