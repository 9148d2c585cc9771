"""BF16 and FP8 ONNX graphs of the tiny model: exported, checked in onnxruntime against PyTorch in the
same precision, and built by TensorRT as NVIDIA builds them (strongly typed), against a recording
stand-in of the TensorRT API."""

from __future__ import annotations

import json
from enum import IntEnum

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from flux_triton.export.onnx_export import (
    CHECK_SIZES,
    GRAPH_DTYPES,
    ExportError,
    check_component,
    export_all,
    onnx_paths,
    sample_inputs,
)
from flux_triton.export.profiles import AxisRange, load_engine_config
from flux_triton.export.quantization import float32_twin
from flux_triton.export.repository import render_repository
from flux_triton.export.tensorrt_build import EngineBuildError, build_plan
from flux_triton.model_info import load_model_info
from flux_triton.runtime.acceleration import is_token_linear
from flux_triton.runtime.torch_components import load_component
from flux_triton.serving_config import ServingLimits
from flux_triton.specs import ALL_NETWORKS, NETWORKS, component_specs


@pytest.fixture(scope="module")
def exported(model_dirs, tmp_path_factory):
    """The tiny dev model exported as BF16 and FP8 graphs (each checked by export_all)."""
    out = {}
    for precision in ("BF16", "FP8"):
        root = tmp_path_factory.mktemp(precision.lower())
        rows = export_all(model_dirs["dev"], onnx_paths(root), root / "report.json", precision)
        out[precision] = (root, rows, json.loads((root / "report.json").read_text()))
    return out


def _weight_bytes_by_type(path) -> dict[int, int]:
    """Bytes of the graph's matrices (initializers of 2 or more dims) by element type."""
    model = onnx.load(str(path), load_external_data=False)
    sizes: dict[int, int] = {}
    for tensor in model.graph.initializer:
        if len(tensor.dims) >= 2:
            sizes[tensor.data_type] = sizes.get(tensor.data_type, 0) + len(tensor.raw_data)
    return sizes


def test_bf16_graphs_carry_bf16_weights_and_match_pytorch(exported):
    root, rows, report = exported["BF16"]
    for row in rows:
        print(f"\nBF16 {row.component}: relative error {row.relative_error:.2e} "
              f"(bound {row.relative_tolerance}), {row.shapes}")
    assert all(r.ok for r in rows) and {r.component for r in rows} == set(NETWORKS)
    # the text encoders' activations run in float32 in the graph, as PyTorch runs their Python-float
    # constants: their float32 twins then match to float32 rounding (bf16 constants gave 2.6e-4)
    assert all(r.relative_error < 1e-5 for r in rows if r.component in ("clip_encoder", "t5_encoder"))
    for name in NETWORKS:
        expected = {"bfloat16": onnx.TensorProto.BFLOAT16, "float32": onnx.TensorProto.FLOAT}[
            GRAPH_DTYPES["BF16"][name]]
        sizes = _weight_bytes_by_type(onnx_paths(root)[name])
        assert sizes.get(expected, 0) >= 0.9 * sum(sizes.values()), (name, sizes)  # RoPE tables: fp32
        assert report["components"][name]["graph_dtype"] == GRAPH_DTYPES["BF16"][name]


def test_fp8_dit_has_float8_qdq_on_every_token_linear(exported, model_dirs):
    root, rows, _ = exported["FP8"]
    assert all(r.ok for r in rows), [(r.component, r.relative_error) for r in rows]
    model = onnx.load(str(onnx_paths(root)["dit_transformer"]))
    info = load_model_info(model_dirs["dev"])
    dit = load_component("dit_transformer", info).model
    linears = sum(is_token_linear(m, n) for n, m in dit.named_modules())
    quantize = [n for n in model.graph.node if n.op_type == "QuantizeLinear"]
    weights = {n.input[0] for n in quantize if n.input[0].endswith(".weight")}
    assert len(weights) == linears  # every token layer's weight, per output row
    # and the activations: layers reading the same tensor (q, k, v) share one Q/DQ after CSE
    assert len(quantize) - len(weights) >= 2 * len(dit.transformer_blocks) + len(
        dit.single_transformer_blocks)
    assert model.opset_import[0].version >= 21


