"""`make bench-gpu`: FLUX.1 (and FLUX.2: --variants flux2-klein-4b,flux2-klein-9b,flux2-dev) at
1024² on one GPU, (a) diffusers eager, (b) our pipeline in-process, (c) served by tritonserver and
streamed to the gRPC client, for BF16 and FP8 (and FP8-static: FP8 with the static input scales
of FP8_SCALES=static, calibrated on this folder first; a `+qkv` label adds FUSE_QKV=1).

FLUX.1's real architecture with random bf16 weights built on the device (`devtools.full_size`:
compute and memory are the real ones). (b) and (c) load the networks the same way
(`flux_triton.runtime.acceleration`: float8 for FP8, compiled DiT/VAE/T5, the DiT as CUDA graphs),
so (c)/(b) is the cost of serving. Cases run in the order given and are merged into one JSON file
(one row per variant/precision/batch, each with the card, driver and versions it ran on), so the
table can be filled a few cases per call:

    python -m devtools.bench_gpu --variants schnell --precisions BF16,FP8 --batches 1,4 \
        --out benchmarks/results/gpu-h100.json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from devtools.full_size import (
    SERVING,
    diffusers_flux2_pipeline,
    diffusers_pipeline,
    write_full_size_folder,
)
from devtools.shapes_accuracy import parse_label
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.pipeline import FinalImage, dit_inputs, generate
from flux_triton.request import validate_request
from flux_triton.runtime.acceleration import Acceleration
from flux_triton.runtime.in_process import TorchFluxModels
from flux_triton.runtime.torch_components import has_random_weights, load_component
from flux_triton.serving_config import COMPILE_CACHE_ENV, ServingLimits
from flux_triton.specs import ServingShape, components

PROMPT = "a red circle on a blue background"
SIZE = 1024


def print_server_problems(log: Path) -> None:
    """The last errors and warnings of a tritonserver log, to stderr."""
    problems = [line for line in log.read_text(errors="replace").splitlines()
                if line.startswith(("E", "W"))]
    if problems:
        print("\n".join(problems[-20:]), file=sys.stderr)


def environment() -> dict:
    """The card, driver and software a row was measured with."""
    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda}
    for package in ("diffusers", "torchao", "transformers", "triton", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30).stdout.split()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        driver = None
    return {"gpu": torch.cuda.get_device_name(0), "driver": driver, "versions": versions}


# The T5 text length of every request: each variant's default unless --text-length says otherwise.
TEXT_LENGTH: dict[str, int] = {v: d["default_max_sequence_length"] for v, d in SERVING.items()}
STEPS: dict[str, int] = {}  # --steps: every variant's steps instead of its default


def request_fields(variant: str, batch: int) -> dict:
    defaults = SERVING[variant]
    return dict(prompt=PROMPT, num_images_per_prompt=batch, height=SIZE, width=SIZE, seed=0,
                num_inference_steps=STEPS.get(variant, defaults["default_num_inference_steps"]),
                max_sequence_length=TEXT_LENGTH[variant],
                guidance_scale=defaults["default_guidance_scale"])


def serving_shape(variant: str, batch: int) -> ServingShape:
    return ServingShape(batch, SIZE, SIZE, TEXT_LENGTH[variant])


def synced_seconds(fn) -> float:
    """Seconds `fn` takes, its GPU work included (on a machine with one)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    began = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - began


def median_ms(fn, warmup: int = 2, runs: int = 5) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(synced_seconds(fn) for _ in range(runs)) * 1000


def raw_request(fields: dict) -> dict[str, np.ndarray]:
    raw = {"prompt": np.array([fields["prompt"].encode()], dtype=object)}
    for name, value in fields.items():
        if name != "prompt":
            raw[name] = np.array([value], dtype=np.float32 if isinstance(value, float) else np.int64)
    return raw


def on_device(inputs: dict[str, torch.Tensor], dtype: torch.dtype, device: str = "cuda"
              ) -> dict[str, torch.Tensor]:
    """A network's sample inputs on `device`, the floating ones in `dtype` (the guidance scale
    stays float32, as the pipeline passes it)."""
    return {k: (v.to(dtype) if v.is_floating_point() and k != "guidance" else v).to(device)
            for k, v in inputs.items()}


