"""Export CLIP, T5, DiT and VAE decoder to ONNX, then check each against PyTorch with onnxruntime.

    python -m export.onnx_export --model-dir models/tiny-flux-schnell --out onnx/tiny-flux-schnell
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
from flux_triton.specs import NETWORKS, ComponentSpec, component_specs

EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to a side file (protobuf stops at 2 GiB)
TOLERANCE = {"clip_encoder": 1e-4, "t5_encoder": 1e-4, "dit_transformer": 1e-4, "vae_decoder": 1e-4}


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
    from diffusers.models.transformers import transformer_flux

    original = transformer_flux.maybe_adjust_dtype_for_device
    transformer_flux.maybe_adjust_dtype_for_device = lambda dtype, device: torch.float32
    try:
        yield
    finally:
        transformer_flux.maybe_adjust_dtype_for_device = original


def sample_inputs(name: str, info: FluxModelInfo, sizes: dict[str, int], seed: int = 0) -> dict:
    """Realistic inputs of one component for concrete axis sizes (B, S_txt, H_lat, W_lat)."""
    gen = torch.Generator().manual_seed(seed)
    batch, text = sizes["B"], sizes["S_txt"]
    lat_h, lat_w = sizes["H_lat"], sizes["W_lat"]
    if name == "clip_encoder":
        ids = torch.randint(0, 49406, (batch, info.clip_max_length), generator=gen)
        ids[:, 0], ids[:, -3:] = 49406, 49407
        return {"input_ids": ids}
    if name == "t5_encoder":
        return {"input_ids": torch.randint(3, 400, (batch, text), generator=gen)}
    if name == "vae_decoder":
        latents = torch.randn(batch, info.latent_channels, lat_h, lat_w, generator=gen)
        return {"latents": sampling.to_vae_latents(latents, info.vae_scaling_factor, info.vae_shift_factor)}
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


def export_component(name: str, info: FluxModelInfo, target: Path) -> Path:
    """Export one network to `target` (weights beside it if large); check validity and dtypes."""
    import onnx

    spec = component_specs(info)[name]
    wrapper = _Positional(load_component(name, info), spec).eval()
    sample = sample_inputs(name, info, EXPORT_SIZES)
    args = tuple(sample[t.name] for t in spec.inputs)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(target.name + "*"):
        stale.unlink()
    weight_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    with float32_rope(), torch.no_grad(), contextlib.redirect_stdout(sys.stderr):
        program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=wrapper.input_names,
            output_names=wrapper.output_names, dynamic_shapes=(_dynamic_shapes(spec),), optimize=True,
        )
        program.save(str(target), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    onnx.checker.check_model(str(target), full_check=True)
    model = onnx.load(str(target), load_external_data=False)
    double = [v.name for v in (*model.graph.input, *model.graph.output, *model.graph.value_info)
              if v.type.tensor_type.elem_type == onnx.TensorProto.DOUBLE]
    double += [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.DOUBLE]
    if double:
        raise ExportError(f"{name}: float64 tensors left in the graph: {double[:5]}")
    graph_inputs = [i.name for i in model.graph.input]
    if graph_inputs != wrapper.input_names:
        raise ExportError(f"{name}: ONNX inputs {graph_inputs}, expected {wrapper.input_names}")
    return target


@dataclass(frozen=True)
class ParityRow:
    component: str
    shapes: str
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def check_component(name: str, info: FluxModelInfo, onnx_path: Path) -> list[ParityRow]:
    """onnxruntime vs PyTorch on two batch sizes and two resolutions / text lengths."""
    import onnxruntime as ort

    spec = component_specs(info)[name]
    component = load_component(name, info).eval()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rows = []
    for seed, sizes in enumerate(CHECK_SIZES):
        inputs = sample_inputs(name, info, sizes, seed=seed + 1)
        with torch.inference_mode():
            expected = component(**inputs)
        feed = {k: v.numpy() for k, v in inputs.items()}
        got = dict(zip([t.name for t in spec.outputs], session.run(None, feed)))
        diff = max(float(np.abs(got[k] - expected[k].numpy()).max()) for k in got)
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in inputs.items() if k not in ("txt_ids",
                                                                                          "img_ids"))
        rows.append(ParityRow(name, shapes, diff, TOLERANCE[name]))
    return rows


def onnx_paths(out_dir: str | Path) -> dict[str, Path]:
    """Where `export_all` writes each network: `<out_dir>/<name>/model.onnx`."""
    return {name: Path(out_dir) / name / "model.onnx" for name in NETWORKS}


def export_all(model_dir: str | Path, targets: dict[str, Path], report_path: Path) -> list[ParityRow]:
    """Export and check each network to its target; raise ExportError after the table if any fails."""
    info = load_model_info(model_dir)
    rows, report = [], {}
    for name, path in targets.items():
        began = time.perf_counter()
        export_component(name, info, path)
        exported = time.perf_counter() - began
        component_rows = check_component(name, info, path)
        rows += component_rows
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        report[name] = {"export_s": round(exported, 2), "bytes": size,
                        "max_abs_diff": [r.max_abs_diff for r in component_rows]}
        print(f"{name}: exported in {exported:.1f} s, {size / 1e6:.2f} MB", flush=True)
    print(f"\n{'component':<16} {'max abs diff':>12} {'tolerance':>10}  shapes")
    for row in rows:
        flag = "" if row.ok else "  FAIL"
        print(f"{row.component:<16} {row.max_abs_diff:>12.3e} {row.tolerance:>10.0e}  {row.shapes}{flag}")
    report_path.write_text(json.dumps(
        {"model_dir": str(info.model_dir), "components": report}, indent=2))
    failed = [r for r in rows if not r.ok]
    if failed:
        raise ExportError(
            f"ONNX parity failed for {sorted({r.component for r in failed})}: max abs diff above tolerance"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/tiny-flux-schnell")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        out = Path(args.out)
        export_all(args.model_dir, onnx_paths(out), out / "export_report.json")
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