def _twin_output(path, inputs) -> np.ndarray:
    session = ort.InferenceSession(
        float32_twin(onnx.load(str(path))).SerializeToString(),
        _no_fusion(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def _no_fusion():
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return options


def test_fp8_quantization_is_real_but_small(exported, model_dirs):
    info = load_model_info(model_dirs["dev"])
    inputs = sample_inputs("dit_transformer", info, CHECK_SIZES[1], seed=7)
    bf16 = _twin_output(onnx_paths(exported["BF16"][0])["dit_transformer"], inputs)
    fp8 = _twin_output(onnx_paths(exported["FP8"][0])["dit_transformer"], inputs)
    change = float(np.linalg.norm(fp8 - bf16) / np.linalg.norm(bf16))
    print(f"\nFP8 graph vs BF16 graph, DiT output: relative difference {change:.3f}")
    assert 1e-3 < change < 0.3


def test_a_wrong_weight_fails_the_check(exported, model_dirs, tmp_path):
    root = exported["BF16"][0]
    model = onnx.load(str(onnx_paths(root)["dit_transformer"]))
    weight = next(t for t in model.graph.initializer if len(t.dims) == 2
                  and t.data_type == onnx.TensorProto.BFLOAT16)
    array = numpy_helper.to_array(weight)
    weight.CopyFrom(numpy_helper.from_array((array.astype(np.float32) * 1.5).astype(array.dtype),
                                            weight.name))
    broken = tmp_path / "dit.onnx"
    onnx.save(model, str(broken))
    rows = check_component("dit_transformer", load_model_info(model_dirs["dev"]), broken, "BF16")
    assert not any(r.ok for r in rows)


def test_reduced_graphs_are_for_tensorrt_configs(model_dirs):
    rendered = render_repository(model_dirs["dev"], backend="tensorrt", device="gpu",
                                 onnx_precision="BF16")
    configs = rendered.texts
    assert "TYPE_BF16" in configs["dit_transformer"] and "TYPE_BF16" in configs["t5_encoder"]
    for vae in ("vae_decoder", "vae_encoder"):  # float32 graphs: TensorRT builds them tf32
        assert "TYPE_FP32" in configs[vae] and "TYPE_BF16" not in configs[vae], vae
    types = rendered.options["flux_bls"].component_dtypes
    assert types["vae_decoder"] == types["vae_encoder"] == "FP32" and types["dit_transformer"] == "BF16"
    with pytest.raises(ValueError, match="TensorRT"):
        render_repository(model_dirs["dev"], backend="onnx", onnx_precision="FP8")


class _Flags(IntEnum):
    FP16 = 0
    BF16 = 1
    TF32 = 2
    WEIGHT_STREAMING = 3
    REFIT_IDENTICAL = 4


class RecordingTensorRT:
    """Enough of the tensorrt module for build_plan, recording what it is asked."""

    BuilderFlag = _Flags

    class NetworkDefinitionCreationFlag(IntEnum):
        STRONGLY_TYPED = 5

    class MemoryPoolType(IntEnum):
        WORKSPACE = 0

    class Logger:
        WARNING = 2

        def __init__(self, level):
            self.level = level

    def __init__(self):
        self.calls: list[tuple] = []
        trt = self

        class Profile:
            def set_shape(self, name, low, opt, high):
                trt.calls.append(("profile", name, low, opt, high))

        class Cache:
            def serialize(self):
                return b"timing"

        class Config:
            builder_optimization_level = None

            def set_memory_pool_limit(self, pool, size):
                trt.calls.append(("workspace", size))

            def set_flag(self, flag):
                trt.calls.append(("set", flag.name))

            def clear_flag(self, flag):
                trt.calls.append(("clear", flag.name))

            def create_timing_cache(self, data):
                trt.calls.append(("timing_cache_in", data))
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

            def add_optimization_profile(self, profile):
                trt.calls.append(("add_profile",))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                trt.calls.append(("network_flags", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                trt.calls.append(("build",))
                return b"plan"

        class OnnxParser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                trt.calls.append(("parse", path))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.mark.fast
@pytest.mark.parametrize("onnx_precision", ["FP32", "BF16", "FP8"])
def test_tensorrt_build_settings(model_dirs, tmp_path, onnx_precision):
    info = load_model_info(model_dirs["dev"])
    config = load_engine_config(info)
    specs = component_specs(info)
    asked = {}
    for name in NETWORKS:
        trt = RecordingTensorRT()
        build_plan(tmp_path / f"{name}.onnx", tmp_path / name / "model.plan", specs[name], config,
                   tmp_path / "timing.cache", onnx_precision, trt=trt)
        asked[name] = trt.calls
        assert (tmp_path / name / "model.plan").read_bytes() == b"plan"
        profiles = {c[1]: c[2:] for c in trt.calls if c[0] == "profile"}
        assert profiles == {k: v for k, v in config.profile(specs[name]).items()}
    strongly = 1 << RecordingTensorRT.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    for name, calls in asked.items():
        flags = dict(c for c in calls if c[0] == "network_flags")["network_flags"]
        set_flags = {c[1] for c in calls if c[0] == "set"}
        if onnx_precision == "FP32":  # precision from builder flags, as engine_config.json says
            assert flags == 0
            expected = {"FP16": {"FP16"}, "BF16": {"BF16"}}.get(config.precision[name], set())
            assert set_flags == expected, name
        else:  # types from the graph
            assert flags == strongly and not set_flags & {"FP16", "BF16"}, name
    assert (tmp_path / "timing.cache").read_bytes() == b"timing"
    assert ("timing_cache_in", b"timing") in asked["vae_decoder"]  # each build reuses the cache
    # the VAE encoder is built as the decoder, over the same images and latents
    assert ([c for c in asked["vae_encoder"] if c[0] in ("set", "clear")]
            == [c for c in asked["vae_decoder"] if c[0] in ("set", "clear")])
    encoder = {c[1]: c[2:] for c in asked["vae_encoder"] if c[0] == "profile"}
    decoder = {c[1]: c[2:] for c in asked["vae_decoder"] if c[0] == "profile"}
    assert encoder["noise"] == decoder["latents"]
    scale = info.vae_scale_factor
    assert encoder["image"] == tuple((b, 3, h * scale, w * scale) for b, _, h, w in decoder["latents"])


@pytest.mark.fast
def test_engine_config_names_every_network_and_kontext_doubles_image_tokens(model_dirs, kontext_dir,
                                                                            tmp_path):
    """A config without a precision for each network is refused before any build; a Kontext
    model's DiT profile takes the reference image's tokens too (twice the image tokens)."""
    from flux_triton.export.profiles import ENGINE_CONFIG

    info = load_model_info(model_dirs["dev"])
    raw = json.loads(ENGINE_CONFIG.read_text())
    assert set(raw["precision"]) == set(ALL_NETWORKS)
    del raw["precision"]["vae_encoder"]
    partial = tmp_path / "engine_config.json"
    partial.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="vae_encoder"):
        load_engine_config(info, partial)

    kontext = load_model_info(kontext_dir)
    plain, edits = load_engine_config(info), load_engine_config(kontext)
    tokens = plain.axes["S_img"]
    assert edits.axes["S_img"] == AxisRange(tokens.min, 2 * tokens.opt, 2 * tokens.max)
    assert {k: v for k, v in edits.axes.items() if k != "S_img"} == {
        k: v for k, v in plain.axes.items() if k != "S_img"}
    assert edits.profile(component_specs(kontext)["dit_transformer"])["img_ids"][2] == (2 * tokens.max, 3)
    # a TensorRT deployment's limits are its plans' ranges (FLUX.2's reference count aside)
    limits = plain.serving_limits(ServingLimits(max_height=4096, max_batch=2), info)
    assert (limits.max_height, limits.max_width, limits.max_batch) == (1344, 1344, 2)
    assert limits.max_reference_images == ServingLimits().max_reference_images


@pytest.mark.fast
def test_fp8_needs_an_fp8_graph_and_weight_options_are_flags(model_dirs, tmp_path):
    import dataclasses

    info = load_model_info(model_dirs["dev"])
    config = load_engine_config(info)
    spec = component_specs(info)["dit_transformer"]
    fp8 = dataclasses.replace(config, precision=dict(config.precision, dit_transformer="FP8"))
    with pytest.raises(EngineBuildError, match="ONNX_PRECISION=FP8"):
        build_plan(tmp_path / "dit.onnx", tmp_path / "dit.plan", spec, fp8, tmp_path / "cache",
                   "FP32", trt=RecordingTensorRT())
    streaming = dataclasses.replace(config, weight_streaming=True, refit=True)
    trt = RecordingTensorRT()
    build_plan(tmp_path / "dit.onnx", tmp_path / "dit.plan", spec, streaming, tmp_path / "cache",
               "FP8", trt=trt)
    assert {("set", "WEIGHT_STREAMING"), ("set", "REFIT_IDENTICAL")} <= set(trt.calls)


def test_export_refuses_an_unknown_precision(model_dirs, tmp_path):
    with pytest.raises(ExportError, match="ONNX precision"):
        export_all(model_dirs["dev"], {}, tmp_path / "r.json", "INT4")


def test_bf16_reference_uses_the_bf16_weights(model_dirs):
    """The parity reference is the bf16 model computing in float32: its weights are bf16 values."""
    from flux_triton.export.onnx_export import reference_module

    info = load_model_info(model_dirs["dev"])
    module = reference_module("t5_encoder", info, "BF16", dtype="float32")
    weight = next(p for p in module.parameters() if p.dim() == 2)
    assert weight.dtype == torch.float32
    assert torch.equal(weight, weight.to(torch.bfloat16).float())


class _FusedRmsNorm(torch.nn.Module):
    """What RMSNorm becomes when torch 2.11 traces it on a GPU: `aten._fused_rms_norm`."""

    def __init__(self, width: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], self.weight.to(x.dtype), 1e-6)[0]


@pytest.mark.fast
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_translation_matches_torch(dtype, tmp_path):
    """The exporter writes aten._fused_rms_norm through `flux_triton.export.translations` (torch 2.11 has no
    translation of its own), and onnxruntime computes what torch computes."""
    from flux_triton.export.translations import TRANSLATIONS

    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(0)) * 3
    module = _FusedRmsNorm(64).eval()
    program = torch.onnx.export(module, (x,), dynamo=True, custom_translation_table=TRANSLATIONS)
    path = tmp_path / "rms.onnx"
    program.save(str(path))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"ReduceMean", "Reciprocal", "Sqrt"} <= ops and "Pow" not in ops  # ours squares by Mul
    if dtype is torch.float32:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    else:  # onnxruntime's CPU provider has no bf16 kernels: run the float32 twin of a bf16 trace
        program = torch.onnx.export(module.to(dtype), (x.to(dtype),), dynamo=True,
                                    custom_translation_table=TRANSLATIONS)
        program.save(str(path))
        twin = float32_twin(onnx.load(str(path)))
        session = ort.InferenceSession(twin.SerializeToString(), providers=["CPUExecutionProvider"])
        got = session.run(None, {session.get_inputs()[0].name: x.to(dtype).float().numpy()})[0]
    with torch.no_grad():
        expected = module(x.to(dtype)).float().numpy()
    bound = 1e-5 if dtype is torch.float32 else 2e-2  # bf16: one rounding of the output
    np.testing.assert_allclose(got, expected, rtol=bound, atol=bound)


