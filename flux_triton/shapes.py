"""A procedural shapes world for training a tiny default model, and a pixel classifier to score it.

Images show one shape (circle, square, triangle) in one colour on a background of another colour,
captioned "a {colour} {shape} on a {colour} background". `classify` reads the three attributes back
from pixels, so generated images can be scored against their captions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every caption of the world: 3 shapes x 8 colours x 7 other background colours = 168."""
    return [Scene(s, c, b) for s in SHAPES for c in PALETTE for b in PALETTE if b != c]


def render(scene: Scene, size: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: the scene at a random position and scale, anti-aliased."""
    big = size * SUPERSAMPLE
    half = rng.uniform(0.2, 0.34) * big
    cx, cy = (rng.uniform(half + 1, big - half - 1) for _ in range(2))
    y, x = np.mgrid[0:big, 0:big] + 0.5
    if scene.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif scene.shape == "square":
        inside = (np.abs(x - cx) <= half * 0.89) & (np.abs(y - cy) <= half * 0.89)
    else:  # upright isosceles triangle inscribed in the same box
        top, bottom = cy - half, cy + half
        rel = (y - top) / (bottom - top)
        inside = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= rel * half)
    image = np.where(inside[..., None], PALETTE[scene.colour], PALETTE[scene.background])
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return image.round().astype(np.uint8)


def _nearest(rgb: np.ndarray) -> str:
    names = list(PALETTE)
    distances = [np.linalg.norm(rgb - np.array(PALETTE[n], dtype=float)) for n in names]
    return names[int(np.argmin(distances))]


def classify(image: np.ndarray) -> Scene | None:
    """Read shape, colour and background back from an image; None if no shape stands out."""
    pixels = image.astype(float)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    background_rgb = np.median(border, axis=0)
    distance = np.linalg.norm(pixels - background_rgb, axis=-1)
    mask = distance > 0.5 * distance.max() if distance.max() > 40 else None
    if mask is None or mask.sum() < 4:
        return None
    rows, cols = np.nonzero(mask)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    fill = mask.sum() / box
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    colour = _nearest(np.median(pixels[mask], axis=0))
    return Scene(shape, colour, _nearest(background_rgb))


def accuracy(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    """Share of images whose shape, colour and background match their scene."""
    found = [classify(image) for image in images]
    n = len(scenes)
    return {
        field: sum(f is not None and getattr(f, field) == getattr(s, field)
                   for f, s in zip(found, scenes)) / n
        for field in ("shape", "colour", "background")
    }
