"""Write the serving model repository for a FLUX model folder (`make export`).

Backends of the five networks (CLIP, T5, DiT, VAE decoder and encoder): `torch` (Python models
running PyTorch), `onnx` (Python models running the exported graphs with onnxruntime) or `tensorrt`
(`tensorrt_plan` models). The tokenizer, the `encode_prompt` ensemble and `flux_bls` are the same
for all three.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from flux_triton.export.onnx_export import ONNX_PRECISIONS, ExportError, export_all, io_type, onnx_paths
from flux_triton.export.pbtxt import ensemble_config, python_model_config, tensorrt_model_config
from flux_triton.export.previews import fit_preview_projection
from flux_triton.loras import read_catalog
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.placement import (
    copied_network,
    network_copy_name,
    networks_by_gpu,
    parse_gpus,
    sequence_parallel_groups,
)
from flux_triton.preview import PreviewProjection
from flux_triton.runtime.acceleration import Acceleration, compile_cache_location
from flux_triton.runtime.torch_components import RANDOM_WEIGHTS_MARKER, has_random_weights, load_component
from flux_triton.server.launcher import gpu_ids
from flux_triton.serving_config import (
    DEFAULT_MAX_INFLIGHT,
    FP8_CALIBRATION_FILE,
    FP8_SCALES,
    BlsOptions,
    ConfigError,
    ModelDeployment,
    NetworkOptions,
    RepositoryConfig,
    RetryPolicy,
    ServingLimits,
    options_parameter,
    parse_queue_limit,
)
from flux_triton.specs import (
    ADAPTED_NETWORKS,
    ALL_NETWORKS,
    IO_DTYPES,
    PRECISIONS,
    ServingShape,
    bls_spec,
    component_specs,
    default_serving_shapes,
    networks,
    probed,
    python_model_spec,
)

SOURCE_REPOSITORY = Path(__file__).resolve().parents[2] / "model_repository"
BACKENDS = ("torch", "onnx", "tensorrt")
ARTIFACTS = {"onnx": "model.onnx", "tensorrt": "model.plan"}
# Compiled kernels (inductor, Triton) live beside the repository, not in it: tritonserver would take a
# folder inside it for a model.
COMPILE_CACHE_SUFFIX = ".compile_cache"
FLUX2_ENCODE_STEPS = [
    ("tokenizer", {"prompt": "prompt", "max_sequence_length": "max_sequence_length"},
     {"input_ids": "input_ids", "attention_mask": "attention_mask"}),
    ("text_encoder", {"input_ids": "input_ids", "attention_mask": "attention_mask"},
     {"prompt_embeds": "prompt_embeds"}),
]
ENCODE_STEPS = [
    ("tokenizer",
     {"prompt": "prompt", "prompt_2": "prompt_2", "max_sequence_length": "max_sequence_length"},
     {"clip_input_ids": "clip_input_ids", "t5_input_ids": "t5_input_ids"}),
    ("clip_encoder", {"input_ids": "clip_input_ids"}, {"pooled_prompt_embeds": "pooled_prompt_embeds"}),
    ("t5_encoder", {"input_ids": "t5_input_ids"}, {"prompt_embeds": "prompt_embeds"}),
]


def preview_projection(info: FluxModelInfo) -> PreviewProjection:
    """Fit the latent -> RGB preview map to this model's VAE (once, at export); FLUX.2's to its
    patched, normalised latents (one preview pixel per 16x16 block)."""
    if info.is_flux2:
        encoder = load_component("vae_encoder", info)
        return fit_preview_projection(lambda images: encoder(images)["latents"],
                                      info.vae_scale_factor * 2, 1.0, 0.0, size=8)
    vae = load_component("vae_decoder", info).model
    return fit_preview_projection(
        lambda images: vae.encode(images).latent_dist.mean, info.vae_scale_factor,
        info.vae_scaling_factor, info.vae_shift_factor,
    )


def count_gpus() -> int:
    """The GPUs of this machine, for GPUS=all: torch's count when it sees any, else the GPUs
    `nvidia-smi -L` lists (the launcher's `gpu_ids`)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch, or a CUDA runtime that cannot start here
        count = 0
    count = count or len(gpu_ids())
    if not count:
        raise ValueError("GPUS=all: neither torch nor nvidia-smi finds a GPU here; list the GPU ids "
                         "instead, e.g. GPUS=0,1")
    return count


def gpu_acceleration(info: FluxModelInfo, accelerated: bool, compile: bool | None,
                     cuda_graphs: bool | None, warmup: tuple[ServingShape, ...] | None,
                     ) -> tuple[bool, bool, tuple[ServingShape, ...]]:
    """compile, cuda_graphs and the warm-up shapes with their defaults: compile and CUDA graphs on
    for the torch backend on a GPU (`accelerated`), off elsewhere; one image at the model's default
    size (and, for a Kontext model, the same with a reference image) prepared at load when either
    is on."""
    compile = accelerated if compile is None else compile and accelerated
    cuda_graphs = compile if cuda_graphs is None else cuda_graphs and accelerated
    if warmup is None:
        warmup = default_serving_shapes(info) if compile or cuda_graphs else ()
    return compile, cuda_graphs, warmup


def compile_cache_parameter(repository: str | Path) -> str:
    """The served networks' compile_cache_dir: a folder beside the repository (inside it,
    tritonserver would take the folder for a model), relative so the two move together."""
    return f"../{Path(repository).resolve().name}{COMPILE_CACHE_SUFFIX}"


def lora_folder(info: FluxModelInfo, lora_dir: str | Path | None, backend: str,
                repository: str | Path) -> str | None:
    """The `lora_dir` option: the folder of LoRA adapters, relative to the repository (like
    model_dir), or None where adapters are not served. The torch backend serves them (merged into
    the weights under compile, CUDA graphs and FP8); the ONNX and TensorRT backends serve the
    folder's own weights alone (a request naming an adapter is refused)."""
    folder = Path(lora_dir) if lora_dir is not None else Path(info.model_dir) / "loras"
    if backend != "torch":
        adapters = read_catalog(folder).names
        if adapters:
            print(f"LoRA adapters in {folder} are not served with the {backend} backend: {adapters}")
        return None
    return os.path.relpath(folder.resolve(), Path(repository).resolve())


@dataclass(frozen=True)
class RenderedRepository:
    """What `make export` writes for a model folder: how Triton runs each model, the options of
    each Python model, and the config.pbtxt texts rendered from both."""

    deployment: RepositoryConfig
    options: dict[str, NetworkOptions | BlsOptions]
    texts: dict[str, str]


def render_repository(
    model_dir: str | Path,
    backend: str = "torch",
    device: str = "cpu",
    precision: str = "FP32",
    limits: ServingLimits | None = None,
    retry: RetryPolicy | None = None,
    compile: bool | None = None,
    cuda_graphs: bool | None = None,
    warmup: tuple[ServingShape, ...] | None = None,
    batch_delay_us: int = 0,
    onnx_precision: str = "FP32",
    gpus: str | None = None,
    max_inflight: int = DEFAULT_MAX_INFLIGHT,
    max_queue: int | None = None,
    random_weights: bool = False,
    lora_dir: str | Path | None = None,
    repository: str | Path = SOURCE_REPOSITORY,
    sequence_parallel: int = 1,
    fp8_scales: str = "dynamic",
    fuse_qkv: bool = False,
) -> RenderedRepository:
    """Every served model of `model_dir`, by name.

    `model_dir` is written relative to `repository`, so the repository and its model folder can
    move together; `$FLUX_TRITON_MODEL_DIR` at serve time points a moved repository elsewhere.
    On a GPU with the torch backend, `compile` (default on) compiles the DiT's blocks, the VAE
    decoder and T5 at load, `cuda_graphs` (default: as compile) replays the DiT as CUDA graphs, and
    `warmup` (default: one image at the model's default size) lists the shapes prepared at load;
    compiled kernels are cached in `<repository>.compile_cache` beside it across restarts.
    `gpus` (GPUS: `all` or ids such as `0,1`) gives each listed GPU its own copy of the networks
    and a `flux_bls` instance that calls them (`flux_triton.placement`); unset, every GPU model's
    instances go on every GPU the server sees. A folder without weights (random_weights.json) is
    served only with `random_weights`, and then says so everywhere. `lora_dir` (LORA_DIR; default
    `<model folder>/loras`) holds the LoRA adapters requests may name, served by the torch backend
    (`lora_folder`). `sequence_parallel` N > 1 (SEQUENCE_PARALLEL) runs each DiT over N devices
    (`runtime.sequence_parallel`): on a GPU the GPUs (GPUS, default all) in groups of N, each
    group's first GPU holding the other networks and a flux_bls instance; on the CPU N ranks.
    `fp8_scales` (FP8_SCALES, with FP8): `static` gives the DiT's float8 layers the input scales
    the export calibrates into the repository's FP8_CALIBRATION_FILE (`export.calibration`).
    `fuse_qkv` (FUSE_QKV, torch backend): the DiT computes each attention's query, key and value
    in one Linear layer (`runtime.acceleration.fuse_qkv`).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "tensorrt" and (device != "gpu" or precision != "FP32"):
        raise ValueError("TensorRT plans run on the GPU; their types come from the graphs "
                         "(ONNX_PRECISION) and flux_triton/export/engine_config.json, not from PRECISION")
    if onnx_precision != "FP32" and backend != "tensorrt":
        raise ValueError(f"ONNX_PRECISION={onnx_precision} graphs are for TensorRT (BACKEND=tensorrt): "
                         "onnxruntime's CPU provider has no bf16 or float8 kernels to serve them")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    accelerated = device == "gpu" and backend == "torch"
    if precision == "FP8" and not accelerated:
        raise ValueError("FP8 (float8 Linear layers through torchao) needs the torch backend on a GPU: "
                         "make export DEVICE=gpu BACKEND=torch PRECISION=FP8")
    if fp8_scales not in FP8_SCALES:
        raise ValueError(f"FP8_SCALES must be one of {FP8_SCALES}, got {fp8_scales!r}")
    if fp8_scales == "static" and precision != "FP8":
        raise ValueError(f"FP8_SCALES=static sets the scales of the DiT's float8 layers: export with "
                         f"PRECISION=FP8 (got {precision})")
    if fuse_qkv and (backend != "torch" or sequence_parallel != 1):
        raise ValueError("FUSE_QKV=1 fuses the projections of a DiT that PyTorch runs on one device: "
                         f"export with BACKEND=torch and without SEQUENCE_PARALLEL (got {backend}, "
                         f"SEQUENCE_PARALLEL={sequence_parallel})")
    placement = None
    if gpus is not None:
        if device != "gpu":
            raise ValueError("GPUS places the models on GPUs: export with DEVICE=gpu (or BACKEND=tensorrt)")
        placement = parse_gpus(gpus, count_gpus)
    info = load_model_info(model_dir)
    groups: dict[int | None, tuple[str, ...]] = {}  # a DiT copy's GPU (None: the one DiT) -> devices
    if sequence_parallel != 1:
        from flux_triton.runtime.sequence_parallel import check_group

        check_group(info, sequence_parallel)
        if backend != "torch":
            raise ValueError(f"SEQUENCE_PARALLEL={sequence_parallel} runs the DiT with PyTorch: "
                             "export with BACKEND=torch")
        if device == "gpu":
            grouped = sequence_parallel_groups(placement or parse_gpus("all", count_gpus),
                                               sequence_parallel)
            placement = tuple(group[0] for group in grouped)
            groups = {group[0]: tuple(f"cuda:{gpu}" for gpu in group) for group in grouped}
        else:
            groups = {None: ("cpu",) * sequence_parallel}
    if has_random_weights(info.model_dir) != random_weights:
        raise ValueError(
            f"{info.model_dir} holds no weights, only configs ({RANDOM_WEIGHTS_MARKER}): export with "
            "RANDOM_WEIGHTS=1 to serve random weights (benchmarks), or point MODEL_DIR at a folder "
            "with weights" if not random_weights else
            f"RANDOM_WEIGHTS=1, but {info.model_dir} has weights: leave RANDOM_WEIGHTS unset")
    compile, cuda_graphs, warmup = gpu_acceleration(info, accelerated, compile, cuda_graphs, warmup)
    limits = limits or ServingLimits()
    if backend == "tensorrt":
        from flux_triton.export.profiles import load_engine_config

        limits = load_engine_config(info).serving_limits(limits, info)
    specs = component_specs(info, precision)
    kind = "KIND_GPU" if device == "gpu" else "KIND_CPU"
    model_dir_option = os.path.relpath(info.model_dir, Path(repository).resolve())
    lora_option = None if info.is_flux2 else lora_folder(info, lora_dir, backend, repository)
    if groups and lora_option is not None:
        adapters = read_catalog(Path(repository).resolve() / lora_option).names
        if adapters:
            print(f"LoRA adapters are not served with SEQUENCE_PARALLEL={sequence_parallel}: {adapters}")
        lora_option = None
    served = networks(info)
    # Triton's own parameter: GPU tensors reach a GPU model as they are (no copy to the host)
    on_device = {"FORCE_CPU_ONLY_INPUT_TENSORS": "no"} if device == "gpu" else {}
    deployments: list[ModelDeployment] = []
    options: dict[str, NetworkOptions | BlsOptions] = {}
    texts: dict[str, str] = {}

    def python_model(spec, deployment: ModelDeployment, model_options) -> None:
        deployments.append(deployment)
        options[spec.name] = model_options
        texts[spec.name] = python_model_config(
            spec, deployment, {**on_device, **options_parameter(model_options)})

    python_model(probed(specs["tokenizer"]), ModelDeployment("tokenizer", "python"),
                 NetworkOptions("tokenizer", model_dir_option, precision))  # Python whatever the backend
    network_options = {} if backend == "tensorrt" else {name: NetworkOptions(
        name, model_dir_option, precision, backend, compile=compile, cuda_graphs=cuda_graphs,
        warmup=tuple(map(str, warmup)) if accelerated else (),
        compile_cache_dir=compile_cache_parameter(repository) if accelerated else None,
        lora_dir=lora_option if name in ADAPTED_NETWORKS else None, random_weights=random_weights,
        fp8_calibration=FP8_CALIBRATION_FILE if fp8_scales == "static" and name == "dit_transformer"
        else None, fuse_qkv=fuse_qkv and name == "dit_transformer")
        for name in served}
    component_types = {}
    for name in served:
        if backend == "tensorrt":  # each plan takes and gives the types of its graph
            component_types[name] = io_type(name, onnx_precision)
            spec = component_specs(info, component_types[name])[name]
        else:
            component_types[name] = IO_DTYPES[precision]
            spec = specs[name]
        # One model for every GPU, or (GPUS) one copy pinned to each listed GPU.
        for gpu in placement or (None,):
            copy = spec if gpu is None else replace(spec, name=network_copy_name(name, gpu, placement))
            pinned = None if gpu is None else (gpu,)
            if backend == "tensorrt":
                deployment = ModelDeployment(copy.name, "tensorrt_plan", "KIND_GPU", pinned)
                deployments.append(deployment)
                texts[copy.name] = tensorrt_model_config(copy, deployment)
            else:
                copy_options = network_options[name]
                if name == "dit_transformer" and groups:
                    copy_options = replace(copy_options, sequence_parallel_devices=groups[gpu])
                python_model(python_model_spec(copy, name, info, step_cache=backend == "torch"),
                             ModelDeployment(copy.name, "python", kind, pinned), copy_options)
    deployments.append(ModelDeployment("encode_prompt", "ensemble"))
    texts["encode_prompt"] = ensemble_config(specs["encode_prompt"],
                                             FLUX2_ENCODE_STEPS if info.is_flux2 else ENCODE_STEPS)
    bls_options = BlsOptions(
        model_dir=model_dir_option, precision=precision, backend=backend, lora_dir=lora_option,
        limits=limits, retry=retry or RetryPolicy(),
        batch_delay_us=int(batch_delay_us), component_dtypes=component_types,
        max_inflight=max_inflight, max_queue=max_queue,
        # each instance calls the networks on its own GPU
        networks_by_gpu=None if placement is None else networks_by_gpu(placement, served),
        preview_projection=preview_projection(info).to_json(),
        # what a client needs to decode a preview latent with the vae_decoder model itself
        vae_scaling_factor=info.vae_scaling_factor, vae_shift_factor=info.vae_shift_factor,
        random_weights=random_weights)
    python_model(bls_spec(info), ModelDeployment("flux_bls", "python", kind, placement, decoupled=True),
                 bls_options)
    return RenderedRepository(RepositoryConfig(tuple(deployments), random_weights), options, texts)


def build_network_artifacts(model_dir: Path, dest: Path, backend: str, onnx_dir: Path,
                            onnx_precision: str = "FP32") -> None:
    """ONNX graphs (checked against PyTorch) for `onnx`; plus TensorRT plans for `tensorrt`."""
    info = load_model_info(model_dir)
    if backend == "tensorrt":
        targets = onnx_paths(onnx_dir, info)
        onnx_dir.mkdir(parents=True, exist_ok=True)
    else:
        targets = {name: dest / name / "1" / ARTIFACTS["onnx"] for name in networks(info)}
    export_all(model_dir, targets, (onnx_dir if backend == "tensorrt" else dest) / "export_report.json",
               onnx_precision)
    if backend == "tensorrt":
        from flux_triton.export.profiles import load_engine_config
        from flux_triton.export.tensorrt_build import build_plan

        config = load_engine_config(info)
        specs = component_specs(info)
        for name in targets:
            seconds = build_plan(targets[name], dest / name / "1" / ARTIFACTS["tensorrt"], specs[name],
                                 config, onnx_dir / "timing.cache", onnx_precision)
            print(f"{name}: TensorRT plan ({onnx_precision} graph, {config.precision[name]}) built "
                  f"in {seconds:.1f} s")


def network_copies(dest: Path) -> list[Path]:
    """The per-GPU copies (`<network>_gpu<k>/`) in a repository."""
    return sorted(path for path in dest.glob("*_gpu*") if path.is_dir() and copied_network(path.name))


def share_artifacts(dest: Path, backend: str, models: list[str]) -> None:
    """Give each per-GPU copy among `models` its network's ONNX graph or TensorRT plan (hard links
    where the file system allows: one build serves every GPU of a host)."""
    if backend not in ARTIFACTS:
        return
    for model in models:
        network = copied_network(model)
        if network is None:
            continue
        for source in (dest / network / "1").glob(f"{ARTIFACTS[backend]}*"):
            target = dest / model / "1" / source.name
            target.unlink(missing_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)


def other_backend_artifacts(dest: Path, backend: str) -> list[Path]:
    """ONNX graphs and TensorRT plans in `dest` that the `backend` being exported does not use
    (those of per-GPU copies are links to the networks' own)."""
    return sorted(path for other, artifact in ARTIFACTS.items() if other != backend
                  for path in dest.glob(f"*/1/{artifact}*") if not copied_network(path.parent.parent.name))


def write_repository(
    model_dir: str | Path,
    dest: str | Path,
    backend: str = "torch",
    onnx_dir: str | Path = "build/onnx",
    precompile: bool = True,
    calibration_prompts: str | Path | None = None,
    **options,
) -> Path:
    """Render every config.pbtxt into `dest` (copying the model code there if `dest` is elsewhere)
    and produce the backend's artifacts (ONNX graphs or TensorRT plans) beside them. A compiled
    GPU repository also gets its compile cache filled here (`precompile`, see export.precompile),
    and with FP8_SCALES=static the DiT's calibration (on `calibration_prompts`, a file of one per
    line; default `export.calibration.DEFAULT_PROMPTS`)."""
    if backend == "tensorrt":
        from flux_triton.export.tensorrt_build import require_tensorrt

        require_tensorrt()  # fail fast, before the long ONNX export
    dest = Path(dest).resolve()
    rendered = render_repository(model_dir, backend=backend, repository=dest, **options)
    configs = rendered.texts
    for name in configs:
        version_dir = dest / name / "1"
        version_dir.mkdir(parents=True, exist_ok=True)
        source = copied_network(name) or name  # a per-GPU copy runs its network's model code
        source_code = SOURCE_REPOSITORY / source / "1" / "model.py"
        if (dest != SOURCE_REPOSITORY or source != name) and source_code.exists():
            shutil.copy2(source_code, version_dir / "model.py")
    for path in other_backend_artifacts(dest, backend):  # never deleted: plans take long to rebuild
        size_gb = path.stat().st_size / 1e9
        print(f"kept {path.relative_to(dest)} ({size_gb:.2f} GB): unused by the {backend} backend; "
              "delete it yourself if you no longer need it")
    if backend != "torch":
        build_network_artifacts(Path(model_dir), dest, backend, Path(onnx_dir).resolve(),
                                options.get("onnx_precision", "FP32"))
        share_artifacts(dest, backend, list(configs))
    if options.get("fp8_scales") == "static":  # what the DiT loads (and the precompile compiles) with
        calibrate(model_dir, dest, calibration_prompts)
    # Configs last: a failed export leaves no half repository. Copies for GPUs no longer listed go
    # (their artifacts are links to the networks' own), so the server cannot load them.
    for stale in network_copies(dest):
        if stale.name not in configs:
            shutil.rmtree(stale)
    # the other family's models (FLUX.1's CLIP and T5, FLUX.2's text encoder) keep their code
    # but not a config from an earlier export
    for name in ALL_NETWORKS:
        if name not in configs:
            (dest / name / "config.pbtxt").unlink(missing_ok=True)
    for name, text in configs.items():
        (dest / name / "config.pbtxt").write_text(text)
    rendered.deployment.write(dest)
    if precompile and backend == "torch" and options.get("device") == "gpu":
        fill_compile_cache(model_dir, dest, options)
    return dest


def calibrate(model_dir: str | Path, dest: Path, prompts_file: str | Path | None) -> Path:
    """Write the DiT's static FP8 scales into `dest` (`export.calibration`), on the first GPU."""
    import gc

    import torch

    from flux_triton.export.calibration import read_prompts, write_dit_calibration

    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    path = write_dit_calibration(load_model_info(model_dir), dest, device, read_prompts(prompts_file))
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path


def fill_compile_cache(model_dir: str | Path, dest: Path, options: dict) -> dict:
    """Compile every network as the repository's configs ask, on each GPU they run on, into the
    cache the server reads (nothing to do when compile is off)."""
    import torch

    from flux_triton.export.precompile import precompile

    info = load_model_info(model_dir)
    compile, cuda_graphs, warmup = gpu_acceleration(
        info, True, options.get("compile"), options.get("cuda_graphs"), options.get("warmup"))
    if not (compile and warmup):
        return {}
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = options.get("gpus")
    listed = parse_gpus(gpus, lambda: present) if gpus is not None and present else tuple(range(present))
    missing = [gpu for gpu in listed if gpu >= present]
    if missing or not present:
        what = f"GPU {','.join(map(str, missing))} is not here" if missing else "torch sees no GPU here"
        print(f"compile cache not filled: {what}; the server compiles at its first start instead")
        return {}
    cache_dir = compile_cache_location(dest, compile_cache_parameter(dest))  # as the server finds it
    calibration = str(dest / FP8_CALIBRATION_FILE) if options.get("fp8_scales") == "static" else None
    acceleration = Acceleration(options.get("precision", "FP32"), compile=compile,
                                cuda_graphs=cuda_graphs, cache_dir=cache_dir,
                                fp8_calibration=calibration, fuse_qkv=bool(options.get("fuse_qkv")))
    return precompile(info, acceleration, warmup, listed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/tiny-flux-schnell")
    parser.add_argument("--repository", default=str(SOURCE_REPOSITORY))
    parser.add_argument("--backend", default="torch", choices=BACKENDS)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--precision", default="FP32", choices=PRECISIONS,
                        help="FP8: the DiT's Linear layers in float8 (torch backend on a GPU)")
    parser.add_argument("--onnx-dir", default="build/onnx", help="ONNX graphs for TensorRT builds")
    parser.add_argument("--compile", type=int, choices=[0, 1], default=None,
                        help="torch.compile DiT, VAE decoder and T5 at load (default 1 on a GPU)")
    parser.add_argument("--cuda-graphs", type=int, choices=[0, 1], default=None,
                        help="replay the DiT as CUDA graphs (default: as --compile)")
    parser.add_argument("--onnx-precision", default="FP32", choices=ONNX_PRECISIONS,
                        help="graphs for TensorRT: BF16 (bf16 weights, VAE float32) or FP8 (BF16 plus "
                             "float8 Q/DQ on the DiT's Linear layers), built strongly typed")
    parser.add_argument("--batch-delay-us", type=int, default=0,
                        help="share DiT calls between concurrent requests, holding a call up to this "
                             "long for others once the DiT is free (0: off; batched kernels round "
                             "differently)")
    parser.add_argument("--warmup", default=None,
                        help="shapes prepared at load, BxHxWxS[,...] (default: the model's default)")
    parser.add_argument("--precompile", type=int, choices=[0, 1], default=1,
                        help="compiled GPU repository: compile every network here, one at a time, "
                             "into its compile cache (default 1; 0 leaves it to the server's start)")
    parser.add_argument("--gpus", default=None,
                        help="GPUS: `all` or ids such as 0,1: a copy of each network and a flux_bls "
                             "instance on each listed GPU (default: every model's instances on every GPU)")
    parser.add_argument("--random-weights", type=int, choices=[0, 1], default=0,
                        help="1: serve a folder that has configs and no weights (random_weights.json) "
                             "with random weights, for benchmarks")
    parser.add_argument("--sequence-parallel", type=int, default=1,
                        help="SEQUENCE_PARALLEL=N: each DiT runs over N GPUs (with GPUS: groups of "
                             "N), its sequence split between them; on the CPU over N processes")
    parser.add_argument("--lora-dir", default=None,
                        help="LORA_DIR: the LoRA adapters requests may name (default <model folder>/loras)")
    parser.add_argument("--max-loras", type=int, default=ServingLimits.max_loras,
                        help="MAX_LORAS: the most adapters one request may combine")
    parser.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT,
                        help="MAX_INFLIGHT: generations one flux_bls instance (one GPU) runs at once; "
                             "the others wait in line")
    parser.add_argument("--max-queue", default=None,
                        help="MAX_QUEUE: requests that may wait on the whole server; past it one is "
                             "refused at once (default: no bound)")
    parser.add_argument("--fp8-scales", default="dynamic", choices=FP8_SCALES,
                        help="FP8_SCALES with PRECISION=FP8: `static` calibrates one input scale per "
                             "float8 layer of the DiT at export (instead of per-row maxima at every "
                             "call)")
    parser.add_argument("--fuse-qkv", type=int, choices=[0, 1], default=0,
                        help="FUSE_QKV=1: the DiT computes query, key and value in one Linear layer "
                             "per attention (torch backend)")
    parser.add_argument("--calibration-prompts", default=None,
                        help="CALIBRATION_PROMPTS: a file of prompts, one per line, for FP8_SCALES=static")
    parser.add_argument("--max-pixel-steps", type=int, default=ServingLimits.max_pixel_steps,
                        help="the most work one request may ask for: height × width × steps × images")
    args = parser.parse_args(argv)
    from flux_triton.export.tensorrt_build import EngineBuildError

    device = "gpu" if args.backend == "tensorrt" else args.device
    try:
        warmup = None if args.warmup is None else tuple(
            ServingShape.parse(s) for s in args.warmup.split(",") if s)
        dest = write_repository(
            args.model_dir, args.repository, backend=args.backend, onnx_dir=args.onnx_dir,
            precompile=bool(args.precompile),
            device=device, precision=args.precision, warmup=warmup,
            batch_delay_us=args.batch_delay_us, onnx_precision=args.onnx_precision, gpus=args.gpus,
            limits=ServingLimits(max_pixel_steps=args.max_pixel_steps, max_loras=args.max_loras),
            max_inflight=parse_queue_limit("MAX_INFLIGHT", str(args.max_inflight)),
            max_queue=None if args.max_queue is None else parse_queue_limit("MAX_QUEUE", args.max_queue),
            lora_dir=args.lora_dir, sequence_parallel=args.sequence_parallel,
            fp8_scales=args.fp8_scales, calibration_prompts=args.calibration_prompts,
            fuse_qkv=bool(args.fuse_qkv),
            random_weights=bool(args.random_weights),
            compile=None if args.compile is None else bool(args.compile),
            cuda_graphs=None if args.cuda_graphs is None else bool(args.cuda_graphs))
    except (ExportError, EngineBuildError, ValueError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    where = "" if args.gpus is None else f", GPUS={args.gpus}"
    print(f"model repository for {Path(args.model_dir).resolve()} ({args.backend}, {device}{where}, "
          f"{args.precision}) written to {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