def test_exported_weights_are_the_modules_own(model_dirs):
    """The export's optimizer keeps every Linear weight as the module holds it (no transposed copy:
    on a GPU that copy is host memory, 24 GB for the DiT) and runs without SlicesSplit (quadratic in
    the graph's size); the graph still has no SplitToSequence, which the checker rejects in bf16."""
    from onnxscript.rewriter.rules.common import slice_split_rule

    from flux_triton.export.graph_optimizer import rewrite_rules
    from flux_triton.export.onnx_export import export_program, reference_module

    assert slice_split_rule not in rewrite_rules() and len(rewrite_rules()) > 30
    info = load_model_info(model_dirs["dev"])
    module = reference_module("dit_transformer", info, "BF16")
    program = export_program("dit_transformer", info, module, "BF16")
    params = {f"component.{name}": tuple(p.shape) for name, p in module.named_parameters()}
    weights = {v.name: tuple(v.shape) for v in program.model.graph.initializers.values()
               if len(v.shape) == 2 and v.name.endswith(".weight")}
    assert len(weights) >= 30 and all(params.get(name) == shape for name, shape in weights.items())
    ops = {node.op_type for node in program.model.graph}
    assert "Transpose" in ops and "SplitToSequence" not in ops and "SequenceAt" not in ops
