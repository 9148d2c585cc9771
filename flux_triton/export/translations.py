"""ONNX translations the exporter is given for ATen operators its own table lacks in some torch
versions (`torch.onnx.export(..., custom_translation_table=...)`).

A network traced on a GPU is not the graph traced on the CPU: torch 2.11 turns `rms_norm` on a CUDA
tensor into `aten._fused_rms_norm`, which its ONNX exporter cannot translate (every attention
`norm_q`/`norm_k` of the FLUX DiT), while on the CPU it decomposes into elementwise operators.
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op

FLOAT32_EPS = torch.finfo(torch.float32).eps  # ATen's default eps for bf16/fp16/fp32 (float32 opmath)


def fused_rms_norm_onnx(x, normalized_shape, weight=None, eps=None):
    """aten._fused_rms_norm as ONNX, as its CPU decomposition computes it: x in float32 times
    1/sqrt(mean(x²) + eps) over the last len(normalized_shape) axes, times the weight, back in
    x's type; also the float32 reciprocal norm (the operator's second output)."""
    axes = op.Constant(value_ints=[-(i + 1) for i in range(len(normalized_shape))])
    x32 = op.Cast(x, to=onnx.TensorProto.FLOAT)
    mean_square = op.ReduceMean(op.Mul(x32, x32), axes, keepdims=1)
    epsilon = op.Constant(value_float=FLOAT32_EPS if eps is None else float(eps))
    rstd = op.Reciprocal(op.Sqrt(op.Add(mean_square, epsilon)))
    normed = op.Mul(x32, rstd)
    if weight is not None:
        normed = op.Mul(normed, op.Cast(weight, to=onnx.TensorProto.FLOAT))
    return op.CastLike(normed, x), rstd


TRANSLATIONS = {torch.ops.aten._fused_rms_norm.default: fused_rms_norm_onnx}
