"""Attention backends behind one plan/run contract (see base.py)."""
from srt_entmtp.model.attention.base import AttentionBackend, create_backend

__all__ = ["AttentionBackend", "create_backend"]
