"""The forward's Triton kernels compile for Hopper with PDL on (no GPU needed: triton.compile to
an sm_90 target). The CPU tests run the kernels in Triton's interpreter, which never takes their
PDL branches (model/pdl.py turns PDL off there), so this is what checks those branches here:
each kernel waits on the kernel before exactly once, lets the next one start, the few-token
matmuls prefetch their weights, and only the last-split merge takes an atomic ticket."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _ptxas() -> bool:
    spec = importlib.util.find_spec("triton")
    return spec is not None and (Path(spec.origin).parent / "backends/nvidia/bin/ptxas").exists()


pytestmark = pytest.mark.skipif(not _ptxas(), reason="triton with its bundled ptxas is not installed")


@pytest.fixture(scope="module")
def ptx_counts() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(HERE / "compile_sm90.py")], capture_output=True, text=True, env=env,
                       timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_every_kernel_waits_once_then_lets_the_next_start(ptx_counts):
    assert len(ptx_counts) == 22
    for name, c in ptx_counts.items():
        assert c["wait"] == 1 and c["launch"] == 1, (name, c)


def test_the_matmuls_prefetch_their_weights_and_nothing_else_does(ptx_counts):
    for name, c in ptx_counts.items():
        matmul = name.startswith(("norm", "linear"))
        assert (c["prefetch"] > 0) == matmul, (name, c)
    # gate/up prefetches the gate and the up rows
    assert ptx_counts["norm_gate_silu"]["prefetch"] >= 2 * ptx_counts["norm_linear"]["prefetch"]


def test_only_the_last_split_merge_takes_a_ticket(ptx_counts):
    assert ptx_counts["tree_attn merge_last=True"]["atomic"] >= 1
    assert all(c["atomic"] == 0 for n, c in ptx_counts.items() if n != "tree_attn merge_last=True")


def test_pdl_is_off_where_it_cannot_run():
    """CPU tensors, and Triton's interpreter on any device, launch the ordinary way."""
    import torch

    from srt_entmtp.model import pdl

    assert not pdl.on(torch.zeros(1))
    assert pdl.launch_kw(False) == {}
