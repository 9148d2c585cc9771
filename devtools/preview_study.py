"""From which step is a preview recognisable? x0 previews against raw-latent previews, on the
trained shapes model: every caption's previews are decoded by the model's own VAE at every step and
read back by the shapes classifier.

    python -m devtools.preview_study --seeds 1 --out out/preview_study.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from devtools.shapes import accuracy, all_scenes
from flux_triton import sampling
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import StepUpdate
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import ServingLimits


def step_accuracies(model_dir: str | Path, seed: int) -> dict[str, list[dict[str, float]]]:
    """Per kind ("x0", "latent"), the classifier's accuracy on each step's decoded previews."""
    info = load_model_info(model_dir)
    models = TorchFluxModels(info)
    scenes = all_scenes()
    request = validate_request({"prompt": np.array([s.caption for s in scenes], dtype=object),
                                "seed": np.array([seed], dtype=np.int64),
                                "preview_kind": np.array([b"both"], dtype=object)},
                               info, ServingLimits(max_batch=len(scenes)))
    vae = models.parts["vae_decoder"]
    scores: dict[str, list[dict[str, float]]] = {"x0": [], "latent": []}
    for event in run_in_process(request, info, models):
        if not isinstance(event, StepUpdate):
            continue
        for kind, latents in (("x0", event.preview_x0), ("latent", event.preview_latent)):
            with torch.inference_mode():
                decoded = vae(latents=sampling.to_vae_latents(
                    latents, info.vae_scaling_factor, info.vae_shift_factor))["image"]
            images = list(sampling.postprocess_uint8(decoded).numpy())
            scores[kind].append({k: round(v, 4) for k, v in accuracy(images, scenes).items()})
    return scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models/shapes-flux")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    runs = [step_accuracies(args.model_dir, seed) for seed in range(args.seeds)]
    steps = len(runs[0]["x0"])
    table = {kind: [{k: float(np.mean([run[kind][i][k] for run in runs]))
                     for k in ("shape", "colour", "background")} for i in range(steps)]
             for kind in ("x0", "latent")}
    print("| step | x0 shape / colour / background | latent shape / colour / background |")
    print("|---|---|---|")
    for i in range(steps):
        x0, latent = table["x0"][i], table["latent"][i]
        print(f"| {i + 1} | {x0['shape']:.0%} / {x0['colour']:.0%} / {x0['background']:.0%} | "
              f"{latent['shape']:.0%} / {latent['colour']:.0%} / {latent['background']:.0%} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model_dir": args.model_dir, "seeds": args.seeds,
                                        "images_per_step": 168 * args.seeds, "by_step": table},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
