"""Image inputs as diffusers' FLUX pipelines prepare them: output sizes, resizing, normalisation,
masks, and Kontext's resolutions.

Images arrive as uint8 arrays [N, H, W, 3] (masks [N, H, W]); they become the PIL images a
diffusers user passes, and diffusers' own `VaeImageProcessor` resizes and normalises them, so a
served edit starts from the same tensor as `FluxImg2ImgPipeline`, `FluxInpaintPipeline` or
`FluxKontextPipeline` given those images.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from flux_triton import sampling
from flux_triton.model_info import FluxModelInfo

# FluxKontextPipeline's resolutions are for its default max_area, 1024**2.
KONTEXT_REFERENCE_AREA = 1024**2


def default_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """An image's size rounded down to `multiple` (VaeImageProcessor.get_default_height_width):
    the output size when a request gives none."""
    return height - height % multiple, width - width % multiple


def kontext_output_size(height: int, width: int, max_area: int, multiple: int) -> tuple[int, int]:
    """FluxKontextPipeline's output size: the aspect of `height` x `width` at `max_area` pixels,
    rounded down to `multiple`."""
    aspect = width / height
    out_w = round((max_area * aspect) ** 0.5)
    out_h = round((max_area / aspect) ** 0.5)
    return out_h // multiple * multiple, out_w // multiple * multiple


@lru_cache(maxsize=8)
def kontext_resolutions(max_area: int) -> tuple[tuple[int, int], ...]:
    """The (width, height) pairs a Kontext reference image is resized to: diffusers'
    PREFERRED_KONTEXT_RESOLUTIONS, scaled by the side of `max_area` (those themselves at
    1024**2; a tiny test model with a smaller max_area gets the same aspects, smaller)."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    if max_area == KONTEXT_REFERENCE_AREA:
        return tuple(PREFERRED_KONTEXT_RESOLUTIONS)
    scale = math.sqrt(max_area / KONTEXT_REFERENCE_AREA)
    return tuple((round(w * scale), round(h * scale)) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)


def kontext_reference_size(height: int, width: int, max_area: int, multiple: int) -> tuple[int, int]:
    """The size a Kontext reference image of `height` x `width` is resized to: the preferred
    resolution nearest its aspect, rounded down to `multiple` (FluxKontextPipeline with
    `_auto_resize`)."""
    height, width = default_size(height, width, multiple)
    aspect = width / height
    _, ref_w, ref_h = min((abs(aspect - w / h), w, h) for w, h in kontext_resolutions(max_area))
    return ref_h // multiple * multiple, ref_w // multiple * multiple


def _processor(info: FluxModelInfo, mask: bool = False):
    from diffusers.image_processor import VaeImageProcessor

    if mask:
        return VaeImageProcessor(vae_scale_factor=info.spatial_multiple,
                                 vae_latent_channels=info.latent_channels, do_normalize=False,
                                 do_binarize=True, do_convert_grayscale=True)
    return VaeImageProcessor(vae_scale_factor=info.spatial_multiple,
                             vae_latent_channels=info.latent_channels)


def _pil_images(arrays: np.ndarray) -> list:
    from PIL import Image

    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]


def image_pixels(images: np.ndarray, height: int, width: int, info: FluxModelInfo) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> float32 [N, 3, height, width] in [-1, 1], resized (Lanczos)
    where the size differs, as the image-to-image and inpainting pipelines preprocess them."""
    return _processor(info).preprocess(_pil_images(images), height=height, width=width).float()


def reference_pixels(images: np.ndarray, info: FluxModelInfo) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> float32 [N, 3, h, w] in [-1, 1] at the Kontext reference size
    of the first image (FluxKontextPipeline resizes every image to it)."""
    height, width = kontext_reference_size(images.shape[1], images.shape[2], info.max_area,
                                           info.spatial_multiple)
    return _processor(info).preprocess(_pil_images(images), height=height, width=width).float()


# Flux2Pipeline's and Flux2KleinPipeline's limits on a reference image (check_image_input) and the
# area a larger one is resized to.
FLUX2_MIN_SIDE = 64
FLUX2_MAX_ASPECT = 8
FLUX2_REFERENCE_AREA = 1024 * 1024


def flux2_reference_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The size a FLUX.2 reference image of `height` x `width` is encoded at: resized to 1024**2
    pixels if larger (keeping its aspect), then cropped to `multiple`; also the output's default
    size for the first reference image."""
    if width * height > FLUX2_REFERENCE_AREA:
        scale = math.sqrt(FLUX2_REFERENCE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return default_size(height, width, multiple)


def flux2_reference_pixels(images: np.ndarray, info: FluxModelInfo) -> torch.Tensor:
    """uint8 images [N, H, W, 3] -> float32 [N, 3, h, w] in [-1, 1] as the FLUX.2 pipelines
    prepare reference images: Lanczos-resized to 1024**2 pixels when larger, then center-cropped
    to a multiple of 16 (Flux2ImageProcessor)."""
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    processor = Flux2ImageProcessor(vae_scale_factor=info.spatial_multiple)
    pixels = []
    for image in _pil_images(images):
        if image.width * image.height > FLUX2_REFERENCE_AREA:
            image = processor._resize_to_target_area(image, FLUX2_REFERENCE_AREA)
        height, width = default_size(image.height, image.width, info.spatial_multiple)
        pixels.append(processor.preprocess(image, height=height, width=width, resize_mode="crop"))
    return torch.cat(pixels).float()


def mask_pixels(masks: np.ndarray, height: int, width: int, info: FluxModelInfo) -> torch.Tensor:
    """uint8 masks [M, H, W] (255 repaint) -> float32 [M, 1, height, width] of 0 and 1, resized and
    binarised at one half as FluxInpaintPipeline's mask processor does."""
    return _processor(info, mask=True).preprocess(_pil_images(masks), height=height, width=width)


def repeat_images(latents: torch.Tensor, batch: int) -> torch.Tensor:
    """Image latents [N, ...] for `batch` rows, as the FLUX image pipelines expand them: the N
    images repeated whole (image 0, 1, 0, 1, ...), the order diffusers uses."""
    if batch % latents.shape[0]:
        raise ValueError(f"cannot spread {latents.shape[0]} images over {batch} rows")
    return torch.cat([latents] * (batch // latents.shape[0]), dim=0)


def packed_mask(mask: torch.Tensor, latent_height: int, latent_width: int, batch: int,
                channels: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A [M, 1, H, W] mask as the packed latent mask [B, S, C*4] the inpainting loop blends with
    (FluxInpaintPipeline.prepare_mask_latents: nearest resize, repeat, pack)."""
    mask = torch.nn.functional.interpolate(mask, size=(latent_height, latent_width))
    mask = mask.to(device=device, dtype=dtype)
    if mask.shape[0] < batch:
        mask = mask.repeat(batch // mask.shape[0], 1, 1, 1)
    return sampling.pack_latents(mask.repeat(1, channels, 1, 1))