def dit_sample(info: FluxModelInfo, shape: ServingShape, dtype: torch.dtype,
               device: str = "cuda") -> dict:
    """The DiT's inputs at `shape`, as the pipeline builds them."""
    from flux_triton import sampling

    sizes = shape.axis_sizes(info)
    if info.is_flux2:
        from flux_triton.export.onnx_export import flux2_sample_inputs

        inputs = flux2_sample_inputs("dit_transformer", info, shape.batch, sizes["S_txt"],
                                     sizes["H_lat"], sizes["W_lat"], torch.Generator().manual_seed(0))
        return on_device(inputs, dtype, device)
    embeds = type("Embeds", (), {})()
    embeds.sequence = torch.randn(shape.batch, sizes["S_txt"], info.t5_hidden_size, device=device,
                                  dtype=dtype)
    embeds.pooled = torch.randn(shape.batch, info.clip_hidden_size, device=device, dtype=dtype)
    embeds.text_ids = sampling.text_ids(sizes["S_txt"], device, dtype)
    latents = torch.randn(shape.batch, sizes["S_img"], info.latent_channels * 4, device=device,
                          dtype=dtype)
    guidance = (sampling.guidance_vector(3.5, shape.batch, device) if info.guidance_embeds else None)
    timestep = torch.full((shape.batch,), 0.5, device=device, dtype=dtype)
    return dit_inputs(latents, timestep, guidance, embeds,
                      sampling.latent_image_ids(sizes["H_lat"], sizes["W_lat"], device, dtype))


def dit_flops(dit, inputs: dict) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        dit(**inputs)
    return float(counter.get_total_flops())


