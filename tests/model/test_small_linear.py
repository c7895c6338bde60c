"""The fused few-row matmuls (model/small_linear.py) against the torch ops they replace, and the
model's few-token forward path against its ordinary one. Without CUDA they run in Triton's
interpreter (conftest.py sets TRITON_INTERPRET=1) in float32; with CUDA, compiled, in bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.kernel_checks import DEV, DT, TOL, needs_triton, rand, rms

pytestmark = needs_triton


def close(a, b):
    return torch.allclose(a.float().cpu(), b.float().cpu(), atol=TOL, rtol=TOL), (a.float() - b.float()).abs().max()


# rows: one, a few, a full tile, past one tile; K and N not multiples of the tiles (200 / 128, 40 / 16)
@pytest.mark.parametrize("M", [1, 5, 16, 19, 40, 64])
@pytest.mark.parametrize("config", [None, (32, 64, 2, 2), (64, 16, 64, 4, 2)])
def test_norm_linear_is_rms_norm_then_linear(M, config):
    from srt_entmtp.model.small_linear import norm_linear

    g = torch.Generator().manual_seed(M)
    h, ln, w, b = rand(M, 200, g=g), rand(200, g=g), rand(40, 200, g=g, scale=0.1), rand(40, g=g)
    for bias in (None, b):
        ok, err = close(norm_linear(h, ln, w, bias, 1e-5, config=config), F.linear(rms(h, ln, 1e-5), w, bias))
        assert ok, err


@pytest.mark.parametrize("M", [1, 7, 16, 21, 33])
def test_norm_gate_silu_is_rms_norm_linear_then_silu_times_up(M):
    from srt_entmtp.model.small_linear import norm_gate_silu

    g = torch.Generator().manual_seed(10 + M)
    h, ln, w = rand(M, 96, g=g), rand(96, g=g), rand(2 * 56, 96, g=g, scale=0.1)
    gate, up = F.linear(rms(h, ln, 1e-6), w).chunk(2, dim=-1)
    ok, err = close(norm_gate_silu(h, ln, w, 1e-6), F.silu(gate) * up)
    assert ok, err


@pytest.mark.parametrize("M", [1, 9, 16, 18, 57])
def test_linear_residual_adds_the_product_to_the_residual(M):
    from srt_entmtp.model.small_linear import linear_residual

    g = torch.Generator().manual_seed(20 + M)
    x, w, r = rand(M, 150, g=g), rand(48, 150, g=g, scale=0.1), rand(M, 48, g=g)
    before = r.clone()
    ok, err = close(linear_residual(x, w, r), r + F.linear(x, w))
    assert ok, err
    assert torch.equal(r, before), "the residual is read, not written"


@pytest.mark.parametrize("M", [1, 6, 16, 21])
@pytest.mark.parametrize("config", [None, (32, 64, 2, 2)])
def test_norm_qkv_rope_is_norm_linear_then_rope_and_kv_store(M, config):
    """The q/k/v projection with RoPE and the KV store in its epilogue gives the two-kernel form's
    q and cache contents (4 q heads, 2 kv heads of 16: pairs (c, c + 8) of a head in one tile),
    and writes no cache slot but the rows' own."""
    from srt_entmtp.model import fused
    from srt_entmtp.model.small_linear import RopeStore, norm_linear, norm_qkv_rope

    g = torch.Generator().manual_seed(30 + M)
    H, KH, d, hidden = 4, 2, 16, 72
    h, ln = rand(M, hidden, g=g), rand(hidden, g=g)
    w, b = rand((H + 2 * KH) * d, hidden, g=g, scale=0.1), rand((H + 2 * KH) * d, g=g)
    positions = torch.randint(0, 50, (M,), generator=g).to(DEV)
    slots = torch.randperm(3 * M, generator=g)[:M].to(DEV)
    ang = torch.outer(torch.arange(64.0), 1.0 / 10000 ** (torch.arange(0, d, 2) / d))
    cos = torch.cat([ang, ang], -1).cos().to(DEV)
    sin = torch.cat([-ang.sin(), ang.sin()], -1).to(DEV)
    for bias in (None, b):
        caches = [torch.full((3 * M, KH, d), 7.0, device=DEV, dtype=DT) for _ in range(4)]
        q = norm_qkv_rope(h, ln, w, bias, 1e-5, RopeStore(positions, cos, sin, caches[0], caches[1], slots, H * d,
                                                          KH * d, d), config=config)
        qkv = norm_linear(h, ln, w, bias, 1e-5, config=config)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(fused, "enabled", lambda x: True)
            q_ref = fused.rope_qkv_store(qkv.view(M, H + 2 * KH, d), H, KH, positions, cos, sin, caches[2],
                                         caches[3], slots)
        assert q.shape == (M, H, d)
        ok, err = close(q, q_ref)
        assert ok, err
        for got, want in ((caches[0], caches[2]), (caches[1], caches[3])):
            ok, err = close(got, want)
            assert ok, err
        untouched = torch.ones(3 * M, dtype=torch.bool)
        untouched[slots.cpu()] = False
        assert (caches[0].cpu()[untouched] == 7.0).all() and (caches[1].cpu()[untouched] == 7.0).all()


