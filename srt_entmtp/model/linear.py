"""Matrix multiplies for the model's weights, picked once per device and dtype.

On CPU in float32, weights are pre-packed for oneDNN. MKL's GEMM, behind F.linear, is poor
at the 2-64-row shapes that tree verification produces, and MKL's GEMV for the 49k-row LM
head uses one core. Measured on this 2-core AVX2 machine: 1.5-2.5x faster for 2-16 rows,
2-4x for the LM head. Elsewhere weights stay plain tensors and F.linear is used.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACK_ROWS = 16  # the packing is tuned for this many rows; it stays good from 1 to 64


def onednn_available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


class Linear:
    """y = x @ w.T (+ b), with w stored in the fastest layout for the device."""

    __slots__ = ("weight", "bias", "packed", "out_features")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, pack: bool = False):
        self.out_features = weight.shape[0]
        self.bias = bias
        self.packed = pack
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            return F.linear(x, self.weight, self.bias)
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]).contiguous(), self.weight, self.bias,
                                               "none", [], "")
        return y.view(*shape[:-1], self.out_features)
