"""Export CLIP, T5, DiT, VAE decoder and VAE encoder (FLUX.2: its text encoder, DiT and VAE) to
ONNX, then check each against PyTorch with onnxruntime.

    python -m flux_triton.export.onnx_export --model-dir models/tiny-flux-schnell --out onnx/tiny-flux-schnell
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flux_triton import sampling
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.runtime.torch_components import load_component
from flux_triton.specs import ALL_NETWORKS, NETWORKS, ComponentSpec, component_specs, networks

EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to a side file (protobuf stops at 2 GiB)
TOLERANCE = dict.fromkeys(ALL_NETWORKS, 1e-4)
ONNX_PRECISIONS = ("FP32", "BF16", "FP8")
# The weights' type of each network's graph. BF16 as NVIDIA's FLUX demo builds it, except the VAE:
# ONNX's Conv has no bf16 before opset 22, so its graphs (decoder and encoder) stay float32 (TensorRT
# builds them tf32). FP8: the BF16 graphs, with float8 Q/DQ on the DiT's token Linear layers.
_REDUCED = {"clip_encoder": "bfloat16", "t5_encoder": "bfloat16", "text_encoder": "bfloat16",
            "dit_transformer": "bfloat16", "vae_decoder": "float32", "vae_encoder": "float32"}
GRAPH_DTYPES = {"FP32": dict.fromkeys(ALL_NETWORKS, "float32"), "BF16": _REDUCED, "FP8": _REDUCED}
IO_TYPES = {"float32": "FP32", "bfloat16": "BF16"}
# Parity of a reduced-precision graph: its float32 twin (bf16 weights, float32 arithmetic) against
# the PyTorch model with the same bf16 weights in float32 (and the same float8 Q/DQ for FP8). The
# weights are identical, but constants the exporter writes into a bf16 graph (mask values, and the
# square root of the attention scale it multiplies query and key by: 0.2969 for 0.2973 at FLUX's
# head_dim 128, logits 0.29 % cooler; not the activations' constants, see Float32Activation) are
# bf16-rounded there and not in the float32 reference, and for FP8 a value on a
# float8 rounding boundary can round the other way after a 1e-7 difference (one float8 step, 1/16
# relative, for that element). So the bound is on the relative L2 error: 2e-3, a quarter of bf16's
# epsilon; structural mistakes (a wrong weight, a dropped op) give errors of order 1.
REDUCED_RELATIVE_TOLERANCE = 2e-3


def carries_qdq(name: str, onnx_precision: str) -> bool:
    """Whether the network's graph in `onnx_precision` has float8 Q/DQ (the DiT's, in FP8)."""
    return onnx_precision == "FP8" and name == "dit_transformer"


def io_type(name: str, onnx_precision: str) -> str:
    """Triton type of a network's floating-point inputs and outputs in an `onnx_precision` graph."""
    return IO_TYPES[GRAPH_DTYPES[onnx_precision][name]]


class ExportError(RuntimeError):
    """An export or its parity check failed."""


class _Positional(torch.nn.Module):
    """A component with positional inputs and tuple outputs in spec order, as exporters want."""

    def __init__(self, component: torch.nn.Module, spec: ComponentSpec):
        super().__init__()
        self.component = component
        self.input_names = [t.name for t in spec.inputs]
        self.output_names = [t.name for t in spec.outputs]

    def forward(self, *args):
        outputs = self.component(**dict(zip(self.input_names, args)))
        return tuple(outputs[name] for name in self.output_names)


@contextlib.contextmanager
def float32_rope():
    """FLUX computes RoPE in float64 on CPU; graphs must not carry float64 (TensorRT has none)."""
    from diffusers.models.transformers import transformer_flux, transformer_flux2

    modules = (transformer_flux, transformer_flux2)
    originals = [module.maybe_adjust_dtype_for_device for module in modules]
    for module in modules:
        module.maybe_adjust_dtype_for_device = lambda dtype, device: torch.float32
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.maybe_adjust_dtype_for_device = original


