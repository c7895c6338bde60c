"""What the Triton kernels' tests share: the device and dtype they run in (compiled in bf16 on a
GPU, Triton's interpreter in float32 here: conftest.py sets TRITON_INTERPRET=1), the tolerance
that goes with it, random inputs there, and the torch RMSNorm the kernels must round like."""
from __future__ import annotations

import importlib.util

import pytest
import torch

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="triton is not installed (pip install triton runs these in its interpreter)")

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DT = torch.bfloat16 if DEV == "cuda" else torch.float32
TOL = 3e-2 if DT == torch.bfloat16 else 1e-4


def rand(*shape, g, scale=1.0):
    return (torch.randn(*shape, generator=g) * scale).to(DEV, DT)


def rms(h, w, eps):
    from srt_entmtp.model.fused import rms_norm_torch

    return rms_norm_torch(h, w, eps)
