"""Tokenizer loading and chat templating (the checkpoint's own template)."""
from __future__ import annotations

from pathlib import Path

from srt_entmtp.errors import ModelLoadError


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 -- transformers raises OSError/ValueError/... for a broken tokenizer
        raise ModelLoadError(f"{model_dir}: tokenizer files missing or unreadable: {e}") from None


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(out, "input_ids") or isinstance(out, dict):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)
