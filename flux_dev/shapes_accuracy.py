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

from flux_dev.shapes import Scene, accuracy, all_scenes, classifier_check
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import ServingLimits, validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process


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
             num_inference_steps: int | None = None) -> dict:
    """Accuracy over every caption and seed."""
    info = load_model_info(model_dir)
    models = TorchFluxModels(info, device)
    scenes = all_scenes()
    began = time.perf_counter()
    images, truth = [], []
    for seed in seeds:
        images += generate_images(info, models, scenes, seed, num_inference_steps)
        truth += scenes
    scores = accuracy(images, truth)
    return {"model_dir": str(info.model_dir), "images": len(images), "seeds": seeds,
            "size": info.default_height,
            "num_inference_steps": num_inference_steps or info.default_num_inference_steps,
            "shift": info.scheduler.shift, "seconds": round(time.perf_counter() - began, 1),
            "accuracy": {k: round(v, 4) for k, v in scores.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", default="models/shapes-flux")
    parser.add_argument("--seeds", type=int, default=2, help="images per caption (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = parser.parse_args(argv)

    size = load_model_info(args.model_dir).default_height
    check = classifier_check(size)
    print(f"classifier on ground truth at {size}px: {check}")
    if check["colour"] < 1.0 or check["background"] < 1.0 or check["shape"] < 0.99:
        print("the classifier cannot read ground-truth images; no score is given", file=sys.stderr)
        return 1
    result = evaluate(args.model_dir, list(range(args.seeds)), args.device, args.steps)
    result["classifier_on_ground_truth"] = check
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
