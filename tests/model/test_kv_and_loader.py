"""KV pool bookkeeping and loader errors: each error names the file at fault."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from srt_entmtp.errors import KVCacheFullError, ModelLoadError
from srt_entmtp.model.kv_cache import KVPool
from srt_entmtp.model.loader import convert_gguf, load_state_dict, resolve_model_path
from srt_entmtp.model.runner import ModelRunner


def test_kv_pool_alloc_free_and_errors():
    kv = KVPool(2, 8, 1, 4, torch.float32)
    a = kv.alloc(5)
    assert a.tolist() == [1, 2, 3, 4, 5] and kv.num_free == 3
    with pytest.raises(KVCacheFullError, match="need 4 slots, 3 free"):
        kv.alloc(4)
    kv.free(a[1:3])
    assert kv.alloc(2).tolist() == [2, 3]  # freed slots come back smallest first
    with pytest.raises(RuntimeError, match="double free"):
        kv.free(torch.tensor([7]))  # 7 was never allocated
    with pytest.raises(RuntimeError, match="double free"):
        kv.free(torch.tensor([4, 4]))  # the same slot twice in one call
    assert kv.num_free == 3


def test_kv_pool_alloc_array_and_alloc_many_share_the_stack():
    """alloc_array (numpy, the device step's) and alloc_many (tensors) pop the same stack in the
    same order, and both refuse what does not fit."""
    kv = KVPool(1, 10, 1, 2, torch.float32)
    a = kv.alloc_array(3)
    assert isinstance(a, np.ndarray) and a.tolist() == [1, 2, 3]
    b, c = kv.alloc_many([2, 1])
    assert b.tolist() == [4, 5] and c.tolist() == [6] and kv.num_free == 4
    with pytest.raises(KVCacheFullError, match="need 5 slots, 4 free"):
        kv.alloc_array(5)
    kv.free(a[1:])
    assert kv.alloc_array(2).tolist() == [2, 3]


def test_kv_pool_keeps_a_lone_requests_slots_contiguous_under_speculation():
    """A request taking 6 tree slots a step and keeping 1-3 of them: its kept slots are one
    ascending run (the SDPA backend then reads the cache through a view), and nothing leaks."""
    kv = KVPool(1, 64, 1, 2, torch.float32)
    seq = kv.alloc(10)
    for keep in [1, 3, 2, 3, 1, 2]:
        tree = kv.alloc(6)
        seq = torch.cat([seq, tree[:keep]])
        kv.free(tree[keep:])
    assert seq.tolist() == list(range(1, seq.numel() + 1))
    assert kv.num_free == 64 - seq.numel()


def test_kv_copy_slots_moves_every_layer():
    kv = KVPool(3, 8, 1, 2, torch.float32)
    kv.k[:, 5] = 7.0
    kv.v[:, 5] = 9.0
    kv.copy_slots(torch.tensor([5]), torch.tensor([2]))
    assert torch.all(kv.k[:, 2] == 7.0) and torch.all(kv.v[:, 2] == 9.0)


def test_missing_and_non_directory_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="directory not found"):
        resolve_model_path(tmp_path / "nope")
    f = tmp_path / "file.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a directory"):
        resolve_model_path(f)


def _copy_model(runner, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(runner.model_dir, d)
    return d


def test_unsupported_architecture_names_config(runner, tmp_path):
    d = _copy_model(runner, tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match=r"config.json: model_type 'gpt2' is not supported"):
        ModelRunner(d, kv_slots=16)


def test_truncated_weights_name_the_file(runner, tmp_path):
    d = _copy_model(runner, tmp_path)
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match=r"model.safetensors: corrupt or truncated"):
        load_state_dict(d)


def test_corrupt_weights_header_names_the_file(runner, tmp_path):
    d = _copy_model(runner, tmp_path)
    w = d / "model.safetensors"
    with open(w, "r+b") as fh:
        fh.seek(8)
        fh.write(b"\x00garbage")
    with pytest.raises(ModelLoadError, match=r"model.safetensors: corrupt or truncated"):
        load_state_dict(d)


def test_missing_tensor_is_named(runner, tmp_path):
    from safetensors.torch import load_file, save_file

    d = _copy_model(runner, tmp_path)
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.3.mlp.down_proj.weight"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model.layers.3.mlp.down_proj.weight"):
        ModelRunner(d, kv_slots=16)


def test_gguf_checksum_mismatch_names_the_file(tmp_path):
    g = tmp_path / "model.gguf"
    g.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match=r"model.gguf: sha256 .* does not match"):
        convert_gguf(g, tmp_path / "out", expect_sha256="0" * 64)
    assert not (tmp_path / "out").exists()


def test_unreadable_gguf_names_the_file(tmp_path):
    g = tmp_path / "broken.gguf"
    g.write_bytes(b"not a gguf at all")
    with pytest.raises(ModelLoadError, match=r"broken.gguf: cannot be read as a GGUF model"):
        convert_gguf(g, tmp_path / "out")