KERNEL_KINDS = (  # substrings of CUDA kernel names, first match wins
    # inductor names its kernels after every op fused in, attention and _scaled_mm included
    ("fused (inductor)", ("triton_",)),
    ("attention", ("flash", "fmha", "attention", "sdpa", "cudnn")),
    # cuBLAS's nvjet kernels spell float8 operands "qq" (nvjet_sm90_qqtst_..._ovscale)
    ("float8 matmul", ("f8f8", "fp8", "e4m3", "scaled_mm", "rowwise", "nvjet_sm90_qq")),
    ("matmul", ("gemm", "nvjet", "sm90_xmma", "cutlass", "matmul")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, markers in KERNEL_KINDS:
        if any(m in lowered for m in markers):
            return kind
    return "other"


def profile_step(fn) -> dict:
    """GPU time of one call by kind of kernel (float8 and bf16 matmuls, attention, fused
    elementwise/normalisation/quantisation kernels), and its ten longest kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.key and not event.key.startswith(("cudaGraph", "Memcpy", "Memset")):
            kernels[event.key] = kernels.get(event.key, 0.0) + us / 1000
    by_kind: dict[str, float] = {}
    for name, ms in kernels.items():
        by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:10]
    return {"gpu_ms_by_kind": {k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "gpu_ms_total": round(sum(kernels.values()), 2),
            "top_kernels_ms": [[name[:120], round(ms, 2)] for name, ms in top]}


def release(*objects) -> None:
    del objects
    gc.collect()
    torch.cuda.empty_cache()


def part_a(info: FluxModelInfo, variant: str, batches: list[int], runs: int) -> dict:
    """(a) diffusers' FluxPipeline (Flux2Pipeline, Flux2KleinPipeline), eager bf16, on the same
    random networks; with each network's weights and the peak memory of one call."""
    parts = {name: load_component(name, info, "cuda", "bfloat16") for name in components(info)}
    pipe = (diffusers_flux2_pipeline(info, parts) if info.is_flux2
            else diffusers_pipeline(info, "cuda", "bfloat16", parts))
    weights = {name: sum(p.numel() * p.element_size() for p in part.model.parameters())
               for name, part in parts.items() if name != "tokenizer"}
    if info.is_flux2:  # the whole text encoder diffusers runs, not the served cut one
        weights["text_encoder"] = sum(p.numel() * p.element_size()
                                      for p in pipe.text_encoder.parameters())
    print(json.dumps({"weights_gib": {k: round(v / 2**30, 2) for k, v in weights.items()}}), flush=True)
    rows = {}
    for batch in batches:
        fields = request_fields(variant, batch)
        inputs = dit_sample(info, serving_shape(variant, batch), torch.bfloat16)
        with torch.inference_mode():
            step_ms = median_ms(lambda inputs=inputs: parts["dit_transformer"](**inputs), 1, 3)
        flops = dit_flops(parts["dit_transformer"], inputs)

        def call(fields=fields, batch=batch):
            with torch.inference_mode():
                pipe(prompt=[fields["prompt"]], num_images_per_prompt=batch, height=SIZE, width=SIZE,
                     num_inference_steps=fields["num_inference_steps"],
                     max_sequence_length=fields["max_sequence_length"],
                     guidance_scale=fields["guidance_scale"], output_type="np",
                     generator=torch.Generator("cpu").manual_seed(0))
        call()
        torch.cuda.reset_peak_memory_stats()
        e2e = [synced_seconds(call) for _ in range(runs)]
        rows[batch] = {"e2e_s": statistics.median(e2e), "e2e_runs_s": e2e, "dit_step_ms": step_ms,
                       "dit_flops_per_step": flops, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
                       "network_weight_bytes": weights}
        print(json.dumps({"a": {variant: {batch: rows[batch]}}}), flush=True)
    release(pipe, parts)
    return rows


def part_m(info: FluxModelInfo, precision: str, shape: ServingShape) -> dict:
    """Each network alone on the GPU, eager in `precision`: its weights and its peak memory in one
    call at `shape` (weights and activations), from nothing else allocated."""
    from flux_triton.export.onnx_export import sample_inputs
    from flux_triton.runtime.acceleration import load_network

    options = Acceleration(precision, compile=False, cuda_graphs=False)
    result = {}
    for name in components(info)[1:]:
        release()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        network = load_network(name, info, "cuda", options)
        weights = torch.cuda.memory_allocated() - base
        inputs = on_device(sample_inputs(name, info, shape.axis_sizes(info)), torch.bfloat16)
        with torch.inference_mode():
            network.run(**inputs)
        torch.cuda.synchronize()
        result[name] = {"weight_bytes": weights, "peak_bytes": torch.cuda.max_memory_allocated() - base}
        print(json.dumps({"m": {name: result[name]}}), flush=True)
        del network, inputs
    release()
    return result


def run_pipeline(models, request, info) -> tuple[float, float, dict]:
    """(end to end s, first preview s, stage spans) of the shared pipeline in-process."""
    async def go():
        began = time.perf_counter()
        first = None
        async for event in generate(request, info, models):
            if first is None:
                torch.cuda.synchronize()
                first = time.perf_counter() - began
            if isinstance(event, FinalImage):
                event.image.cpu()
                spans = event.timings.spans_ms()
        return time.perf_counter() - began, first, spans
    return asyncio.run(go())


def calibration_for(info: FluxModelInfo, static: bool) -> str | None:
    """With `static` (an FP8-static label): the DiT calibrated as `make export FP8_SCALES=static`
    does it, into its model folder (once); else None."""
    if not static:
        return None
    from flux_triton.export.calibration import DEFAULT_PROMPTS, write_dit_calibration
    from flux_triton.serving_config import FP8_CALIBRATION_FILE

    path = Path(info.model_dir) / FP8_CALIBRATION_FILE
    if not path.exists():
        write_dit_calibration(info, Path(info.model_dir), "cuda", DEFAULT_PROMPTS)
        release()
    return str(path)


def part_b(info: FluxModelInfo, variant: str, precision: str, batches: list[int], runs: int,
           cache_dir: Path, profile: bool = False, more_steps: tuple[int, ...] = ()) -> dict:
    """(b) our pipeline in one process, loaded as the served component models load; with
    `more_steps`, also the end-to-end time at each of those step counts (the same load)."""
    shapes = tuple(serving_shape(variant, b) for b in batches)
    base, static, fused = parse_label(precision)
    options = Acceleration(base, compile=True, cuda_graphs=True, cache_dir=str(cache_dir),
                           fp8_calibration=calibration_for(info, static), fuse_qkv=fused)
    began = time.perf_counter()
    models = TorchFluxModels(info, "cuda", acceleration=options, warmup=shapes)
    result = {"load_and_warmup_s": time.perf_counter() - began, "load_phases": models.load_phases,
              "batches": {}}
    limits = ServingLimits(max_batch=max(batches))
    dit = models.parts["dit_transformer"]
    for batch, shape in zip(batches, shapes):
        request = validate_request(raw_request(request_fields(variant, batch)), info, limits)
        inputs = dit_sample(info, shape, torch.bfloat16)
        with torch.inference_mode():
            step_ms = median_ms(lambda inputs=inputs: dit(**inputs), 2, 5)
            # kernels inside a CUDA graph replay are not traced: profile what the graph captured
            network = getattr(dit, "forward", dit)
            step_profile = (profile_step(lambda n=network, i=inputs: n(**i)) if profile else None)
        run_pipeline(models, request, info)
        torch.cuda.reset_peak_memory_stats()
        measured = [run_pipeline(models, request, info) for _ in range(runs)]
        spans = measured[-1][2]
        result["batches"][batch] = {
            "e2e_s": statistics.median(m[0] for m in measured), "e2e_runs_s": [m[0] for m in measured],
            "first_preview_s": statistics.median(m[1] for m in measured), "dit_step_ms": step_ms,
            "stage_ms": {k: v[1] - v[0] for k, v in spans.items()},
            "peak_gpu_bytes": torch.cuda.max_memory_allocated()}
        for steps in more_steps:
            fields = dict(request_fields(variant, batch), num_inference_steps=steps)
            request = validate_request(raw_request(fields), info, limits)
            result["batches"][batch].setdefault("e2e_s_by_steps", {})[steps] = statistics.median(
                run_pipeline(models, request, info)[0] for _ in range(runs))
        if step_profile:
            result["batches"][batch]["dit_step_profile"] = step_profile
        print(json.dumps({"b": {variant: {precision: {batch: result["batches"][batch]}}}}), flush=True)
    release(models)
    return result


def part_c(folder: Path, variant: str, precision: str, batches: list[int], runs: int,
           repository: Path, mps: bool, restarts: int, cuda_graphs: bool = True,
           precompile: bool = True) -> dict:
    """(c) the same, served: tritonserver on this GPU, streamed to the gRPC client. The repository
    is exported as `make export` does (`precompile`: the compile cache filled first)."""
    import tritonclient.grpc as grpcclient

    from devtools.processes import free_port
    from flux_triton.clients.stream_client import build_inputs, stream_generate
    from flux_triton.export.repository import write_repository
    from flux_triton.server.launcher import TritonServer

    shapes = tuple(serving_shape(variant, b) for b in batches)
    began = time.perf_counter()
    base, static, fused = parse_label(precision)
    write_repository(folder, repository, device="gpu", precision=base,
                     warmup=shapes, precompile=precompile,
                     fp8_scales="static" if static else "dynamic", fuse_qkv=fused,
                     cuda_graphs=cuda_graphs, limits=ServingLimits(max_batch=max(batches)),
                     random_weights=has_random_weights(folder))  # the full-size folders have none
    ports = [free_port() for _ in range(3)]
    log = repository / f"tritonserver-{precision}-mps{int(mps)}.log"
    server = TritonServer(repository, *ports, log_file=log, mps=mps)
    result = {"mps": mps, "cuda_graphs": cuda_graphs, "precompile": precompile,
              "export_s": round(time.perf_counter() - began, 2), "batches": {}, "ready_s": []}
    try:
        result["ready_s"].append(server.start(timeout_s=1500))
        for _ in range(restarts):  # a restart finds the compiled kernels in the repository's cache
            server.stop()
            result["ready_s"].append(server.start(timeout_s=1500))
        client = grpcclient.InferenceServerClient(f"127.0.0.1:{ports[1]}")
        for batch in batches:
            fields = request_fields(variant, batch)
            warm = stream_generate(client, build_inputs(**fields), timeout_s=1500)
            if warm.error:
                raise RuntimeError(warm.error)
            streams = [stream_generate(client, build_inputs(**fields), timeout_s=1500)
                       for _ in range(runs)]
            steps = len(streams[0].steps)
            dit_ms = [r.timings[f"step_{i}"][1] - r.timings[f"step_{i}"][0]
                      for r in streams for i in range(2, steps + 1)]
            spans = streams[-1].timings
            result["batches"][batch] = {
                "e2e_s": statistics.median(r.total_s for r in streams),
                "e2e_runs_s": [r.total_s for r in streams],
                "first_preview_s": statistics.median(r.first_response_s for r in streams),
                "step_interval_ms": statistics.median(s["seconds"] for r in streams
                                                      for s in r.steps[1:]) * 1000,
                "bls_dit_call_ms": statistics.median(dit_ms),
                "server_stage_ms": {k: v[1] - v[0] for k, v in spans.items() if isinstance(v, list)},
            }
            print(json.dumps({"c": {variant: {precision: {batch: result["batches"][batch]}}}}),
                  flush=True)
        client.close()
        result["metrics"] = [line for line in server.metrics().splitlines() if line.startswith(
            ("nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us",
             "nv_inference_exec_count", "nv_gpu_memory_used_bytes", "flux_gpu_memory_used_bytes"))]
    finally:
        server.stop()
        print_server_problems(log)
    return result


def merge(out: Path, env: dict, rows: dict[str, dict], extra: dict) -> dict:
    """Add rows (by `variant/precision/batch`, one key per part) to the results file, keeping the
    rows and parts of other runs."""
    data = json.loads(out.read_text()) if out.exists() else {"rows": {}, "runs": []}
    for key, parts in rows.items():
        row = data["rows"].setdefault(key, {})
        for part, values in parts.items():
            row[part] = dict(values, environment=env)
    data["runs"].append(dict(extra, environment=env, rows=sorted(rows)))
    data["rows"] = dict(sorted(data["rows"].items()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    return data


def table(data: dict) -> str:
    lines = ["| model | precision | batch | (a) s | (b) s | (c) s | a/c | c/b | DiT step ms a / b / c "
             "| first preview ms b / c |", "|" + "---|" * 10]
    for key in sorted(data["rows"]):
        row = data["rows"][key]
        a, b, c = row.get("a", {}), row.get("b", {}), row.get("c", {})
        variant, precision, batch = key.split("/")

        def f(part, name, scale=1.0, digits=3):
            return f"{part[name] * scale:.{digits}f}" if name in part else "–"
        ratio_ac = f"{a['e2e_s'] / c['e2e_s']:.2f}" if a and c else "–"
        ratio_cb = f"{c['e2e_s'] / b['e2e_s']:.3f}" if b and c else "–"
        lines.append(
            f"| {variant} | {precision} | {batch} | {f(a, 'e2e_s')} | {f(b, 'e2e_s')} | "
            f"{f(c, 'e2e_s')} | {ratio_ac} | {ratio_cb} | {f(a, 'dit_step_ms', 1, 1)} / "
            f"{f(b, 'dit_step_ms', 1, 1)} / {f(c, 'bls_dit_call_ms', 1, 1)} | "
            f"{f(b, 'first_preview_s', 1000, 0)} / {f(c, 'first_preview_s', 1000, 0)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="schnell,dev")
    parser.add_argument("--precisions", default="BF16,FP8",
                        help="any of BF16, FP8, FP8-static (FP8 with FP8_SCALES=static), each "
                             "with +qkv for FUSE_QKV=1 (e.g. FP8-static+qkv)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--parts", default="a,b,c",
                        help="any of a, b, c; and m: each network's weights and peak memory alone")
    parser.add_argument("--steps", default="",
                        help="N[,M...]: every request's steps (default: each variant's own); rows "
                             "are then named VARIANT-Nsteps, and (b) also times M... steps")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="(b) also profile one DiT step: GPU time by kind of kernel")
    parser.add_argument("--mps", choices=["on", "off", "both"], default="on",
                        help="(c) with CUDA MPS (both: also without, to show what it changes)")
    parser.add_argument("--restarts", type=int, default=1,
                        help="(c) restarts of the MPS server after its first start (ready time "
                             "with the compile cache filled)")
    parser.add_argument("--restart-precisions", default="FP8",
                        help="precisions whose server is restarted (--restarts) to time a cached start")
    parser.add_argument("--text-length", type=int, default=None,
                        help="T5 text length of every request (default: each variant's own, schnell "
                             "256, dev 512); the same length lets dev reuse schnell's compiled blocks")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="one compile cache for (b) and every served model (default: "
                             "WORKDIR/compile_cache); inductor's keys keep variants apart")
    parser.add_argument("--precompile", type=int, choices=[0, 1], default=1,
                        help="(c) fill the compile cache at export, as make export does (0: the "
                             "server compiles at its start)")
    parser.add_argument("--tokenizers-from", default="models/shapes-flux")
    parser.add_argument("--skip-done", action="store_true",
                        help="leave out the cases whose row and part --out already holds (to go on "
                             "where a cut-off run stopped)")
    parser.add_argument("--workdir", default=None, help="folders, repositories and compile caches")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-gpu-"))
    cache = (args.compile_cache or work / "compile_cache").resolve()
    os.environ[COMPILE_CACHE_ENV] = str(cache)  # the served models' cache, as for a read-only volume
    if args.text_length:
        TEXT_LENGTH.update(dict.fromkeys(TEXT_LENGTH, args.text_length))
    step_counts = [int(n) for n in args.steps.split(",") if n]
    if step_counts:
        STEPS.update(dict.fromkeys(SERVING, step_counts[0]))
    env = environment()
    print(json.dumps(env), flush=True)
    data = None
    for variant in args.variants.split(","):
        folder = write_full_size_folder(work / variant, variant, args.tokenizers_from)
        info = load_model_info(folder)
        precisions = args.precisions.split(",")
        label = f"{variant}-{step_counts[0]}steps" if step_counts else variant

        def save(part: str, rows_by_batch: dict, precisions: list[str], extra: dict,
                 variant: str = variant, label: str = label) -> dict:
            """Merge one part's rows into the results file at once (a cut-off run keeps them)."""
            rows = {f"{label}/{precision}/{batch}": {part: dict(row, text_length=TEXT_LENGTH[variant])}
                    for precision in precisions for batch, row in rows_by_batch.items()}
            return merge(args.out, env, rows, dict(extra, variant=label, part=part))

        def todo(part: str, precision: str, label: str = label) -> list[int]:
            """The batches still to measure (with --skip-done: those without this part's row)."""
            if not args.skip_done or not args.out.exists():
                return batches
            rows = json.loads(args.out.read_text())["rows"]
            return [b for b in batches if part not in rows.get(f"{label}/{precision}/{b}", {})]

        a_batches = todo("a", precisions[0]) if "a" in parts else []
        if a_batches:
            data = save("a", part_a(info, variant, a_batches, args.runs), precisions, {})
            release()
        for precision in precisions:
            repository = work / f"repository-{variant}-{precision}"
            if "m" in parts and todo("m", precision):
                data = save("m", {1: part_m(info, parse_label(precision)[0],
                                            serving_shape(variant, 1))},
                            [precision], {})
            b_batches = todo("b", precision) if "b" in parts else []
            if b_batches:
                b = part_b(info, variant, precision, b_batches, args.runs, cache, args.profile,
                           tuple(step_counts[1:]))
                release()  # part_b's models are gone now: hand their cached blocks back
                data = save("b", b["batches"], [precision],
                            {"load_and_warmup_s": b["load_and_warmup_s"],
                             "load_phases": b["load_phases"]})
            # once for every server of this case: the MPS run's rows must not hide them from the other
            c_batches = todo("c", precision) if "c" in parts else []
            if c_batches:
                for mps in {"on": [True], "off": [False], "both": [True, False]}[args.mps]:
                    first_server = mps == (args.mps != "off")  # with --mps both: the MPS one
                    restarts = (args.restarts if first_server
                                and precision in args.restart_precisions else 0)
                    c = part_c(folder, variant, precision, c_batches, args.runs, repository, mps,
                               restarts, precompile=bool(args.precompile))
                    data = save("c" if mps else "c_without_mps", c["batches"], [precision],
                                {k: v for k, v in c.items() if k != "batches"})
    if data is not None:
        print(table(data))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
