"""GPU benchmark at 1024x1024 on FLUX.1's real architecture (random bf16 weights built on the GPU).

(a) diffusers FluxPipeline, eager bf16, in-process; (b) our pipeline in-process with the optimized
components (DiT blocks compiled); per-step DiT latency, end to end, time to first preview, peak GPU
memory, achieved TFLOP/s of the DiT against the bf16 peak. Writes JSON with GPU and versions.

    python -m flux_dev.bench_gpu --variant schnell --out results.json
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from flux_dev.full_size import SERVING, benchmark_parser, write_full_size_folder
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage, dit_inputs, generate
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels
from flux_triton.runtime.torch_components import load_component

H100_BF16_DENSE_TFLOPS = 989.4


def cuda_time(fn, warmup: int, runs: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        torch.cuda.synchronize()
        began = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - began)
    return times


def dit_step_inputs(info, batch: int, seq: int, device: str) -> dict:
    from flux_triton import sampling

    lat = 128
    embeds = type("E", (), {})()
    embeds.sequence = torch.randn(batch, seq, info.t5_hidden_size, device=device, dtype=torch.bfloat16)
    embeds.pooled = torch.randn(batch, info.clip_hidden_size, device=device, dtype=torch.bfloat16)
    embeds.text_ids = sampling.text_ids(seq, device, torch.bfloat16)
    latents = torch.randn(batch, (lat // 2) ** 2, 64, device=device, dtype=torch.bfloat16)
    guidance = torch.full((batch,), 3.5, device=device) if info.guidance_embeds else None
    timestep = torch.full((batch,), 0.5, device=device, dtype=torch.bfloat16)
    return dit_inputs(latents, timestep, guidance, embeds,
                      sampling.latent_image_ids(lat, lat, device, torch.bfloat16))


def dit_flops(dit, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        dit(**inputs)
    return float(counter.get_total_flops())


def run_ours(models, request, info) -> tuple[float, float, np.ndarray]:
    """(end to end s, first preview s, image) of the shared pipeline in-process."""
    async def go():
        began = time.perf_counter()
        first = None
        async for event in generate(request, info, models):
            if first is None:
                torch.cuda.synchronize()
                first = time.perf_counter() - began
            if isinstance(event, FinalImage):
                image = event.image.cpu().numpy()
        return time.perf_counter() - began, first, image
    return asyncio.run(go())


def main(argv=None) -> int:
    parser = benchmark_parser(__doc__)
    args = parser.parse_args(argv)
    import diffusers
    import transformers
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    device = "cuda"
    folder = write_full_size_folder(Path(tempfile.mkdtemp()) / args.variant, args.variant,
                                    args.tokenizers_from)
    info = load_model_info(folder)
    began = time.perf_counter()
    parts = {name: load_component(name, info, device, "bfloat16")
             for name in ("tokenizer", "clip_encoder", "t5_encoder", "dit_transformer", "vae_decoder")}
    build_s = time.perf_counter() - began
    defaults = SERVING[args.variant]
    steps, max_seq = defaults["default_num_inference_steps"], defaults["default_max_sequence_length"]
    guidance = defaults["default_guidance_scale"]
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(
            json.loads((folder / "scheduler" / "scheduler_config.json").read_text())),
        vae=parts["vae_decoder"].model, text_encoder=parts["clip_encoder"].model,
        tokenizer=parts["tokenizer"].clip, text_encoder_2=parts["t5_encoder"].model,
        tokenizer_2=parts["tokenizer"].t5, transformer=parts["dit_transformer"].model,
    )
    pipe.set_progress_bar_config(disable=True)
    result = {
        "gpu": torch.cuda.get_device_name(0), "variant": args.variant, "height": 1024, "width": 1024,
        "steps": steps, "max_sequence_length": max_seq,
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__, "python": platform.python_version(),
                     "cuda": torch.version.cuda},
        "random_weight_build_s": build_s, "batches": {},
    }
    dit = parts["dit_transformer"]
    flops = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = dit_step_inputs(info, batch, max_seq, device)
        flops[batch] = dit_flops(dit, inputs)
        with torch.inference_mode():
            eager_step = cuda_time(lambda inputs=inputs: dit(**inputs), 2, 5)
        prompts = ["a red circle on a blue background"]
        runs = args.runs if batch == 1 else max(1, args.runs - 1)

        def diffusers_call(prompts=prompts, batch=batch):
            with torch.inference_mode():
                return pipe(prompt=prompts, num_images_per_prompt=batch, height=1024, width=1024,
                            num_inference_steps=steps, max_sequence_length=max_seq,
                            guidance_scale=guidance, output_type="np",
                            generator=torch.Generator("cpu").manual_seed(0)).images
        torch.cuda.reset_peak_memory_stats()
        diffusers_e2e = cuda_time(diffusers_call, 1, runs)
        diffusers_peak = torch.cuda.max_memory_allocated()
        result["batches"][str(batch)] = {
            "dit_flops_per_step": flops[batch],
            "a_diffusers_eager": {"e2e_s": statistics.median(diffusers_e2e),
                                  "dit_step_ms": statistics.median(eager_step) * 1000,
                                  "peak_gpu_bytes": diffusers_peak},
        }
        print(json.dumps({batch: result["batches"][str(batch)]}), flush=True)

    # (b) ours in-process: the same networks, DiT blocks compiled.
    compile_began = time.perf_counter()
    dit.model.compile_repeated_blocks(fullgraph=True)
    models = TorchFluxModels.__new__(TorchFluxModels)
    models.parts, models.device = parts, device
    for batch in [int(b) for b in args.batches.split(",")]:
        raw = {"prompt": np.array([b"a red circle on a blue background"], dtype=object),
               "num_images_per_prompt": np.array([batch]), "seed": np.array([0]),
               "guidance_scale": np.array([guidance], dtype=np.float32),
               "max_sequence_length": np.array([max_seq])}
        request = validate_request(raw, info)
        inputs = dit_step_inputs(info, batch, max_seq, device)
        with torch.inference_mode():
            compiled_step = cuda_time(lambda inputs=inputs: dit(**inputs), 3, 5)
        if batch == 1:
            result["compile_s"] = time.perf_counter() - compile_began
        runs = args.runs if batch == 1 else max(1, args.runs - 1)
        run_ours(models, request, info)  # warm-up
        torch.cuda.reset_peak_memory_stats()
        measured = [run_ours(models, request, info) for _ in range(runs)]
        entry = result["batches"][str(batch)]
        step_ms = statistics.median(compiled_step) * 1000
        entry["b_ours_in_process"] = {
            "e2e_s": statistics.median(m[0] for m in measured),
            "first_preview_s": statistics.median(m[1] for m in measured),
            "dit_step_ms": step_ms, "peak_gpu_bytes": torch.cuda.max_memory_allocated(),
            "dit_tflops": flops[batch] / step_ms / 1e9,
            "dit_vs_bf16_floor": step_ms / (flops[batch] / H100_BF16_DENSE_TFLOPS / 1e9),
        }
        entry["ratio_a_over_b"] = entry["a_diffusers_eager"]["e2e_s"] / entry["b_ours_in_process"]["e2e_s"]
        print(json.dumps({batch: entry}), flush=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
