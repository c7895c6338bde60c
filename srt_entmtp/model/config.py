"""The subset of a Hugging Face config.json that the native forward needs."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from srt_entmtp.errors import ModelLoadError

# model_type -> (q/k/v bias, per-head q/k RMSNorm)
SUPPORTED_ARCHS = {
    "llama": (False, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (False, True),
}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    eos_token_ids: tuple[int, ...] = field(default=())
    name: str = ""

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        mt = d.get("model_type")
        if mt not in SUPPORTED_ARCHS:
            raise ModelLoadError(
                f"{source}: model_type {mt!r} is not supported; supported: {', '.join(sorted(SUPPORTED_ARCHS))}"
            )
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(d.get(key), int):
                raise ModelLoadError(f"{source}: field {key!r} is missing or not an integer")
        bias, qk_norm = SUPPORTED_ARCHS[mt]
        heads = d["num_attention_heads"]
        # transformers 5 moved rope_theta/rope_scaling into rope_parameters
        rope = d.get("rope_parameters") or {}
        theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        eos = d.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", mt != "llama")),
            qkv_bias=bool(d.get("attention_bias", bias)),
            qk_norm=qk_norm,
            eos_token_ids=eos,
            name=d.get("_name_or_path") or d.get("_model_name_or_path") or "",
        )

    @classmethod
    def from_dir(cls, path: Path) -> ModelConfig:
        f = Path(path) / "config.json"
        if not f.is_file():
            raise ModelLoadError(f"{f}: not found (a model directory needs config.json)")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{f}: invalid JSON: {e}") from None
        return cls.from_dict(d, source=str(f))