def test_row_tiles_follow_the_row_count(monkeypatch):
    """16-row tiles at every size by default (on the H200, one 32- or 64-row tile was slower than
    two or four 16-row ones: docs/gpu.md); with wide tiles configured (WIDE, as
    ENTMTP_SMALL_LINEAR_CONFIGS sets them), 17-32 rows take the 32-row group's tile, 33-64 the
    64-row one and 65-128 the 128-row one, where a 5-tuple entry names its own row tile; rows past
    the largest group, and ops a group does not name, keep 16-row tiles; the draft top-k keeps
    16-row tiles; an explicit config wins (a 4-tuple is a 16-row tile)."""
    from srt_entmtp.model import small_linear
    from srt_entmtp.model.small_linear import CONFIGS, tile

    assert tile("norm_linear", 16) == (16, CONFIGS["norm_linear"])
    assert tile("norm_linear", 30) == (16, CONFIGS["norm_linear"])
    wide = {32: {"norm_linear": (16, 128, 4, 3)}, 64: {"norm_linear": (32, 128, 4, 3)}}
    monkeypatch.setattr(small_linear, "WIDE", wide)
    assert tile("norm_linear", 17) == (32, wide[32]["norm_linear"])
    assert tile("norm_linear", 64) == (64, wide[64]["norm_linear"])
    assert tile("topk", 30)[0] == 16
    assert tile("norm_gate_silu", 5, (64, 32, 128, 4, 3)) == (64, (32, 128, 4, 3))
    assert tile("norm_gate_silu", 40, (32, 128, 4, 3)) == (16, (32, 128, 4, 3))
    assert tile("norm_gate_silu", 40) == (16, CONFIGS["norm_gate_silu"])  # not named in group 64
    wide[128] = {"norm_linear": (16, 64, 128, 8, 3)}
    assert tile("norm_linear", 65) == (16, (64, 128, 8, 3))
    assert tile("norm_linear", 129) == (16, CONFIGS["norm_linear"])


