"""Static FP8 scales for the DiT (`FP8_SCALES=static`): the pipeline runs sample prompts in bf16
at the model's defaults (size, steps, text length), every step, and each float8 layer keeps the
largest input magnitude it saw (`runtime.float8`). The export writes them beside the repository's
configs; the served DiT and the in-process one read the same file."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flux_triton.model_info import FluxModelInfo
from flux_triton.request import validate_request
from flux_triton.runtime.acceleration import token_linear_names
from flux_triton.runtime.float8 import calibrate_input_amax, write_calibration
from flux_triton.runtime.in_process import TorchFluxModels, run_in_process
from flux_triton.serving_config import FP8_CALIBRATION_FILE

# Varied subjects, styles and lengths: what sets each layer's range is the spread of text and image
# content across the whole noise schedule, which every prompt runs through.
DEFAULT_PROMPTS = (
    "a photo of a red fox in fresh snow, morning light, shallow depth of field",
    "an oil painting of a harbour town at dusk, boats, warm lamps reflected in the water",
    "a flat vector logo of a blue mountain inside a yellow circle on a white background",
    "a close-up portrait of an old fisherman with a grey beard, studio lighting, 85mm",
    "a neon sign that says OPEN in a rainy alley at night, cinematic",
    "an isometric illustration of a tiny cozy library with plants and a cat",
)


def read_prompts(path: str | Path | None) -> tuple[str, ...]:
    """The calibration prompts: one per non-empty line of `path`, else `DEFAULT_PROMPTS`."""
    if path is None:
        return DEFAULT_PROMPTS
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"CALIBRATION_PROMPTS: cannot read {path}: {exc}") from None
    prompts = tuple(line.strip() for line in text.splitlines() if line.strip())
    if not prompts:
        raise ValueError(f"CALIBRATION_PROMPTS: {path} has no prompt (one per line)")
    return prompts


def calibrate_dit(info: FluxModelInfo, device: str, prompts: Sequence[str],
                  models: TorchFluxModels | None = None) -> tuple[dict[str, float], dict]:
    """The largest input magnitude of each float8 layer of the DiT while the pipeline makes one
    image per prompt (seeds 0, 1, ...) in bf16 on `device` (float32 on the CPU); and what was run."""
    models = models or TorchFluxModels(info, device, "float32" if device == "cpu" else "bfloat16")
    dit = models.parts["dit_transformer"].model
    names = token_linear_names(dit)
    began = time.perf_counter()

    def run() -> None:
        for seed, prompt in enumerate(prompts):
            request = validate_request({"prompt": np.array([prompt.encode()], dtype=object),
                                        "seed": np.array([seed], dtype=np.uint64)}, info)
            for _ in run_in_process(request, info, models):
                pass

    amax = calibrate_input_amax(dit, names, run)
    about = {"prompts": list(prompts), "seeds": list(range(len(prompts))), "device": device,
             "height": info.default_height, "width": info.default_width,
             "num_inference_steps": info.default_num_inference_steps, "layers": len(names),
             "seconds": round(time.perf_counter() - began, 1)}
    return amax, about


def write_dit_calibration(info: FluxModelInfo, repository: Path, device: str,
                          prompts: Sequence[str]) -> Path:
    """Calibrate the DiT (`calibrate_dit`) and write the result to the repository's
    `FP8_CALIBRATION_FILE`."""
    amax, about = calibrate_dit(info, device, prompts)
    path = Path(repository) / FP8_CALIBRATION_FILE
    write_calibration(path, amax, {"model_dir": str(info.model_dir), **about})
    print(f"FP8 static scales: {about['layers']} layers calibrated on {len(prompts)} prompts "
          f"({about['num_inference_steps']} steps, {about['height']}x{about['width']}) on {device} "
          f"in {about['seconds']} s -> {path}")
    return path
