"""Does image editing work on the trained shapes model? Image-to-image and inpainting, scored.

For every caption and seed the model first draws the source image itself (text-to-image, as a user
would get it), then edits it through the shared pipeline (`local.run_in_process`, bit-identical to
diffusers' FluxImg2ImgPipeline / FluxInpaintPipeline):

- image-to-image at `--strength` (0.8) to the caption with the next shape of `SHAPES`: passes when
  the classifier reads the new shape and the caption's shape colour and background;
- inpainting with a mask of the source's background only, to the caption with a new background
  colour: passes when the classifier reads the new background and the caption's shape and colour.

Scores are against the captions (what was asked); the source's own accuracy is reported beside them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from devtools.shapes import PALETTE, SHAPES, Scene, all_scenes, classifier_check, classify
from devtools.shapes_accuracy import generate_images, load_models
from flux_triton.model_info import FluxModelInfo, load_model_info
from flux_triton.pipeline import FinalImage
from flux_triton.request import validate_request
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import ServingLimits

TARGET = 0.9  # the share of (caption, seed) pairs an edit must pass
DEFAULT_STRENGTH = 0.8
MASK_MODES = ("inside", "grown", "pixel")  # see background_mask
MASK_MARGIN = 2  # pixels of the shape's surroundings kept besides the shape (its anti-aliased edge)
# What each edit must read back: the field it changes, then the fields that must stay.
CRITERIA = {"img2img": ("shape", "colour", "background"),
            "inpaint": ("background", "shape", "colour")}


def shape_edit(scene: Scene) -> Scene:
    """The scene with the next shape of `SHAPES` (circle -> square -> triangle -> circle)."""
    return replace(scene, shape=SHAPES[(SHAPES.index(scene.shape) + 1) % len(SHAPES)])


def background_edit(scene: Scene) -> Scene:
    """The scene with the next background colour of `PALETTE` after its own that is not the
    shape's colour."""
    colours = list(PALETTE)
    start = colours.index(scene.background)
    for step in range(1, len(colours)):
        colour = colours[(start + step) % len(colours)]
        if colour != scene.colour:
            return replace(scene, background=colour)
    raise ValueError(f"no other background for {scene}")


