"""Turning streamed preview latents into pictures, with numpy only (no torch on the client side).

`linear`: the latent -> RGB map fitted at export (`preview_projection` in flux_bls's config), one
pixel per latent pixel, no server call. `vae`: the server's own `vae_decoder` decodes the preview at
full size and in true colours (one more inference per step).
"""

from __future__ import annotations

import numpy as np

from flux_triton.preview import PreviewProjection, preview_rgb
from flux_triton.serving_config import BlsOptions, read_options


def to_vae_latents(latents: np.ndarray, scaling_factor: float, shift_factor: float) -> np.ndarray:
    """numpy counterpart of flux_triton.sampling.to_vae_latents (tested equal)."""
    return (latents / np.float32(scaling_factor) + np.float32(shift_factor)).astype(np.float32)


def to_uint8_image(decoded: np.ndarray) -> np.ndarray:
    """numpy counterpart of flux_triton.sampling.postprocess_uint8: [B, 3, H, W] in [-1, 1] ->
    uint8 [B, H, W, 3] (tested equal)."""
    image = np.clip(decoded.astype(np.float32) / 2 + 0.5, 0, 1)
    return np.round(image.transpose(0, 2, 3, 1) * 255).astype(np.uint8)


def bls_options(config: dict) -> BlsOptions:
    """flux_bls's options, from its model config (as `get_model_config(as_json=True)["config"]`)."""
    return read_options(BlsOptions, config)


def linear_renderer(options: BlsOptions):
    """preview latent [B, C, h, w] -> uint8 [B, h, w, 3], or None without a fitted projection."""
    if not options.preview_projection:
        return None
    projection = PreviewProjection.from_json(options.preview_projection)
    return lambda latent: preview_rgb(np.asarray(latent), projection)


def vae_inputs(latent: np.ndarray, options: BlsOptions) -> tuple[np.ndarray, str]:
    """What to send to `vae_decoder` to decode a preview latent: (latents, Triton type), in the
    type the repository serves the VAE in (a BF16 GPU repository's VAE takes BF16)."""
    latents = to_vae_latents(np.asarray(latent, dtype=np.float32), options.vae_scaling_factor,
                             options.vae_shift_factor)
    dtype = options.component_dtypes.get("vae_decoder", "FP32")
    if dtype == "BF16":
        import ml_dtypes  # tritonclient's BF16 arrays

        return latents.astype(ml_dtypes.bfloat16), dtype
    return latents.astype({"FP16": np.float16}.get(dtype, np.float32)), dtype
