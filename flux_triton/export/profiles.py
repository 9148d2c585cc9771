"""Axis ranges for every symbolic dim of the specs, from one config file (engine_config.json beside
this module)."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from flux_triton.images import FLUX2_REFERENCE_AREA
from flux_triton.model_info import FluxModelInfo
from flux_triton.serving_config import ServingLimits
from flux_triton.specs import ALL_NETWORKS, ComponentSpec

ENGINE_CONFIG = Path(__file__).resolve().parent / "engine_config.json"
PRECISIONS = ("FP32", "TF32", "FP16", "BF16", "FP8")  # the serving precisions' spelling, and TF32


@dataclass(frozen=True)
class AxisRange:
    min: int
    opt: int
    max: int

    def __post_init__(self):
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"axis range must satisfy 1 <= min <= opt <= max, got {self}")


@dataclass(frozen=True)
class EngineConfig:
    axes: dict[str, AxisRange]
    precision: dict[str, str]
    workspace_gib: int
    builder_optimization_level: int
    weight_streaming: bool = False
    refit: bool = False
    reference_images: int = 1  # FLUX.2: reference images of the largest size the DiT's range holds

    def serving_limits(self, limits: ServingLimits, info: FluxModelInfo) -> ServingLimits:
        """`limits` narrowed to what the plans take: a request outside their ranges is refused
        naming its field, not failed inside TensorRT."""
        narrowed = replace(limits, max_height=min(limits.max_height, self.axes["H"].max),
                           max_width=min(limits.max_width, self.axes["W"].max),
                           max_batch=min(limits.max_batch, self.axes["B"].max))
        if info.is_flux2:
            narrowed = replace(narrowed, max_reference_images=min(limits.max_reference_images,
                                                                  self.reference_images))
        return narrowed

    def profile(self, spec: ComponentSpec) -> dict[str, tuple[tuple[int, ...], ...]]:
        """TensorRT min/opt/max shapes of every input of a component."""
        shapes = {}
        for tensor in spec.inputs:
            shapes[tensor.name] = tuple(
                tuple(d if isinstance(d, int) else getattr(self.axes[d], level) for d in tensor.dims)
                for level in ("min", "opt", "max")
            )
        return shapes


def load_engine_config(info: FluxModelInfo, path: str | Path = ENGINE_CONFIG) -> EngineConfig:
    """Read the engine config and derive the range of every symbolic axis for this model."""
    raw = json.loads(Path(path).read_text())
    batch, text = (AxisRange(**raw[k]) for k in ("batch", "text_length"))
    height, width = AxisRange(**raw["height"]), AxisRange(**raw["width"])
    multiple = info.spatial_multiple
    for name, axis in (("height", height), ("width", width)):
        if any(v % multiple for v in (axis.min, axis.opt, axis.max)):
            raise ValueError(f"{path}: every `{name}` value must be a multiple of {multiple}, got {axis}")
    if text.max > info.max_text_length:
        raise ValueError(f"{path}: `text_length.max` must be <= {info.max_text_length}, got {text.max}")
    for component, precision in raw["precision"].items():
        if precision not in PRECISIONS:
            raise ValueError(f"{path}: precision of {component} must be one of {PRECISIONS}")
    # one file for both families: FLUX.1's networks and FLUX.2's text encoder
    if sorted(raw["precision"]) != sorted(ALL_NETWORKS):
        raise ValueError(f"{path}: `precision` must give one for each of {list(ALL_NETWORKS)} and no "
                         f"other, got {sorted(raw['precision'])}")
    scale = info.vae_scale_factor

    def latent(axis: AxisRange, f: int) -> AxisRange:
        return AxisRange(axis.min // f, axis.opt // f, axis.max // f)

    tokens = AxisRange(*(getattr(height, k) // multiple * getattr(width, k) // multiple
                         for k in ("min", "opt", "max")))
    references = int(raw.get("reference_images", 1))
    if references < 1:
        raise ValueError(f"{path}: `reference_images` must be >= 1, got {references}")
    if info.is_flux2:  # each reference image adds its tokens (at most a megapixel's) to the sequence
        largest = min(tokens.max, FLUX2_REFERENCE_AREA // multiple**2)
        tokens = AxisRange(tokens.min, 2 * tokens.opt, tokens.max + references * largest)
    elif info.kontext:  # a Kontext edit adds its one reference image's tokens
        tokens = AxisRange(tokens.min, 2 * tokens.opt, 2 * tokens.max)
    axes = {
        "B": batch, "N": batch, "S_txt": text, "S_img": tokens,
        "H_lat": latent(height, scale), "W_lat": latent(width, scale), "H": height, "W": width,
        "H_tok": latent(height, multiple), "W_tok": latent(width, multiple),
    }
    return EngineConfig(axes, dict(raw["precision"]), int(raw["workspace_gib"]),
                        int(raw["builder_optimization_level"]),
                        bool(raw.get("weight_streaming", False)), bool(raw.get("refit", False)),
                        references)