def sample_inputs(name: str, info: FluxModelInfo, sizes: dict[str, int], seed: int = 0) -> dict:
    """Realistic inputs of one component for concrete axis sizes (B, S_txt, H_lat, W_lat); the
    VAE encoder's image is H_lat x W_lat latent pixels at the VAE's scale, its noise a real draw."""
    gen = torch.Generator().manual_seed(seed)
    batch, text = sizes["B"], sizes["S_txt"]
    lat_h, lat_w = sizes["H_lat"], sizes["W_lat"]
    if info.is_flux2:
        return flux2_sample_inputs(name, info, batch, text, lat_h, lat_w, gen)
    if name == "clip_encoder":
        ids = torch.randint(0, 49406, (batch, info.clip_max_length), generator=gen)
        ids[:, 0], ids[:, -3:] = 49406, 49407
        return {"input_ids": ids}
    if name == "t5_encoder":
        return {"input_ids": torch.randint(3, 400, (batch, text), generator=gen)}
    if name == "vae_decoder":
        latents = torch.randn(batch, info.latent_channels, lat_h, lat_w, generator=gen)
        return {"latents": sampling.to_vae_latents(latents, info.vae_scaling_factor, info.vae_shift_factor)}
    if name == "vae_encoder":
        scale = info.vae_scale_factor
        image = torch.rand(batch, 3, lat_h * scale, lat_w * scale, generator=gen) * 2 - 1
        return {"image": image,
                "noise": torch.randn(batch, info.latent_channels, lat_h, lat_w, generator=gen)}
    tokens = (lat_h // 2) * (lat_w // 2)
    inputs = {
        "hidden_states": torch.randn(batch, tokens, info.latent_channels * 4, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, info.t5_hidden_size, generator=gen) * 0.2,
        "pooled_projections": torch.randn(batch, info.clip_hidden_size, generator=gen),
        "timestep": torch.rand(batch, generator=gen),
        "img_ids": sampling.latent_image_ids(lat_h, lat_w, "cpu", torch.float32),
        "txt_ids": sampling.text_ids(text, "cpu", torch.float32),
    }
    if info.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def flux2_sample_inputs(name: str, info: FluxModelInfo, batch: int, text: int, lat_h: int,
                        lat_w: int, gen: torch.Generator) -> dict:
    """FLUX.2's networks' inputs: token ids with padding at the end (a mask of ones, then zeros),
    patched latents, int64 position ids of 4 axes."""
    channels = info.latent_channels * 4
    if name == "text_encoder":
        mask = torch.ones(batch, text, dtype=torch.int64)
        mask[:, text - text // 3:] = 0
        return {"input_ids": torch.randint(3, 400, (batch, text), generator=gen), "attention_mask": mask}
    if name == "vae_decoder":
        return {"latents": torch.randn(batch, channels, lat_h // 2, lat_w // 2, generator=gen)}
    if name == "vae_encoder":
        scale = info.vae_scale_factor
        return {"image": torch.rand(batch, 3, lat_h * scale, lat_w * scale, generator=gen) * 2 - 1}
    inputs = {
        "hidden_states": torch.randn(batch, (lat_h // 2) * (lat_w // 2), channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text, info.text_embed_dim, generator=gen) * 0.2,
        "timestep": torch.rand(batch, generator=gen),
        "img_ids": sampling.flux2_image_ids(lat_h // 2, lat_w // 2, "cpu"),
        "txt_ids": sampling.flux2_text_ids(text, "cpu"),
    }
    if info.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 4.0)
    return inputs


def _dynamic_shapes(spec: ComponentSpec) -> tuple:
    dims = {}
    shapes = []
    for tensor in spec.inputs:
        shapes.append({i: dims.setdefault(d, torch.export.Dim(d)) for i, d in enumerate(tensor.dims)
                       if isinstance(d, str)})
    return tuple(shapes)


EXPORT_SIZES = {"B": 2, "S_txt": 24, "H_lat": 8, "W_lat": 12}
CHECK_SIZES = [
    {"B": 1, "S_txt": 16, "H_lat": 8, "W_lat": 8},
    {"B": 3, "S_txt": 40, "H_lat": 16, "W_lat": 12},
]


def resolve_device(device: str) -> str:
    """`auto`: the GPU when there is one (a 12 B-parameter DiT in bf16 fits one card), else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def on_device(inputs: dict, device: str) -> dict:
    return {k: v.to(device) for k, v in inputs.items()}


class Float32Activation(torch.nn.Module):
    """An activation computed in float32 and returned in its input's type.

    transformers writes T5's tanh-GELU and CLIP's quick-GELU with Python constants (0.044715,
    sqrt(2/pi), 1.702). PyTorch multiplies a bf16 tensor by such a scalar in float32, but a graph
    traced in bf16 holds them as bf16 constants (0.04468, 0.7969, 1.703), which moves T5's output
    far past the parity bound through its layers (docs/export.md)."""

    def __init__(self, activation: torch.nn.Module):
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x.float()).to(x.dtype)


def with_float32_activations(module: torch.nn.Module) -> int:
    """Wrap each transformers activation in `module` in Float32Activation; return how many."""
    wrapped = 0
    for parent in list(module.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child).__module__ == "transformers.activations":
                setattr(parent, child_name, Float32Activation(child))
                wrapped += 1
    return wrapped


def reference_module(name: str, info: FluxModelInfo, onnx_precision: str = "FP32",
                     dtype: str | None = None, device: str = "cpu") -> torch.nn.Module:
    """The PyTorch network an `onnx_precision` graph is exported from (`dtype` None) or checked
    against (`dtype` "float32": the same bf16 weights, computing in float32), on `device`."""
    graph_dtype = GRAPH_DTYPES[onnx_precision][name]
    module = load_component(name, info, device, graph_dtype).eval()
    if graph_dtype != "float32":
        with_float32_activations(module)
    if carries_qdq(name, onnx_precision):
        from flux_triton.export.quantization import quantize_fp8

        def calibrate():
            for seed, sizes in enumerate(CHECK_SIZES):
                inputs = _cast(sample_inputs(name, info, sizes, seed=100 + seed), graph_dtype)
                module(**on_device(inputs, device))

        quantize_fp8(module, calibrate)
    if dtype is not None:
        module = module.to(getattr(torch, dtype))
    return module


def _cast(inputs: dict, dtype: str) -> dict:
    return {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v for k, v in inputs.items()}


def _module_device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def export_program(name: str, info: FluxModelInfo, module: torch.nn.Module,
                   onnx_precision: str = "FP32"):
    """`module` traced to an ONNXProgram on the device it lives on, optimized by
    `graph_optimizer`; its weights are the module's own tensors, not copies."""
    from flux_triton.export import graph_optimizer, quantization, translations

    graph_dtype = GRAPH_DTYPES[onnx_precision][name]
    spec = component_specs(info, IO_TYPES[graph_dtype])[name]
    wrapper = _Positional(module, spec).eval()
    sample = on_device(_cast(sample_inputs(name, info, EXPORT_SIZES), graph_dtype),
                       _module_device(module))
    args = tuple(sample[t.name] for t in spec.inputs)
    fp8 = carries_qdq(name, onnx_precision)
    with float32_rope(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=wrapper.input_names,
            output_names=wrapper.output_names, dynamic_shapes=(_dynamic_shapes(spec),), optimize=False,
            custom_translation_table={**translations.TRANSLATIONS,
                                      **(quantization.TRANSLATIONS if fp8 else {})},
            **({"opset_version": quantization.FP8_OPSET} if fp8 else {}),
        )
        graph_optimizer.optimize(program.model)
    return program


def save_program(program, target: Path, weight_bytes: int) -> None:
    """Write `program` to `target`, its weights to `target`.data when above EXTERNAL_DATA_BYTES.

    ONNXProgram.save(external_data=True) hands the graph to onnx_ir.save, whose external-data writer
    (`onnx_ir.external_data._write_external_data`) writes the initializers one by one with each
    tensor's `tofile`; the exporter's TorchTensor.tofile copies that one tensor to host memory
    (`.detach().cpu()`) and writes its bytes. Only the graph without weights is then serialized as a
    ModelProto, so host memory holds one tensor at a time, never all weights."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(target.name + "*"):
        stale.unlink()
    program.save(str(target), external_data=weight_bytes > EXTERNAL_DATA_BYTES)


def validate_graph(name: str, target: Path, input_names: list[str], fp8: bool = False) -> None:
    """onnx.checker (by path, so graphs above 2 GiB pass), no float64, the spec's input names, and
    float8 Q/DQ in an FP8 DiT. Reads the graph without its weights."""
    import onnx

    onnx.checker.check_model(str(target), full_check=True)
    model = onnx.load(str(target), load_external_data=False)
    double = [v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)
              if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    double += [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    if double:
        raise ExportError(f"{name}: float64 tensors left in the graph: {double[:5]}")
    graph_inputs = [i.name for i in model.graph.input]
    if graph_inputs != input_names:
        raise ExportError(f"{name}: ONNX inputs {graph_inputs}, expected {input_names}")
    if fp8 and not any(n.op_type == "QuantizeLinear" for n in model.graph.node):
        raise ExportError(f"{name}: no float8 QuantizeLinear in the FP8 graph")


def weight_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_component(name: str, info: FluxModelInfo, target: Path, onnx_precision: str = "FP32",
                     module: torch.nn.Module | None = None) -> Path:
    """Export one network to `target` (weights beside it if large); check validity and dtypes."""
    module = module if module is not None else reference_module(name, info, onnx_precision)
    program = export_program(name, info, module, onnx_precision)
    save_program(program, target, weight_bytes(module))
    del program  # it holds the module's weights: drop it before the parity reference widens them
    spec = component_specs(info)[name]
    validate_graph(name, target, [t.name for t in spec.inputs],
                   fp8=carries_qdq(name, onnx_precision))
    return target


@dataclass(frozen=True)
class ParityRow:
    component: str
    shapes: str
    max_abs_diff: float
    tolerance: float
    relative_error: float = 0.0
    relative_tolerance: float | None = None  # when set, the bound is on the relative L2 error

    @property
    def ok(self) -> bool:
        if self.relative_tolerance is not None:
            return self.relative_error <= self.relative_tolerance
        return self.max_abs_diff <= self.tolerance


def is_reduced(name: str, onnx_precision: str) -> bool:
    """Whether the graph is checked as its float32 twin (bf16 weights or float8 Q/DQ)."""
    return GRAPH_DTYPES[onnx_precision][name] != "float32" or carries_qdq(name, onnx_precision)


@contextlib.contextmanager
def exact_float32():
    """float32 matmuls and convolutions in full float32 on a GPU (no TF32), for references."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def torch_outputs(name: str, info: FluxModelInfo, module: torch.nn.Module,
                  cases: list[dict]) -> list[dict[str, np.ndarray]]:
    """`module` widened to float32 in place (the reference of every graph), run on each case on
    its own device; the outputs come back as float32 arrays."""
    module.float()
    device = _module_device(module)
    spec = component_specs(info)[name]
    outputs = []
    with torch.inference_mode(), exact_float32():
        for inputs in cases:
            result = module(**on_device(inputs, device))
            outputs.append({t.name: result[t.name].float().cpu().numpy() for t in spec.outputs})
    return outputs


def parity_session(model_path: Path, reduced: bool):
    """An onnxruntime CPU session for checking a graph (`reduced`: its float32 twin)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False  # freed tensors go back to the system: honest peak RSS
    if reduced:  # no fusing Q/DQ into integer kernels: float8 inputs are not theirs
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        # the default order runs every weight's Cast first (all float32 weights alive at once:
        # 48 GB for the DiT); this one runs each Cast next to its consumer, as the twin lists them
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def onnx_outputs(name: str, info: FluxModelInfo, onnx_path: Path, onnx_precision: str,
                 cases: list[dict]) -> list[dict[str, np.ndarray]]:
    """The graph run by onnxruntime's CPU provider on each case: a reduced graph as its float32
    twin, written beside it without its weights (it reads the graph's own bf16 weights file)."""
    from flux_triton.export.quantization import write_float32_twin

    spec = component_specs(info)[name]
    reduced = is_reduced(name, onnx_precision)
    model_path = write_float32_twin(onnx_path) if reduced else onnx_path
    try:
        session = parity_session(model_path, reduced)
        names = [t.name for t in spec.outputs]
        return [dict(zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})))
                for inputs in cases]
    finally:
        if reduced:
            model_path.unlink()


def parity_rows(name: str, onnx_precision: str, cases: list[dict], expected: list[dict],
                got: list[dict]) -> list[ParityRow]:
    """One row per case: the largest max abs diff and relative L2 error over the outputs."""
    rows = []
    for inputs, want, have in zip(cases, expected, got):
        diff = max(float(np.abs(have[k] - want[k]).max()) for k in have)
        relative = max(float(np.linalg.norm(have[k] - want[k]) / max(np.linalg.norm(want[k]), 1e-12))
                       for k in have)
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in inputs.items()
                           if k not in ("txt_ids", "img_ids"))
        rows.append(ParityRow(name, shapes, diff, TOLERANCE[name], relative,
                              REDUCED_RELATIVE_TOLERANCE if is_reduced(name, onnx_precision) else None))
    return rows


def check_component(name: str, info: FluxModelInfo, onnx_path: Path, onnx_precision: str = "FP32",
                    module: torch.nn.Module | None = None,
                    sizes: list[dict] = CHECK_SIZES) -> list[ParityRow]:
    """onnxruntime vs PyTorch on `sizes` (by default two batch sizes and two resolutions / text
    lengths). Reduced-precision graphs are run as their float32 twin against the PyTorch model in
    float32 with the same weights (see REDUCED_RELATIVE_TOLERANCE). The reference runs where
    `module` lives (widened in place) and is computed before onnxruntime loads the graph."""
    if module is None:
        module = reference_module(name, info, onnx_precision)
    cases = [sample_inputs(name, info, s, seed=seed + 1) for seed, s in enumerate(sizes)]
    expected = torch_outputs(name, info, module, cases)
    got = onnx_outputs(name, info, onnx_path, onnx_precision, cases)
    return parity_rows(name, onnx_precision, cases, expected, got)


def onnx_paths(out_dir: str | Path, info: FluxModelInfo | None = None) -> dict[str, Path]:
    """Where `export_all` writes each network (of `info`'s family; FLUX.1's by default):
    `<out_dir>/<name>/model.onnx`."""
    names = networks(info) if info is not None else NETWORKS
    return {name: Path(out_dir) / name / "model.onnx" for name in names}


def export_all(model_dir: str | Path, targets: dict[str, Path], report_path: Path,
               onnx_precision: str = "FP32", device: str = "auto") -> list[ParityRow]:
    """Export and check each network to its target, traced on `device` (auto: the GPU when there is
    one); raise ExportError after the table if any fails."""
    if onnx_precision not in ONNX_PRECISIONS:
        raise ExportError(f"ONNX precision must be one of {ONNX_PRECISIONS}, got {onnx_precision!r}")
    info = load_model_info(model_dir)
    device = resolve_device(device)
    rows, report = [], {}
    for name, path in targets.items():
        began = time.perf_counter()
        module = reference_module(name, info, onnx_precision, device=device)
        export_component(name, info, path, onnx_precision, module)
        exported = time.perf_counter() - began
        component_rows = check_component(name, info, path, onnx_precision, module)
        del module
        rows += component_rows
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        report[name] = {"export_s": round(exported, 2), "bytes": size, "device": device,
                        "graph_dtype": GRAPH_DTYPES[onnx_precision][name],
                        "max_abs_diff": [r.max_abs_diff for r in component_rows],
                        "relative_error": [r.relative_error for r in component_rows]}
        print(f"{name}: exported in {exported:.1f} s, {size / 1e6:.2f} MB", flush=True)
    print(f"\n{'component':<16} {'max abs diff':>12} {'rel. error':>10} {'tolerance':>10}  shapes")
    for row in rows:
        flag = "" if row.ok else "  FAIL"
        bound = (f"{row.relative_tolerance:.0e} rel" if row.relative_tolerance is not None
                 else f"{row.tolerance:.0e}")
        print(f"{row.component:<16} {row.max_abs_diff:>12.3e} {row.relative_error:>10.2e} "
              f"{bound:>10}  {row.shapes}{flag}")
    report_path.write_text(json.dumps(
        {"model_dir": str(info.model_dir), "onnx_precision": onnx_precision, "components": report},
        indent=2))
    failed = [r for r in rows if not r.ok]
    if failed:
        raise ExportError(
            f"ONNX parity failed for {sorted({r.component for r in failed})}: difference above tolerance"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/tiny-flux-schnell")
    parser.add_argument("--out", required=True)
    parser.add_argument("--precision", default="FP32", choices=ONNX_PRECISIONS)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where each network is traced and its reference runs (auto: the GPU if any)")
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        export_all(args.model_dir, onnx_paths(out, load_model_info(args.model_dir)),
                   out / "export_report.json", args.precision, args.device)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
