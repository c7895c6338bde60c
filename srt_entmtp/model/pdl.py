"""Programmatic dependent launch (PDL) for the forward's Triton kernels (Hopper and newer).

Inside a CUDA graph a batch-1 layer is five kernels of 1-4 us each, and each one pays its launch
and the first trip to DRAM for its weights after the kernel before it has ended. Launched with
PDL, a kernel starts while the one before it is still running: it may read what no earlier
kernel writes (its weights: small_linear prefetches them into L2), and then `gdc_wait`s until
the kernel before it has finished and its writes are visible. Each kernel lets the next one
start (`gdc_launch_dependents`) as soon as it is past its own wait, so at most two kernels
overlap, and a kernel that waits on its predecessor also waits, through it, on every earlier one.

Rules for a kernel launched this way: it writes nothing and reads nothing another kernel
writes before its gdc_wait, and it calls gdc_wait on every path. Kernels without PDL (cuBLAS,
torch) keep the stream's ordinary full dependency on both sides.
"""
from __future__ import annotations

import functools
import os

import torch

# ENTMTP_PDL=0 launches every kernel the ordinary way (benchmarks' A/B; read when a graph is captured)
ENABLED = os.environ.get("ENTMTP_PDL", "1") != "0"


@functools.cache
def _supported(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def on(x: torch.Tensor) -> bool:
    """Whether kernels working on x launch with PDL (CUDA, compute capability 9.0+, no interpreter)."""
    return ENABLED and x.is_cuda and _supported(x.device.index if x.device.index is not None
                                                 else torch.cuda.current_device())


def launch_kw(use: bool) -> dict:
    """Extra launch arguments for a Triton kernel taking PDL as a constexpr."""
    return {"launch_pdl": True} if use else {}
