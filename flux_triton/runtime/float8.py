"""Float8 (e4m3) Linear layers with static input scales: each layer's input is divided by one scale
calibrated ahead of time (the largest magnitude it saw while the pipeline ran sample prompts), its
weight is quantized row by row, and the product is one `torch._scaled_mm`.

Against torchao's row-wise dynamic scheme (`acceleration.quantize_float8`) this drops the pass
that finds each row's maximum before every matmul; the cast to float8 is then pointwise and
fuses into the kernel that makes the input. The scales are those of the FP8 ONNX graphs for
TensorRT (`export.quantization`): one definition of the scheme for both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

FLOAT8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
CALIBRATION_VERSION = 1


def is_float8(weight) -> bool:
    """A float8 weight that keeps its data and row scales in `qdata` and `scale` (torchao's, or a
    `StaticFloat8Linear`'s)."""
    return hasattr(weight, "qdata") and hasattr(weight, "scale")


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise float8 (e4m3) data and scales [out, 1] of a weight, torchao's row-wise scheme
    (scale = max |row| / 448, as `Float8Tensor.from_hp`, which rounds the scale to bf16 first; a
    row of zeros gets a tiny scale, not a NaN)."""
    scale = weight.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FLOAT8_MAX
    return (weight.float() / scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn), scale


def input_scale(amax: float) -> float:
    """The static scale of an input whose largest magnitude was `amax` (a layer that only ever saw
    zeros gets a tiny one, not a division by zero)."""
    return max(float(amax), 1e-12) / FLOAT8_MAX


class Float8Rows:
    """A weight held as row-wise float8: `qdata` [out, in] e4m3 and `scale` [out, 1] float32. The
    fields LoRA merging rewrites in place (`runtime.loras.MergedAdapters`), as in torchao's."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        self.qdata, self.scale = qdata, scale
        self.block_size = (1, qdata.shape[-1])

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape


class StaticFloat8Linear(torch.nn.Module):
    """`linear` in float8: y = (x / s quantized) @ (W row-quantized)^T, scaled back, plus the bias,
    with s a constant (`input_amax` / 448) and the output in x's dtype. Inputs beyond the
    calibrated range saturate at ±448 · s."""

    def __init__(self, linear: torch.nn.Linear, input_amax: float):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        qdata, scale = quantize_rows(linear.weight.detach())
        self.register_buffer("weight_data", qdata)
        self.register_buffer("weight_scale", scale)
        self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(),
                                                                         requires_grad=False)
        self.register_buffer("input_scale", torch.tensor(
            input_scale(input_amax), dtype=torch.float32, device=qdata.device))

    @property
    def weight(self) -> Float8Rows:
        """The weight's data and scales, the module's own tensors (what LoRA merging rewrites)."""
        return Float8Rows(self.weight_data, self.weight_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        data = (rows.float() / self.input_scale).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
        # row-wise scaled_mm: a scale per row of each operand, the input's all the same
        out = torch._scaled_mm(data, self.weight_data.t(),
                               scale_a=self.input_scale.expand(rows.shape[0], 1).contiguous(),
                               scale_b=self.weight_scale.t().contiguous(),
                               bias=self.bias, out_dtype=x.dtype,
                               use_fast_accum=True)  # as torchao's inference float8 (CPU: no-op)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"input_scale={float(self.input_scale):.4g}")


def calibrate_input_amax(model: torch.nn.Module, names: Iterable[str],
                         run: Callable[[], None]) -> dict[str, float]:
    """The largest input magnitude each layer `names` of `model` sees while `run()` runs it."""
    modules = dict(model.named_modules())
    amax: dict[str, float] = {}

    def record(name: str, inputs: tuple) -> None:
        value, previous = float(inputs[0].detach().abs().max()), amax.get(name, 0.0)
        # a NaN is kept (write_calibration refuses it), where max() could drop it
        amax[name] = previous if value <= previous or math.isnan(previous) else value

    hooks = [modules[name].register_forward_pre_hook(
        lambda _module, inputs, name=name: record(name, inputs)) for name in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    missing = [name for name in names if name not in amax]
    if missing:
        raise ValueError(f"calibration never ran {len(missing)} layer(s), e.g. {missing[:3]}")
    return amax


def replace_linears(model: torch.nn.Module, amax: dict[str, float],
                    make: Callable[[torch.nn.Linear, float], torch.nn.Module]) -> int:
    """Put `make(linear, amax[name])` in place of each Linear `name` of `model`; returns how many."""
    for name, value in amax.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(parent.get_submodule(child), value))
    return len(amax)


def quantize_static(model: torch.nn.Module, amax: dict[str, float], names: Iterable[str]) -> int:
    """`StaticFloat8Linear` in place of each Linear `names` of `model`, with the calibrated `amax`;
    every one needs a value (a calibration of another model is refused, naming a layer)."""
    names = list(names)
    missing = [name for name in names if name not in amax]
    if missing:
        raise ValueError(f"the FP8 calibration has no scale for {len(missing)} of this model's "
                         f"{len(names)} float8 layers (e.g. {missing[0]!r}): it was made for "
                         "another model; export again to recalibrate")
    return replace_linears(model, {name: amax[name] for name in names}, StaticFloat8Linear)


def _is_amax(value: float) -> bool:
    """A largest magnitude a calibration can keep: finite and >= 0 (not NaN)."""
    return 0 <= value < math.inf


def write_calibration(path: Path, amax: dict[str, float], about: dict) -> None:
    """Save a calibration (`amax` by layer) and what it was made from (`about`: prompts, steps)."""
    broken = [name for name, value in amax.items() if not _is_amax(value)]
    if broken:
        raise ValueError(f"the FP8 calibration saw inputs that are not finite in {len(broken)} "
                         f"layer(s), e.g. {broken[0]!r}: the model overflowed on a calibration "
                         "prompt; calibrate on other prompts (CALIBRATION_PROMPTS)")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": CALIBRATION_VERSION, "about": about,
                                "input_amax": amax}, indent=1, sort_keys=True))


def read_calibration(path: Path) -> dict[str, float]:
    """The `input_amax` of a calibration file, checked: finite non-negative numbers by layer."""
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the FP8 calibration {path}: {exc}") from None
    if not isinstance(document, dict):
        document = {}
    amax = document.get("input_amax")
    if document.get("version") != CALIBRATION_VERSION or not isinstance(amax, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and _is_amax(v)
            for v in amax.values()):
        raise ValueError(f"{path} is not an FP8 calibration (version {CALIBRATION_VERSION}, "
                         "`input_amax`: a finite number >= 0 by layer name)")
    return {str(k): float(v) for k, v in amax.items()}
