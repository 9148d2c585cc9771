"""Cheap previews: a linear map from model-space latents to RGB, fitted to the model's own VAE at
export (`flux_triton.export.previews`). numpy only, so that clients need no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PreviewProjection:
    """RGB = latent-channel mix + bias, per latent pixel (one RGB pixel per 8x8 image block)."""

    factors: tuple[tuple[float, float, float], ...]  # [C][3]
    bias: tuple[float, float, float]

    def to_json(self) -> dict:
        return {"factors": [list(row) for row in self.factors], "bias": list(self.bias)}

    @classmethod
    def from_json(cls, data: dict) -> PreviewProjection:
        return cls(tuple(tuple(float(v) for v in row) for row in data["factors"]),
                   tuple(float(v) for v in data["bias"]))


def preview_rgb(preview_latent: np.ndarray, projection: PreviewProjection) -> np.ndarray:
    """[B, C, h, w] model-space latents -> uint8 [B, h, w, 3] preview."""
    factors = np.asarray(projection.factors, dtype=np.float32)
    bias = np.asarray(projection.bias, dtype=np.float32)
    rgb = np.einsum("bchw,cr->bhwr", np.asarray(preview_latent, dtype=np.float32), factors) + bias
    return np.round(np.clip(rgb / 2 + 0.5, 0, 1) * 255).astype(np.uint8)
