"""Fitting the preview map (flux_triton.preview.PreviewProjection) to a model's VAE, at export."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flux_triton.preview import PreviewProjection
from flux_triton.sampling import to_model_latents


def fit_preview_projection(
    encode: Callable[[torch.Tensor], torch.Tensor],
    vae_scale_factor: int,
    scaling_factor: float,
    shift_factor: float,
    samples: int = 16,
    size: int = 16,
    seed: int = 0,
) -> PreviewProjection:
    """Least-squares fit of model-space latent -> RGB on images of random colour blocks encoded by
    `encode` ([-1, 1] images -> VAE latents): the map a clean latent's colours come back through."""
    generator = torch.Generator("cpu").manual_seed(seed)
    block = 2 * vae_scale_factor  # each latent pixel lies inside one block of one colour
    colours = torch.rand(samples, 3, size // 2, size // 2, generator=generator) * 2 - 1
    images = colours.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)
    with torch.inference_mode():
        latents = to_model_latents(encode(images).float().cpu(), scaling_factor, shift_factor)
    target = torch.nn.functional.avg_pool2d(images, vae_scale_factor)  # [S, 3, size, size]
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = target.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float()
    factors = tuple(tuple(round(float(v), 6) for v in row) for row in solution[:-1])
    bias = tuple(round(float(v), 6) for v in solution[-1])
    return PreviewProjection(factors, bias)
