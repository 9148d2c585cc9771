"""ONNX -> TensorRT plans, with the optimization profiles and precisions of engine_config.json.

Runs only where the `tensorrt` Python package and a CUDA GPU exist; elsewhere it stops at once and
says what is missing. Nothing here pretends to have built a plan.
"""

from __future__ import annotations

import time
from pathlib import Path

from flux_triton.export.profiles import EngineConfig
from flux_triton.specs import ComponentSpec


class EngineBuildError(RuntimeError):
    """TensorRT is missing, or a build failed."""


def require_tensorrt():
    """The tensorrt module, or EngineBuildError naming what this machine lacks."""
    try:
        import tensorrt
    except ImportError:
        raise EngineBuildError(
            "TensorRT is not installed here: BACKEND=tensorrt needs the `tensorrt` Python package "
            "(10.x, e.g. `pip install tensorrt` or NVIDIA's TensorRT / Triton containers) and an "
            "NVIDIA GPU. Use BACKEND=onnx or BACKEND=torch on this machine."
        ) from None
    import torch

    if not torch.cuda.is_available():
        raise EngineBuildError("TensorRT is installed but no CUDA GPU is visible: plans are built "
                               "for the GPU that will run them")
    return tensorrt


STRONGLY_TYPED_GRAPHS = ("BF16", "FP8")  # ONNX precisions whose graphs carry their own types


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    spec: ComponentSpec,
    config: EngineConfig,
    timing_cache: Path,
    onnx_precision: str = "FP32",
    trt=None,
) -> float:
    """Build one plan; return the build time in seconds.

    FP32 graphs are built as before, with the component's precision from engine_config.json as
    builder flags (fp16, bf16, tf32). BF16 and FP8 graphs are built strongly typed, as NVIDIA
    builds its FLUX engines: every layer runs in the type the graph gives it (bf16, or float8 where
    Q/DQ pairs sit), no precision flags; a float32 graph among them (the VAE) keeps tf32 if asked.
    """
    trt = trt or require_tensorrt()
    precision = config.precision[spec.name]
    strongly_typed = onnx_precision in STRONGLY_TYPED_GRAPHS
    if precision == "FP8" and not strongly_typed:
        raise EngineBuildError(
            f"{spec.name}: FP8 needs an ONNX graph with float8 Q/DQ nodes: export with "
            "ONNX_PRECISION=FP8 (make engines ONNX_PRECISION=FP8)")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")

    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_gib << 30)
    build.builder_optimization_level = config.builder_optimization_level
    if strongly_typed:
        if precision != "TF32":
            build.clear_flag(trt.BuilderFlag.TF32)
        if config.weight_streaming:  # weights stay in host memory and stream in (strongly typed only)
            build.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    elif precision == "FP16":
        build.set_flag(trt.BuilderFlag.FP16)
    elif precision == "BF16":
        build.set_flag(trt.BuilderFlag.BF16)
    elif precision == "FP32":
        build.clear_flag(trt.BuilderFlag.TF32)
    if config.refit:  # the same plan can take new weights (e.g. a fine-tune) without a rebuild
        build.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)
    cache_bytes = timing_cache.read_bytes() if timing_cache.exists() else b""
    cache = build.create_timing_cache(cache_bytes)
    build.set_timing_cache(cache, ignore_mismatch=False)

    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in config.profile(spec).items():
        profile.set_shape(name, low, opt, high)
    build.add_optimization_profile(profile)

    began = time.perf_counter()
    plan = builder.build_serialized_network(network, build)
    if plan is None:
        raise EngineBuildError(f"{spec.name}: TensorRT build failed (see the log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(plan))
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    timing_cache.write_bytes(bytes(build.get_timing_cache().serialize()))
    return time.perf_counter() - began
