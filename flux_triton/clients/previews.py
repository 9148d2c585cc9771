"""Turning streamed preview latents into pictures, with numpy only (no torch on the client side).

`linear`: the latent -> RGB map fitted at export (`preview_projection` in flux_bls's config), one
pixel per latent pixel, no server call. `vae`: the server's own `vae_decoder` decodes the preview at
full size and in true colours (one more inference per step).
"""

from __future__ import annotations

import json

import numpy as np

from flux_triton.preview import PreviewProjection, preview_rgb


def to_vae_latents(latents: np.ndarray, scaling_factor: float, shift_factor: float) -> np.ndarray:
    """numpy counterpart of flux_triton.sampling.to_vae_latents (tested equal)."""
    return (latents / np.float32(scaling_factor) + np.float32(shift_factor)).astype(np.float32)


def to_uint8_image(decoded: np.ndarray) -> np.ndarray:
    """numpy counterpart of flux_triton.sampling.postprocess_uint8: [B, 3, H, W] in [-1, 1] ->
    uint8 [B, H, W, 3] (tested equal)."""
    image = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return np.round(image.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def bls_parameters(config: dict) -> dict[str, str]:
    """The string parameters of flux_bls's model config (as `get_model_config(as_json=True)`)."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def linear_renderer(parameters: dict[str, str]):
    """preview latent [B, C, h, w] -> uint8 [B, h, w, 3], or None without a fitted projection."""
    raw = parameters.get("preview_projection")
    if not raw:
        return None
    projection = PreviewProjection.from_json(json.loads(raw))
    return lambda latent: preview_rgb(np.asarray(latent), projection)


def vae_inputs(latent: np.ndarray, parameters: dict[str, str]) -> np.ndarray | None:
    """What to send to `vae_decoder` to decode a preview latent, or None when the config does not
    say how the model's VAE is normalised."""
    if "vae_scaling_factor" not in parameters:
        return None
    return to_vae_latents(np.asarray(latent, dtype=np.float32),
                          float(parameters["vae_scaling_factor"]),
                          float(parameters["vae_shift_factor"]))
