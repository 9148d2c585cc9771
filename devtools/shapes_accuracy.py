"""How well a shapes model draws its captions: render every caption, classify the pixels, score.

The classifier is checked on ground-truth renders first; a model's numbers mean nothing if it
cannot read those. Images come from the shared pipeline (`local.run_in_process`), which is
bit-identical to diffusers and to the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from devtools.shapes import Scene, accuracy, all_scenes, classifier_check
from flux_triton.loras import LoraCatalog, read_catalog
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.acceleration import Acceleration
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import ServingLimits

ACCELERATION_DTYPES = {"FP32": "float32", "BF16": "bfloat16"}
# What each adapter of the shapes model teaches: the Scene field it turns on (same captions).
ADAPTER_PROPERTIES = {"outline": "outline"}
PROPERTY_TARGET = 0.9  # the share of images on which an adapter's property must hold


def generate_images(info: FluxModelInfo, models: TorchFluxModels, scenes: list[Scene], seed: int,
                    num_inference_steps: int | None = None,
                    loras: tuple[tuple[str, float], ...] = ()) -> list[np.ndarray]:
    """One image per scene's caption, all in one batch drawn from `seed`, with `loras` applied."""
    inputs = {"prompt": np.array([s.caption for s in scenes], dtype=object),
              "seed": np.array([seed], dtype=np.uint64)}
    if num_inference_steps is not None:
        inputs["num_inference_steps"] = np.array([num_inference_steps], dtype=np.int32)
    if loras:
        inputs["lora"] = np.array([name.encode() for name, _ in loras], dtype=object)
        inputs["lora_scale"] = np.array([scale for _, scale in loras], dtype=np.float32)
    request = validate_request(inputs, info, ServingLimits(max_batch=len(scenes)),
                               loras=[name for name, _ in loras])
    final = [u for u in run_in_process(request, info, models) if isinstance(u, FinalImage)][-1]
    return list(final.image.cpu().numpy())


STATIC, FUSED = "-static", "+qkv"  # precision label suffixes: FP8_SCALES=static, FUSE_QKV=1


def parse_label(label: str) -> tuple[str, bool, bool]:
    """A precision label of these tools (`make accuracy`, `make bench-gpu`): the precision, whether
    `-static` (FP8 with FP8_SCALES=static) and whether `+qkv` (FUSE_QKV=1); FP8-static+qkv ->
    (FP8, True, True)."""
    fused = label.endswith(FUSED)
    rest = label.removesuffix(FUSED)
    return rest.removesuffix(STATIC), rest.endswith(STATIC), fused


def load_models(info: FluxModelInfo, device: str, precision: str,
                catalog: LoraCatalog | None = None,
                calibration_prompts: tuple[str, ...] | None = None) -> TorchFluxModels:
    """The networks as the server loads them at `precision` (on a GPU: compiled, in CUDA graphs,
    float8 Linear layers for FP8, adapters merged into the weights); `BF16-eager` on a GPU: bf16
    without compile and graphs, adapters as diffusers' peft layers; `FP8-static`: FP8 with static
    input scales calibrated first, as `make export FP8_SCALES=static` does (on the CPU too,
    uncompiled), on `calibration_prompts` (default: the export's); a `+qkv` suffix fuses the
    DiT's projections (FUSE_QKV=1, on the CPU too)."""
    precision, static, fused = parse_label(precision)
    on_gpu = device != "cpu"
    calibration = None
    if static:
        from flux_triton.export.calibration import DEFAULT_PROMPTS, write_dit_calibration

        calibration = str(write_dit_calibration(
            info, Path(tempfile.mkdtemp(prefix="fp8-calibration-")), device,
            calibration_prompts or DEFAULT_PROMPTS))
    elif not fused and (not on_gpu or precision.endswith("-eager")):
        return TorchFluxModels(info, device, ACCELERATION_DTYPES[precision.removesuffix("-eager")],
                               loras=catalog)
    return TorchFluxModels(info, device, acceleration=Acceleration(
        precision, compile=on_gpu, cuda_graphs=on_gpu, fuse_qkv=fused,
        fp8_calibration=calibration), loras=catalog)


