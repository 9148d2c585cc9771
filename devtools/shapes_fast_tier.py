"""The fast tier's quality on the trained shapes model: every caption drawn with first-block caching
at each threshold, scored by the classifier and against the same seeds without caching (PSNR),
with the share of DiT calls each threshold skipped.

Each (caption, seed) is its own request, as a user sends it: the cache decides for a request's
rows together, so a batch of captions would skip other steps than one image does. `--steps-for-speed`
adds the skip pattern at another step count (e.g. dev's 28), for the full-size estimate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from devtools.shapes import accuracy, all_scenes, classifier_check
from devtools.shapes_accuracy import load_models, psnr
from flux_triton.model_info import load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process


def draw(info, models: TorchFluxModels, caption: str, seed: int, threshold: float,
         steps: int | None = None) -> tuple[np.ndarray, dict | None]:
    """One request: the image and its cache report (None without caching)."""
    inputs = {"prompt": np.array([caption], dtype=object), "seed": np.array([seed], np.int64),
              "cache_threshold": np.array([threshold], np.float32)}
    if steps is not None:
        inputs["num_inference_steps"] = np.array([steps], np.int32)
    final = [e for e in run_in_process(validate_request(inputs, info), info, models)
             if isinstance(e, FinalImage)][-1]
    return final.image[0].cpu().numpy(), final.cache


def evaluate(model_dir: str, thresholds: list[float], seeds: list[int], device: str = "cpu",
             steps_for_speed: int | None = None, scene_step: int = 1,
             steps: int | None = None) -> dict:
    info = load_model_info(model_dir)
    steps = steps or info.default_num_inference_steps
    models = load_models(info, device, "FP32")
    scenes = all_scenes()[::scene_step]
    rows, reference = [], None
    for threshold in sorted(thresholds):
        began = time.perf_counter()
        images, calls, skipped = [], 0, 0
        for seed in seeds:
            for scene in scenes:
                image, report = draw(info, models, scene.caption, seed, threshold, steps)
                images.append(image)
                if report:
                    calls, skipped = calls + report["dit_calls"], skipped + report["dit_calls_skipped"]
        rates = accuracy(images, scenes * len(seeds))
        if threshold == 0:
            reference = images
        row = {"threshold": threshold,
               "shape": round(rates["shape"], 4), "colour": round(rates["colour"], 4),
               "background": round(rates["background"], 4),
               "all": round(accuracy_all(images, scenes * len(seeds)), 4),
               "psnr_db_vs_no_cache": None if threshold == 0 or reference is None
               else round(psnr(images, reference), 2),
               "dit_calls_skipped": skipped,
               "skipped_share": round(skipped / calls, 4) if calls else 0.0,
               "seconds": round(time.perf_counter() - began, 1)}
        row[f"skipped_share_at_{steps}_steps"] = row["skipped_share"]
        if steps_for_speed and steps_for_speed != steps:
            calls, skipped = 0, 0
            for scene in scenes:
                _, report = draw(info, models, scene.caption, seeds[0], threshold, steps_for_speed)
                if report:
                    calls, skipped = calls + report["dit_calls"], skipped + report["dit_calls_skipped"]
            row[f"skipped_share_at_{steps_for_speed}_steps"] = round(skipped / calls, 4) if calls else 0.0
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {"model_dir": str(info.model_dir), "device": device, "seeds": seeds,
            "captions": len(scenes), "num_inference_steps": steps,
            "rows": rows}


def accuracy_all(images: list[np.ndarray], scenes) -> float:
    """Share of images whose shape, colour and background all read right."""
    from devtools.shapes import classify

    found = [classify(image) for image in images]
    return float(np.mean([f is not None and (f.shape, f.colour, f.background)
                          == (s.shape, s.colour, s.background) for f, s in zip(found, scenes)]))


def table(result: dict) -> str:
    lines = ["| threshold | DiT calls skipped | shape | colour | background | all three | PSNR vs no cache |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        psnr_text = "–" if r["psnr_db_vs_no_cache"] is None else f"{r['psnr_db_vs_no_cache']:.1f} dB"
        lines.append(f"| {r['threshold']:g} | {r['skipped_share']:.1%} | {r['shape']:.1%} | "
                     f"{r['colour']:.1%} | {r['background']:.1%} | {r['all']:.1%} | {psnr_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default="models/shapes-flux")
    parser.add_argument("--thresholds", default="0,0.05,0.1,0.15,0.2,0.3")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu, or gpu / cuda[:N]")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own")
    parser.add_argument("--steps-for-speed", type=int, default=None,
                        help="also the skip share at this step count (seed 0)")
    parser.add_argument("--scene-step", type=int, default=1, help="every Nth caption")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    if 0.0 not in thresholds:
        parser.error("--thresholds must include 0 (the reference of PSNR)")
    check = classifier_check(load_model_info(args.model_dir).default_height)
    if min(check.values()) < 0.99:
        print(f"the classifier cannot read ground-truth images: {check}", file=sys.stderr)
        return 1
    began = time.perf_counter()
    device = "cuda" if args.device == "gpu" else args.device
    result = evaluate(args.model_dir, thresholds, list(range(args.seeds)), device,
                      args.steps_for_speed, args.scene_step, args.steps)
    result["seconds"] = round(time.perf_counter() - began, 1)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