def tiny_model(qkv_bias: bool, monkeypatch):
    from srt_entmtp.model import llama
    from srt_entmtp.model.config import ModelConfig

    monkeypatch.setattr(llama, "onednn_available", lambda *a: False)  # plain weights: the kernels read them

    cfg = ModelConfig(model_type="llama", vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                      rope_scaling=None, max_position_embeddings=128, tie_word_embeddings=True, qkv_bias=qkv_bias,
                      qk_norm=False)
    g = torch.Generator().manual_seed(3)
    sd = {"model.embed_tokens.weight": torch.randn(97, 64, generator=g), "model.norm.weight": 1 + 0.1 * torch.randn(64, generator=g)}
    for i in range(2):
        p, a = f"model.layers.{i}.", f"model.layers.{i}.self_attn."
        sd[p + "input_layernorm.weight"] = 1 + 0.1 * torch.randn(64, generator=g)
        sd[p + "post_attention_layernorm.weight"] = 1 + 0.1 * torch.randn(64, generator=g)
        for n, (o, k) in {"q_proj": (64, 64), "k_proj": (32, 64), "v_proj": (32, 64), "o_proj": (64, 64)}.items():
            sd[a + n + ".weight"] = 0.1 * torch.randn(o, k, generator=g)
            if qkv_bias and n != "o_proj":
                sd[a + n + ".bias"] = 0.1 * torch.randn(o, generator=g)
        sd[p + "mlp.gate_proj.weight"] = 0.1 * torch.randn(96, 64, generator=g)
        sd[p + "mlp.up_proj.weight"] = 0.1 * torch.randn(96, 64, generator=g)
        sd[p + "mlp.down_proj.weight"] = 0.1 * torch.randn(64, 96, generator=g)
    return cfg, llama.LlamaModel(cfg, sd, DT, DEV, max_positions=128)


@pytest.mark.parametrize("rope_in_qkv, mid_m", [(True, 0), (False, 0), (True, 128), (False, 128)])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_few_token_forward_matches_the_ordinary_forward(monkeypatch, qkv_bias, rope_in_qkv, mid_m):
    """A 40-token prompt (the ordinary path, or with MID_M the mid-size one: fused q/k/v + RoPE + KV
    store and o, the MLP unfused with the residual in the down projection's addmm), then a 3-token
    chunk on top of it (the few-token path: fused matmuls, RoPE + KV store in the q/k/v kernel or
    in one of their own) give the unfused forward's hidden states, and write the same KV."""
    from srt_entmtp.model import fused, llama, small_linear
    from srt_entmtp.model.attention.sdpa import SdpaBackend
    from srt_entmtp.model.forward_batch import ForwardBatch
    from srt_entmtp.model.kv_cache import KVPool

    _, model = tiny_model(qkv_bias, monkeypatch)
    prompt = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(4))
    chunk = torch.randint(0, 97, (3,), generator=torch.Generator().manual_seed(5))

    def run():
        kv = KVPool(2, 64, 2, 16, DT, DEV)
        attn = SdpaBackend(kv, 4, 2, 16)
        slots = kv.alloc(43)
        outs = []
        for toks, prefix, new in ((prompt, slots[:0], slots[:40]), (chunk, slots[:40], slots[40:])):
            fb = ForwardBatch.build([toks], [prefix], [new], device=DEV)
            attn.plan(fb)
            outs.append(model.forward(fb.input_ids, fb.positions, attn))
        return outs, kv.k.clone(), kv.v.clone()

    calls = []

    def counted(name):
        real = getattr(small_linear, name)

        def call(*a, **k):
            calls.append((name, a[0].shape[0]))
            return real(*a, **k)
        return call

    with monkeypatch.context() as m:  # the Triton kernels, on CPU in the interpreter, in float32
        m.setattr(fused, "enabled", lambda x: True)
        m.setattr(small_linear, "ROPE_IN_QKV", rope_in_qkv)
        m.setattr(small_linear, "MID_M", mid_m)
        for name in ("norm_qkv_rope", "norm_linear"):
            m.setattr(llama.small_linear, name, counted(name))
        few_out, few_k, few_v = run()
    base_out, base_k, base_v = run()
    few = [("norm_qkv_rope" if rope_in_qkv else "norm_linear", 3)] * 2  # once a layer, for the 3-token forward
    assert calls == ([("norm_qkv_rope", 40)] * 2 if mid_m else []) + few, calls
    for a, b in zip(few_out, base_out):
        ok, err = close(a, b)
        assert ok, err
    assert close(few_k, base_k)[0] and close(few_v, base_v)[0]