def evaluate(model_dir: str | Path, seeds: list[int], device: str = "cpu",
             num_inference_steps: int | None = None, precision: str = "FP32",
             adapters: tuple[str, ...] = (), calibration_prompts: tuple[str, ...] | None = None,
             ) -> tuple[dict, dict[str, list[np.ndarray]]]:
    """Accuracy over every caption and seed, without adapters and with each of `adapters` (of the
    model's loras/ folder, scale 1), from one load of the networks; the images by adapter ("" for
    none)."""
    info = load_model_info(model_dir)
    catalog = read_catalog(Path(info.model_dir) / "loras") if adapters else None
    models = load_models(info, device, precision, catalog, calibration_prompts)
    result = {"model_dir": str(info.model_dir), "device": device, "precision": precision,
              "seeds": seeds, "size": info.default_height,
              "num_inference_steps": num_inference_steps or info.default_num_inference_steps,
              "shift": info.scheduler.shift}
    if parse_label(precision)[1]:
        result["calibration_prompts"] = list(calibration_prompts or ()) or "the export's defaults"
    images = {}
    for adapter in ("",) + tuple(adapters):
        scenes = all_scenes()
        if adapter:
            scenes = [replace(scene, **{ADAPTER_PROPERTIES[adapter]: True}) for scene in scenes]
        began = time.perf_counter()
        images[adapter], truth = [], []
        for seed in seeds:
            images[adapter] += generate_images(info, models, scenes, seed, num_inference_steps,
                                               ((adapter, 1.0),) if adapter else ())
            truth += scenes
        scores = {k: round(v, 4) for k, v in accuracy(images[adapter], truth).items()}
        measured = {"images": len(images[adapter]), "seconds": round(time.perf_counter() - began, 1),
                    "accuracy": scores}
        if adapter:
            prop = ADAPTER_PROPERTIES[adapter]
            measured.update(property=prop, property_share=scores[prop], target=PROPERTY_TARGET,
                            meets_target=scores[prop] >= PROPERTY_TARGET)
            result.setdefault("loras", {})[adapter] = measured
        else:
            result.update(measured)
    return result, images


def psnr(images: list[np.ndarray], reference: list[np.ndarray]) -> float:
    """PSNR in dB of uint8 images against reference images of the same seeds."""
    error = np.mean([np.mean((a.astype(np.float64) - b) ** 2) for a, b in zip(images, reference)])
    return float(10 * np.log10(255**2 / max(error, 1e-12)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/shapes-flux")
    parser.add_argument("--seeds", type=int, default=2, help="images per caption (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own")
    parser.add_argument("--device", default="cpu", help="cpu, or gpu / cuda[:N]")
    parser.add_argument("--precisions", default="FP32",
                        help="FP32, BF16, FP8 (GPU), FP8-static (FP8_SCALES=static; CPU too), "
                             "BF16-eager (GPU, no compile, adapters as peft layers), comma-separated, "
                             "the first four also with +qkv (FUSE_QKV=1); later ones get a PSNR "
                             "against the first and against BF16")
    parser.add_argument("--calibration-prompts", default=None,
                        help="FP8-static: `captions` (the shapes captions), or a file of prompts "
                             "(default: the export's built-in prompts)")
    parser.add_argument("--loras", default="known",
                        help="adapters of <model dir>/loras to score too, comma-separated: `known` "
                             f"(those whose property is known: {sorted(ADAPTER_PROPERTIES)}), or none")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "gpu" else args.device

    info = load_model_info(args.model_dir)
    present = read_catalog(Path(info.model_dir) / "loras").names
    if args.loras == "known":
        adapters = tuple(name for name in present if name in ADAPTER_PROPERTIES)
    else:
        adapters = tuple(name for name in args.loras.split(",") if name and name != "none")
    for name in adapters:
        if name not in present or name not in ADAPTER_PROPERTIES:
            parser.error(f"--loras: {name!r} is not an adapter of {info.model_dir}/loras with a "
                         f"known property ({sorted(ADAPTER_PROPERTIES)}); it has {present}")
    size = info.default_height
    check = classifier_check(size)
    print(f"classifier on ground truth at {size}px: {check}")
    outlines = classifier_check(size, outline=True)
    print(f"classifier on ground-truth outlines: {outlines}")
    if min(check.values()) < 0.99 or min(outlines.values()) < 0.99:
        print("the classifier cannot read ground-truth images; no score is given", file=sys.stderr)
        return 1
    calibration = None
    if args.calibration_prompts == "captions":
        calibration = tuple(dict.fromkeys(scene.caption for scene in all_scenes()))
    elif args.calibration_prompts:
        from flux_triton.export.calibration import read_prompts

        calibration = read_prompts(args.calibration_prompts)
    results, images = [], {}
    precisions = args.precisions.split(",")
    for precision in precisions:
        result, images[precision] = evaluate(args.model_dir, list(range(args.seeds)), device,
                                             args.steps, precision, adapters, calibration)
        for other in dict.fromkeys([precisions[0], "BF16"]):
            if precision != other and other in images:
                for adapter, generated in images[precision].items():
                    target = result["loras"][adapter] if adapter else result
                    target[f"psnr_vs_{other}_db"] = round(psnr(generated, images[other][adapter]), 2)
        result["classifier_on_ground_truth"] = {"filled": check, "outline": outlines}
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    missed = [f"{r['precision']} {name}" for r in results for name, m in r.get("loras", {}).items()
              if not m["meets_target"]]
    if missed:
        print(f"adapter property below {PROPERTY_TARGET:.0%}: {missed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
