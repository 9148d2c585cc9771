"""A procedural shapes world for training a tiny default model, and a pixel classifier to score it.

Images show one shape (circle, square, triangle) in one colour on a background of another colour,
captioned "a {colour} {shape} on a {colour} background". `classify` reads the three attributes back
from pixels, so generated images can be scored against their captions. Shapes may also be drawn as
outlines (same captions): what the `outline` LoRA adapter of the default model teaches it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import numpy as np
import torch

PALETTE = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "purple": (140, 50, 170), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4
OUTLINE_HOLE = 0.65  # an outline is the shape less the same shape scaled by this, about its centre


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    outline: bool = False  # drawn as an outline (the caption does not say)

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every caption of the world: 3 shapes x 8 colours x 7 other background colours = 168."""
    return [Scene(s, c, b) for s in SHAPES for c in PALETTE for b in PALETTE if b != c]


def scene_index(scenes: list[Scene]) -> torch.Tensor:
    """[B, 3] long tensor of (shape, colour, background) indices into SHAPES and PALETTE."""
    colours = list(PALETTE)
    return torch.tensor([[SHAPES.index(s.shape), colours.index(s.colour), colours.index(s.background)]
                         for s in scenes], dtype=torch.long)


@functools.cache
def palette_tensor(device: torch.device) -> torch.Tensor:
    """[8, 3] colours, made once per device (a host-to-device copy per batch would stall it)."""
    return torch.tensor(list(PALETTE.values()), dtype=torch.float32, device=device)


def render_batch(index: torch.Tensor, size: int, generator: torch.Generator,
                 outline: bool = False) -> torch.Tensor:
    """float32 [B, 3, size, size] in 0..255: each scene of `index` (see `scene_index`) at a random
    position and scale, anti-aliased by supersampling, filled or as outlines. Runs on the
    generator's device."""
    device = generator.device
    index = index.to(device)
    batch, big = index.shape[0], size * SUPERSAMPLE
    uniform = torch.rand(batch, 3, generator=generator, device=device)
    half = (0.2 + 0.14 * uniform[:, 0]) * big
    cx, cy = ((half + 1) + uniform[:, k] * (big - 2 * half - 2) for k in (1, 2))
    half, cx, cy = (v.view(batch, 1, 1) for v in (half, cx, cy))
    grid = torch.arange(big, device=device, dtype=torch.float32) + 0.5
    y, x = grid.view(1, big, 1), grid.view(1, 1, big)
    shape = index[:, 0].view(batch, 1, 1)
    inside = _inside(shape, x, y, cx, cy, half)
    if outline:
        inside &= ~_inside(shape, x, y, cx, cy, half * OUTLINE_HOLE)
    palette = palette_tensor(device)
    colour = palette[index[:, 1]].view(batch, 3, 1, 1)
    background = palette[index[:, 2]].view(batch, 3, 1, 1)
    image = torch.where(inside.unsqueeze(1), colour, background)
    return torch.nn.functional.avg_pool2d(image, SUPERSAMPLE)


def _inside(shape, x, y, cx, cy, half) -> torch.Tensor:
    """Which supersampled pixels lie inside each image's shape (0 circle, 1 square, 2 triangle)."""
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    square = ((x - cx).abs() <= half * 0.89) & ((y - cy).abs() <= half * 0.89)
    rel = (y - (cy - half)) / (2 * half)  # 0 at the apex, 1 at the base of an upright triangle
    triangle = (y >= cy - half) & (y <= cy + half) & ((x - cx).abs() <= rel * half)
    return torch.where(shape == 0, circle, torch.where(shape == 1, square, triangle))


def render(scene: Scene, size: int, generator: torch.Generator) -> np.ndarray:
    """uint8 [size, size, 3]: one scene drawn by `render_batch`."""
    image = render_batch(scene_index([scene]), size, generator, scene.outline)[0]
    return image.permute(1, 2, 0).round().to(torch.uint8).cpu().numpy()


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
    top, left = rows.min(), cols.min()
    height, width = rows.max() - top + 1, cols.max() - left + 1
    # An outline leaves its centre (the middle fifth of its box each way) in the background colour.
    centre = mask[top + 2 * height // 5:top + 3 * height // 5 + 1,
                  left + 2 * width // 5:left + 3 * width // 5 + 1]
    outline = bool(centre.size and centre.mean() < 0.5)
    shape_mask = _filled_rows(mask) if outline else mask
    fill = shape_mask.sum() / (height * width)
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    colour = _nearest(np.median(pixels[mask], axis=0))
    return Scene(shape, colour, _nearest(background_rgb), outline)


def _filled_rows(mask: np.ndarray) -> np.ndarray:
    """`mask` with each row filled between its first and last pixel (the shapes are convex)."""
    filled = np.zeros_like(mask)
    for row in np.nonzero(mask.any(axis=1))[0]:
        cols = np.nonzero(mask[row])[0]
        filled[row, cols[0]:cols[-1] + 1] = True
    return filled


def classifier_check(size: int, copies: int = 2, outline: bool = False) -> dict[str, float]:
    """The classifier's accuracy on ground-truth renders of every caption at `size` (as outlines)."""
    generator = torch.Generator().manual_seed(0)
    scenes = [replace(scene, outline=outline) for scene in all_scenes()] * copies
    return accuracy([render(scene, size, generator) for scene in scenes], scenes)


def accuracy(images: list[np.ndarray], scenes: list[Scene]) -> dict[str, float]:
    """Share of images whose shape, colour, background and outline match their scene."""
    found = [classify(image) for image in images]
    n = len(scenes)
    return {
        field: sum(f is not None and getattr(f, field) == getattr(s, field)
                   for f, s in zip(found, scenes)) / n
        for field in ("shape", "colour", "background", "outline")
    }
