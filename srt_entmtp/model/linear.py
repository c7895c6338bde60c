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

    __slots__ = ("bias", "out_features", "packed", "weight")

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


def int8_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether int8 dynamic-quantised linears (fbgemm / x86 engine) run here: CPU float32."""
    engines = torch.backends.quantized.supported_engines
    return (device.type == "cpu" and dtype == torch.float32 and ("x86" in engines or "fbgemm" in engines)
            and hasattr(torch.ops.quantized, "linear_dynamic"))


class Int8Linear:
    """y ~= x @ w.T (+ b) with w in int8 (one scale per output row) and x quantised per call.

    For draft heads only: their proposals are verified by the float model, so rounding them
    changes which tokens get proposed, never what is emitted. A quarter of float32's bytes: on
    this 2-core AVX2 CPU a 16384x576 projection takes 0.36-0.57 ms for 1-6 rows against
    1.5-1.8 ms for the pre-packed float32 one (fbgemm's int8 GEMM; relative error ~2%).
    """

    __slots__ = ("out_features", "packed")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        import warnings

        w = weight.detach().float().contiguous()
        self.out_features = w.shape[0]
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127.0).double()
        zero = torch.zeros(w.shape[0], dtype=torch.long)
        with warnings.catch_warnings():  # torch 2.13 flags quantised-tensor creation as deprecated
            warnings.simplefilter("ignore", UserWarning)
            q = torch.quantize_per_channel(w, scale, zero, 0, torch.qint8)
            self.packed = torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        # reduce_range: 7-bit activations, so fbgemm's int8 pair products cannot saturate on AVX2
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, shape[-1]).contiguous(), self.packed, True)
        return y.view(*shape[:-1], self.out_features)
