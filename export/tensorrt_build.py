"""ONNX -> TensorRT plans, with the optimization profiles and precisions of export/engine_config.json.

Runs only where the `tensorrt` Python package and a CUDA GPU exist; elsewhere it stops at once and
says what is missing. Nothing here pretends to have built a plan.
"""

from __future__ import annotations

import time
from pathlib import Path

from export.profiles import EngineConfig
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


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    spec: ComponentSpec,
    config: EngineConfig,
    timing_cache: Path,
) -> float:
    """Build one plan; return the build time in seconds."""
    trt = require_tensorrt()
    precision = config.precision[spec.name]
    if precision == "fp8":
        raise EngineBuildError(
            f"{spec.name}: fp8 needs an ONNX graph with Q/DQ nodes (e.g. from NVIDIA ModelOpt); "
            "this exporter writes FP32 graphs, so choose fp16, bf16 or tf32")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EngineBuildError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")

    build = builder.create_builder_config()
    build.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_gib << 30)
    build.builder_optimization_level = config.builder_optimization_level
    if precision == "fp16":
        build.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        build.set_flag(trt.BuilderFlag.BF16)
    elif precision == "fp32":
        build.clear_flag(trt.BuilderFlag.TF32)
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
