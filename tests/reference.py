"""Shared test helpers: the parity cases; diffusers' FluxPipeline on the same inputs as a served or
in-process request; streaming from a test server; reading its metrics and scripting its faults."""

from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from flux_triton import sampling
from flux_triton.clients.stream_client import StreamResult, build_inputs, stream_generate
from flux_triton.request import GenerationRequest, validate_request

REPO_ROOT = Path(__file__).resolve().parent.parent
SHAPES_DIR = REPO_ROOT / "models" / "shapes-flux"  # the committed, trained default model


def diffusers_call_kwargs(request: GenerationRequest, flux2: bool = False) -> dict:
    """FluxPipeline.__call__ (`flux2`: Flux2Pipeline's, Flux2KleinPipeline's) arguments equivalent
    to a validated request."""
    kwargs = dict(
        prompt=list(request.prompts),
        prompt_2=list(request.prompts_2),
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        num_images_per_prompt=request.num_images_per_prompt,
        max_sequence_length=request.max_sequence_length,
        guidance_scale=request.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(request.seed),
    )
    if request.sigmas is not None:
        kwargs["sigmas"] = list(request.sigmas)
    if flux2:
        del kwargs["prompt_2"]
        if request.image is not None:  # reference images, as PIL images
            from PIL import Image

            kwargs["image"] = [Image.fromarray(np.ascontiguousarray(a)) for a in request.image]
        return kwargs
    if request.negative_prompts is not None:
        kwargs.update(negative_prompt=list(request.negative_prompts),
                      negative_prompt_2=list(request.negative_prompts_2),
                      true_cfg_scale=request.true_cfg_scale)
    return kwargs


def diffusers_image(pipe, request: GenerationRequest) -> tuple[np.ndarray, np.ndarray, list]:
    """(uint8 [B, H, W, 3] as diffusers' PIL output, float [B, H, W, 3], per-step latents)."""
    step_latents = []

    def keep(_pipe, _i, _t, tensors):
        step_latents.append(tensors["latents"].clone())
        return tensors

    flux2 = type(pipe).__name__.startswith("Flux2")
    images = pipe(output_type="np", callback_on_step_end=keep,
                  **diffusers_call_kwargs(request, flux2)).images
    return (images * 255).round().astype("uint8"), images, step_latents


def raw_inputs(**fields) -> dict[str, np.ndarray]:
    """Client-style numpy inputs (strings as BYTES object arrays)."""
    raw = {}
    for name, value in fields.items():
        if isinstance(value, np.ndarray):  # images and masks, as they are
            raw[name] = value
        elif isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
            raw[name] = np.array([v.encode() for v in value], dtype=object)
        elif isinstance(value, str):
            raw[name] = np.array([value.encode()], dtype=object)
        elif isinstance(value, (list, tuple)):
            raw[name] = np.array(value, dtype=np.float32)
        elif isinstance(value, float):
            raw[name] = np.array([value], dtype=np.float32)
        else:
            raw[name] = np.array([value], dtype=np.int64 if name == "seed" else np.int32)
    return raw


def served_generate(served, fields: dict, timeout_s: float = 120,
                    stop_after_steps: int | None = None, extra_inputs: list = ()) -> StreamResult:
    """One streamed generation from a test server, on a connection of its own."""
    client = served.client()
    try:
        return stream_generate(client, [*build_inputs(**fields), *extra_inputs], timeout_s=timeout_s,
                               stop_after_steps=stop_after_steps)
    finally:
        client.close()


def assert_served_matches_diffusers(served, pipe, fields: dict, label: str) -> None:
    """The served image and every step's preview latent equal diffusers' on the same request."""
    result = served_generate(served, fields)
    assert result.error is None, result.error
    request = validate_request(raw_inputs(**fields), served.info)
    expected_uint8, _, step_latents = diffusers_image(pipe, request)
    lat_h, lat_w = sampling.latent_grid(request.height, request.width, served.info.vae_scale_factor)
    unpack = sampling.LAYOUTS[served.info.family].unpack
    expected_previews = [unpack(x, lat_h, lat_w).numpy() for x in step_latents]
    image = result.image
    assert image.shape == expected_uint8.shape
    latent_diff = max(float(np.abs(step["preview_latent"] - expected).max())
                      for step, expected in zip(result.steps, expected_previews))
    print(f"\nparity {label}: image {list(image.shape)}, uint8 max diff "
          f"{int(np.abs(image.astype(int) - expected_uint8).max())}, "
          f"per-step latent max abs diff {latent_diff:.3e}")
    assert np.array_equal(image, expected_uint8)
    assert result.seed == request.seed
    assert len(result.steps) == len(step_latents) == request.num_inference_steps
    for step, expected in zip(result.steps, expected_previews):
        assert np.array_equal(step["preview_latent"], expected), f"step {step['step']}"


PARITY_CASES = {
    "2 prompts x 2 images, 128x96": dict(
        prompt=["a red circle on a blue background", "a photo of a cat"], num_images_per_prompt=2,
        height=128, width=96, seed=3),
    "default size": dict(prompt="an astronaut riding a horse", seed=11),
    "true CFG, 64x128": dict(
        prompt=["a green square", "two cats"], negative_prompt="blurry, low quality",
        true_cfg_scale=4.0, height=64, width=128, seed=5),
    "custom sigmas, prompt_2": dict(
        prompt="a horse", prompt_2="a horse on a hill", sigmas=[1.0, 0.75, 0.45, 0.2, 0.05],
        height=96, width=64, seed=7, max_sequence_length=32),
}


def parity_fields(case: str, variant: str) -> dict:
    """The request of a parity case; dev models also get a distilled guidance scale."""
    fields = dict(PARITY_CASES[case])
    if variant == "dev":
        fields["guidance_scale"] = 4.5
    return fields


def metric(srv, name: str, **labels) -> float:
    """A counter's value, or a histogram's `_count`, from /metrics (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in srv.server.metrics().splitlines():
        match = re.match(rf"^{name}(?:\{{([^}}]*)\}})? (\S+)$", line)
        if match and (match.group(1) or "") == wanted:
            return float(match.group(2))
    return 0.0


def inject(srv, model: str, **plan) -> None:
    (srv.fault_dir / f"{model}.json").write_text(json.dumps(plan))


@contextlib.contextmanager
def first_block_cache(pipe, threshold: float):
    """diffusers' own first-block cache on the pipeline's transformer, for one call."""
    from diffusers import FirstBlockCacheConfig

    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    try:
        yield pipe
    finally:
        pipe.transformer.disable_cache()
