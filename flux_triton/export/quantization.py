"""Reduced-precision ONNX graphs: FP8 Q/DQ on the DiT's token Linear layers, and a float32 twin of a
bf16 graph for checking it where onnxruntime has no bf16 kernels (its CPU provider).

FP8 follows what TensorRT builds FP8 kernels from: QuantizeLinear/DequantizeLinear pairs (float8
e4m3, saturating) on each quantized Linear's weight (one scale per output row, from the weight) and
input activation (one scale per tensor, calibrated on sample inputs), in a bf16 graph built strongly
typed. The layers are the ones the PyTorch FP8 path quantizes (`runtime.acceleration.is_token_linear`).
"""

from __future__ import annotations

from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from onnxscript import opset21 as op

from flux_triton.runtime.acceleration import token_linear_names
from flux_triton.runtime.float8 import FLOAT8_MAX as FP8_MAX
from flux_triton.runtime.float8 import calibrate_input_amax, input_scale, replace_linears

FP8_OPSET = 21  # QuantizeLinear with float8, per-axis scales and `saturate`


@torch.library.custom_op("flux_export::fp8_qdq", mutates_args=())
def fp8_qdq(x: torch.Tensor, scale: torch.Tensor, axis: int) -> torch.Tensor:
    """x quantized to float8 e4m3 (saturating) and back: x / scale rounded, times scale. `scale` is
    a scalar, or one value per index of `axis`."""
    shape = [-1 if i == axis % x.dim() else 1 for i in range(x.dim())] if scale.dim() else []
    s = scale.float().reshape(shape) if shape else scale.float()
    q = (x.float() / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * s).to(x.dtype)


@fp8_qdq.register_fake
def _fp8_qdq_shape(x, scale, axis):
    return torch.empty_like(x)


def fp8_qdq_onnx(x, scale, axis: int):
    """fp8_qdq as ONNX: QuantizeLinear to float8 e4m3fn, then DequantizeLinear."""
    zero = op.Cast(op.Sub(scale, scale), to=onnx.TensorProto.FLOAT8E4M3FN)
    return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero, axis=axis, saturate=1), scale, zero,
                               axis=axis)


# torch.onnx.export(..., custom_translation_table=TRANSLATIONS) writes the custom op as Q/DQ.
TRANSLATIONS = {torch.ops.flux_export.fp8_qdq.default: fp8_qdq_onnx}


class Fp8Linear(torch.nn.Module):
    """A Linear whose input and weight pass through float8 Q/DQ."""

    def __init__(self, linear: torch.nn.Linear, input_amax: float):
        super().__init__()
        self.linear = linear
        weight_amax = linear.weight.detach().float().abs().amax(dim=1).clamp(min=1e-12)
        self.register_buffer("weight_scale", (weight_amax / FP8_MAX).to(linear.weight.dtype))
        self.register_buffer("input_scale", torch.tensor(input_scale(input_amax), dtype=linear.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.ops.flux_export.fp8_qdq(x, self.input_scale, -1)
        weight = torch.ops.flux_export.fp8_qdq(self.linear.weight, self.weight_scale, 0)
        return torch.nn.functional.linear(x, weight, self.linear.bias)


def quantize_fp8(model: torch.nn.Module, calibrate) -> int:
    """Replace the token Linear layers of `model` by Fp8Linear, with input scales from the largest
    magnitude each sees while `calibrate()` runs the model on sample inputs; return how many."""
    return replace_linears(model, calibrate_input_amax(model, token_linear_names(model), calibrate),
                           Fp8Linear)


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph computing in float32: each bf16 initializer is read through a Cast to float32
    placed before its first use, and every other bf16 value, constant and cast becomes float32.

    Every bf16 value is exactly a float32, so this computes the graph's function with its bf16
    weights, in float32: what onnxruntime's CPU provider (which has no bf16 MatMul or Conv) can run.
    The initializers stay as they are (in memory or in the graph's external data file), so a twin
    of a 24 GB graph is a graph of a few MB reading the same weights file, and onnxruntime widens
    each weight only while the node using it runs.
    """
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    graph = twin.graph

    def retype(values):
        for value in values:
            if value.type.tensor_type.elem_type == bf16:
                value.type.tensor_type.elem_type = f32

    def widen(tensor: onnx.TensorProto) -> onnx.TensorProto:
        array = numpy_helper.to_array(tensor).astype("float32")
        return numpy_helper.from_array(array, tensor.name)

    retype(graph.input)
    retype(graph.output)
    retype(graph.value_info)
    widened = {t.name: f"{t.name}.float32" for t in graph.initializer if t.data_type == bf16}
    nodes, cast = [], set()
    for node in graph.node:
        for index, name in enumerate(node.input):
            if name in widened:
                if name not in cast:
                    cast.add(name)
                    nodes.append(onnx.helper.make_node("Cast", [name], [widened[name]], to=f32,
                                                       name=f"{name}.to_float32"))
                node.input[index] = widened[name]
        for attribute in node.attribute:
            if attribute.name in ("to", "dtype") and attribute.i == bf16:
                attribute.i = f32
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == bf16:
                attribute.t.CopyFrom(widen(attribute.t))
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        nodes.append(copy)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return twin


def write_float32_twin(onnx_path: Path) -> Path:
    """`float32_twin` of the graph at `onnx_path`, written beside it as `<stem>.float32-twin.onnx`.
    Its weights are not loaded: the twin refers to the same external data file, if any."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    twin_path = onnx_path.with_name(onnx_path.stem + ".float32-twin.onnx")
    onnx.save(float32_twin(model), str(twin_path))
    return twin_path
