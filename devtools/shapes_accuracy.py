"""How well a shapes model draws its captions: render every caption, classify the pixels, score.

The classifier is checked on ground-truth renders first; a model's numbers mean nothing if it
cannot read those. Images come from the shared pipeline (`local.run_in_process`), which is
bit-identical to diffusers and to the server.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from devtools.shapes import Scene, accuracy, all_scenes, classifier_check
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.acceleration import Acceleration
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import ServingLimits

ACCELERATION_DTYPES = {"FP32": "float32", "BF16": "bfloat16"}


def generate_images(info: FluxModelInfo, models: TorchFluxModels, scenes: list[Scene], seed: int,
                    num_inference_steps: int | None = None) -> list[np.ndarray]:
    """One image per scene's caption, all in one batch drawn from `seed`."""
    inputs = {"prompt": np.array([s.caption for s in scenes], dtype=object),
              "seed": np.array([seed], dtype=np.uint64)}
    if num_inference_steps is not None:
        inputs["num_inference_steps"] = np.array([num_inference_steps], dtype=np.int32)
    request = validate_request(inputs, info, ServingLimits(max_batch=len(scenes)))
    final = [u for u in run_in_process(request, info, models) if isinstance(u, FinalImage)][-1]
    return list(final.image.cpu().numpy())


def evaluate(model_dir: str | Path, seeds: list[int], device: str = "cpu",
             num_inference_steps: int | None = None,
             precision: str = "FP32") -> tuple[dict, list[np.ndarray]]:
    """Accuracy over every caption and seed, and the images, with the networks loaded as the server
    loads them at `precision` (on a GPU: compiled, the DiT in CUDA graphs, float8 Linear layers for
    FP8)."""
    info = load_model_info(model_dir)
    if device == "cpu":
        models = TorchFluxModels(info, device, ACCELERATION_DTYPES[precision])
    else:
        models = TorchFluxModels(info, device, acceleration=Acceleration(
            precision, compile=True, cuda_graphs=True))
    scenes = all_scenes()
    began = time.perf_counter()
    images, truth = [], []
    for seed in seeds:
        images += generate_images(info, models, scenes, seed, num_inference_steps)
        truth += scenes
    scores = accuracy(images, truth)
    return {"model_dir": str(info.model_dir), "device": device, "precision": precision,
            "images": len(images), "seeds": seeds, "size": info.default_height,
            "num_inference_steps": num_inference_steps or info.default_num_inference_steps,
            "shift": info.scheduler.shift, "seconds": round(time.perf_counter() - began, 1),
            "accuracy": {k: round(v, 4) for k, v in scores.items()}}, images


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
                        help="FP32, BF16, FP8 (GPU), comma-separated; later ones get a PSNR against "
                             "the first and against BF16")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "gpu" else args.device

    size = load_model_info(args.model_dir).default_height
    check = classifier_check(size)
    print(f"classifier on ground truth at {size}px: {check}")
    if check["colour"] < 1.0 or check["background"] < 1.0 or check["shape"] < 0.99:
        print("the classifier cannot read ground-truth images; no score is given", file=sys.stderr)
        return 1
    results, images = [], {}
    for precision in args.precisions.split(","):
        result, images[precision] = evaluate(args.model_dir, list(range(args.seeds)), device,
                                             args.steps, precision)
        first = args.precisions.split(",")[0]
        if precision != first:
            result[f"psnr_vs_{first}_db"] = round(psnr(images[precision], images[first]), 2)
        if precision == "FP8" and "BF16" in images:
            result["psnr_vs_BF16_db"] = round(psnr(images[precision], images["BF16"]), 2)
        result["classifier_on_ground_truth"] = check
        print(json.dumps(result, indent=2), flush=True)
        results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
