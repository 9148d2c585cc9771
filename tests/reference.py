"""Run diffusers' FluxPipeline on the same inputs as a served or in-process request, stream from a
test server, and compare the two."""

from __future__ import annotations

import numpy as np
import torch

from clients.stream_client import StreamResult, build_inputs, stream_generate
from flux_triton import sampling
from flux_triton.request import GenerationRequest, validate_request


def diffusers_call_kwargs(request: GenerationRequest) -> dict:
    """FluxPipeline.__call__ arguments equivalent to a validated request."""
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

    images = pipe(output_type="np", callback_on_step_end=keep, **diffusers_call_kwargs(request)).images
    return (images * 255).round().astype("uint8"), images, step_latents


def raw_inputs(**fields) -> dict[str, np.ndarray]:
    """Client-style numpy inputs (strings as BYTES object arrays)."""
    raw = {}
    for name, value in fields.items():
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], str):
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
    expected_previews = [sampling.unpack_latents(x, lat_h, lat_w).numpy() for x in step_latents]
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