def shape_pixels(image: np.ndarray) -> np.ndarray:
    """bool [H, W]: the pixels `classify` takes for the shape (far from the border's colour)."""
    pixels = image.astype(float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    distance = np.linalg.norm(pixels - np.median(border, axis=0), axis=-1)
    return distance > 0.5 * distance.max() if distance.max() > 40 else np.zeros(distance.shape, bool)


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool [H, W]: `mask` grown by `radius` pixels (a square structuring element)."""
    padded = np.pad(mask, radius)
    height, width = mask.shape
    grown = np.zeros_like(mask)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            grown |= padded[dy:dy + height, dx:dx + width]
    return grown


def background_mask(image: np.ndarray, cell: int, mode: str = "inside",
                    margin: int = MASK_MARGIN) -> np.ndarray:
    """uint8 [H, W] inpainting mask, 255 (repaint) on the background. The pipeline repaints whole
    latent cells (`cell` pixels square, the VAE's scale factor; each takes the mask at its
    top-left pixel), so a cell is kept or repainted whole:

    - `inside`: keeps only the cells wholly inside the shape; the cells on its edge are repainted
      too, so none of the old background survives beside it (the model redraws the edge);
    - `grown`: keeps every cell touching the shape grown by `margin` px: the shape whole, but
      with a ring of the old background around it, which the classifier reads as shape;
    - `pixel`: the grown shape's complement, pixel by pixel, as is."""
    shape = shape_pixels(image)
    height, width = shape.shape
    if mode == "inside":
        keep = shape.reshape(height // cell, cell, width // cell, cell).all(axis=(1, 3))
    elif mode in ("grown", "pixel"):
        shape = dilate(shape, margin)
        if mode == "pixel":
            return np.where(shape, 0, 255).astype(np.uint8)
        keep = shape.reshape(height // cell, cell, width // cell, cell).any(axis=(1, 3))
    else:
        raise ValueError(f"mask mode {mode!r}: one of {MASK_MODES}")
    keep = np.repeat(np.repeat(keep, cell, axis=0), cell, axis=1)
    return np.where(keep, 0, 255).astype(np.uint8)


def score(images: list[np.ndarray], scenes: list[Scene], fields: tuple[str, ...]) -> dict:
    """Pairs whose image reads as its scene in each of `fields`, and in all of them."""
    found = [classify(image) for image in images]
    hits = {field: [f is not None and getattr(f, field) == getattr(s, field)
                    for f, s in zip(found, scenes)] for field in fields}
    passed = [all(row) for row in zip(*hits.values())]
    counts = {field: int(sum(h)) for field, h in hits.items()} | {"all": int(sum(passed))}
    return {"pairs": len(scenes), "counts": counts,
            "rates": {k: round(v / len(scenes), 4) for k, v in counts.items()}, "passed": passed}


def edit_images(info: FluxModelInfo, models: TorchFluxModels, scenes: list[Scene], seed: int,
                sources: list[np.ndarray], strength: float, masks: list[np.ndarray] | None = None,
                num_inference_steps: int | None = None) -> list[np.ndarray]:
    """One edit per scene's caption from its source image (inpainting where `masks` are given),
    all in one batch drawn from `seed`."""
    inputs = {"prompt": np.array([s.caption for s in scenes], dtype=object),
              "seed": np.array([seed], dtype=np.uint64),
              "image": np.stack(sources), "strength": np.array([strength], np.float32)}
    if masks is not None:
        inputs["mask"] = np.stack(masks)
    if num_inference_steps is not None:
        inputs["num_inference_steps"] = np.array([num_inference_steps], dtype=np.int32)
    request = validate_request(inputs, info, ServingLimits(max_batch=len(scenes)))
    final = [u for u in run_in_process(request, info, models) if isinstance(u, FinalImage)][-1]
    return list(final.image.cpu().numpy())


def evaluate(model_dir: str | Path, seeds: list[int], device: str = "cpu",
             strength: float = DEFAULT_STRENGTH, num_inference_steps: int | None = None,
             scenes: list[Scene] | None = None, mask_mode: str = "inside") -> dict:
    """Both edits over every scene and seed, from the model's own source images."""
    info = load_model_info(model_dir)
    models = load_models(info, device, "FP32")
    scenes = scenes or all_scenes()
    steps = num_inference_steps or info.default_num_inference_steps
    edits = {"img2img": [shape_edit(s) for s in scenes],
             "inpaint": [background_edit(s) for s in scenes]}
    images = {"source": [], "img2img": [], "inpaint": []}
    seconds = dict.fromkeys(images, 0.0)
    mask_share = []
    for seed in seeds:
        began = time.perf_counter()
        sources = generate_images(info, models, scenes, seed, num_inference_steps)
        seconds["source"] += time.perf_counter() - began
        images["source"] += sources

        began = time.perf_counter()
        images["img2img"] += edit_images(info, models, edits["img2img"], seed, sources, strength,
                                         num_inference_steps=num_inference_steps)
        seconds["img2img"] += time.perf_counter() - began

        began = time.perf_counter()
        masks = [background_mask(image, info.vae_scale_factor, mask_mode) for image in sources]
        mask_share += [float(m.mean() / 255) for m in masks]
        images["inpaint"] += edit_images(info, models, edits["inpaint"], seed, sources, strength,
                                         masks, num_inference_steps)
        seconds["inpaint"] += time.perf_counter() - began
        print(f"seed {seed}: done", flush=True)

    runs = len(seeds)
    source = score(images["source"], scenes * runs, ("shape", "colour", "background"))
    result = {"model_dir": str(info.model_dir), "device": device, "seeds": seeds,
              "captions": len(scenes), "size": info.default_height, "num_inference_steps": steps,
              "strength": strength, "target": TARGET,
              "source": {k: source[k] for k in ("pairs", "counts", "rates")}
              | {"seconds": round(seconds["source"], 1)}}
    for task, fields in CRITERIA.items():
        scored = score(images[task], edits[task] * runs, fields)
        good_source = [p for p, ok in zip(scored["passed"], source["passed"]) if ok]
        result[task] = {k: scored[k] for k in ("pairs", "counts", "rates")} | {
            "changed": fields[0], "kept": list(fields[1:]),
            "rate_given_correct_source": round(sum(good_source) / max(len(good_source), 1), 4),
            "meets_target": scored["rates"]["all"] >= TARGET,
            "seconds": round(seconds[task], 1)}
    result["inpaint"]["mask"] = {"mode": mask_mode, "margin_px": MASK_MARGIN,
                                 "cell_px": info.vae_scale_factor,
                                 "mean_repainted_share": round(float(np.mean(mask_share)), 4)}
    return result


def study(model_dir: str | Path, seeds: list[int], settings: list[tuple[float, int | None]],
          device: str = "cpu", scenes: list[Scene] | None = None) -> list[dict]:
    """Combined pass rates of both edits (inpainting with each mask of `MASK_MODES`) at each
    (strength, steps) of `settings`, from one set of source images."""
    info = load_model_info(model_dir)
    models = load_models(info, device, "FP32")
    scenes = scenes or all_scenes()
    new_shapes, new_backgrounds = [shape_edit(s) for s in scenes], [background_edit(s) for s in scenes]
    sources = {seed: generate_images(info, models, scenes, seed) for seed in seeds}
    masks = {(seed, mode): [background_mask(i, info.vae_scale_factor, mode) for i in images]
             for seed, images in sources.items() for mode in MASK_MODES}
    rows = []
    for strength, steps in settings:
        began = time.perf_counter()
        row = {"strength": strength, "num_inference_steps": steps or info.default_num_inference_steps}
        tasks = [("img2img", new_shapes, None)] + [
            (f"inpaint_{mode}_mask", new_backgrounds, mode) for mode in MASK_MODES]
        for name, edits, mode in tasks:
            images = []
            for seed in seeds:
                images += edit_images(info, models, edits, seed, sources[seed], strength,
                                      None if mode is None else masks[seed, mode], steps)
            rates = score(images, edits * len(seeds), CRITERIA[name.split("_")[0]])["rates"]
            row[name] = rates
        row["seconds"] = round(time.perf_counter() - began, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def versions() -> dict[str, str]:
    import diffusers
    import torch

    return {"torch": torch.__version__, "diffusers": diffusers.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0]}


def table(result: dict) -> str:
    """The rates as a Markdown table, one row per task."""
    lines = ["| task | pairs | changed reads new | kept 1 | kept 2 | all three |",
             "|---|---|---|---|---|---|"]
    for task in CRITERIA:
        r = result[task]
        fields = [r["changed"], *r["kept"]]
        cells = [f"{field} {r['rates'][field]:.1%}" for field in fields]
        lines.append(f"| {task} | {r['pairs']} | {' | '.join(cells)} | **{r['rates']['all']:.1%}** |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", default="models/shapes-flux")
    parser.add_argument("--seeds", type=int, default=4, help="pairs per caption (seeds 0..N-1)")
    parser.add_argument("--steps", type=int, default=None, help="default: the model's own")
    parser.add_argument("--strength", type=float, default=DEFAULT_STRENGTH)
    parser.add_argument("--device", default="cpu", help="cpu, or gpu / cuda[:N]")
    parser.add_argument("--mask", choices=MASK_MODES, default="inside",
                        help="the inpainting mask (see background_mask)")
    parser.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    parser.add_argument("--study", default="",
                        help="instead: combined pass rates at each STRENGTH[@STEPS], comma-separated "
                             "(e.g. 0.6,0.8,1.0,0.8@24), on every --scene-step-th caption")
    parser.add_argument("--scene-step", type=int, default=1, help="with --study: every Nth caption")
    args = parser.parse_args(argv)
    device = "cuda" if args.device == "gpu" else args.device
    if args.study:
        settings = [(float(strength), int(steps) if steps else None)
                    for strength, _, steps in (item.partition("@") for item in args.study.split(","))]
        began = time.perf_counter()
        rows = study(args.model_dir, list(range(args.seeds)), settings, device,
                     all_scenes()[::args.scene_step])
        result = {"seeds": args.seeds, "captions": len(all_scenes()[::args.scene_step]),
                  "scene_step": args.scene_step, "rows": rows,
                  "seconds": round(time.perf_counter() - began, 1), "versions": versions()}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0

    info = load_model_info(args.model_dir)
    check = classifier_check(info.default_height)
    print(f"classifier on ground truth at {info.default_height}px: {check}")
    if min(check.values()) < 0.99:
        print("the classifier cannot read ground-truth images; no score is given", file=sys.stderr)
        return 1
    began = time.perf_counter()
    result = evaluate(args.model_dir, list(range(args.seeds)), device, args.strength, args.steps,
                      mask_mode=args.mask)
    result["seconds"] = round(time.perf_counter() - began, 1)
    result["classifier_on_ground_truth"] = check
    result["versions"] = versions()
    print(json.dumps(result, indent=2))
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    missed = [task for task in CRITERIA if not result[task]["meets_target"]]
    if missed:
        print(f"below {TARGET:.0%} of pairs: {missed}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
