"""Image and mask files as `flux_bls` inputs, decoded the one way the gateway and the gRPC client
share: Pillow, a few formats, the pixel count checked before any pixel is decoded.

An image becomes RGB uint8 [H, W, 3]: EXIF orientation applied, palette, grey, CMYK and alpha
images converted as `PIL.Image.convert("RGB")` does (alpha dropped, as diffusers' `load_image`),
16-bit grey scaled to 8 bits, the first frame of an animation. A mask becomes uint8 [H, W], 255 =
repaint, 0 = keep, read one of two ways:

- with transparency (RGBA, LA, a palette or grey PNG with a transparent colour), OpenAI's
  convention: the transparent pixels are the ones to edit, mask = 255 − alpha (the server
  binarises at one half). A mask whose alpha is opaque everywhere carries no transparency and is
  read by its colour instead.
- without (L, RGB, 1-bit), this server's convention: its grey level, white 255 = repaint.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps

# What a browser or an image editor writes; no format whose decoder runs other programs (EPS) or
# is rarely exercised. Checked by content, never by the file name.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
MAX_IMAGE_PIXELS = 4096 * 4096  # refused before decoding: a decompression bomb never allocates
MAX_FILE_BYTES = 16 * 1024 * 1024


class ImageFileError(ValueError):
    """A file that cannot be an image or mask of a request; `field` names which input it was."""

    def __init__(self, field: str, message: str):
        super().__init__(f"`{field}`: {message}")
        self.field = field


def _open(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The first frame of `data`, decoded, oriented by its EXIF tag; ImageFileError otherwise."""
    if len(data) > MAX_FILE_BYTES:
        raise ImageFileError(field, f"the file is {len(data)} bytes, over {MAX_FILE_BYTES}")
    if not data:
        raise ImageFileError(field, "the file is empty")
    try:
        picture = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:  # Pillow's own, far larger, limit
        raise ImageFileError(field, f"declares too many pixels ({exc})") from None
    except Exception:  # noqa: BLE001 - anything Pillow cannot identify
        raise ImageFileError(field, f"is not an image in a supported format ({', '.join(FORMATS)})"
                             ) from None
    width, height = picture.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise ImageFileError(field, f"declares {width} x {height} pixels; at most {max_pixels} "
                             "pixels are decoded")
    try:
        picture.seek(0)  # an animation: its first frame
        picture.load()
        return ImageOps.exif_transpose(picture)
    except Exception as exc:  # noqa: BLE001 - a truncated or corrupt file, whatever the decoder says
        raise ImageFileError(field, f"is corrupt or truncated ({picture.format}: {exc})") from None


def _eight_bit(picture: Image.Image) -> Image.Image:
    """16- and 32-bit grey (PNG's 16-bit grey) as 8-bit grey; other modes unchanged."""
    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        values = np.asarray(picture).astype(np.int64)
        return Image.fromarray((np.clip(values, 0, 65535) >> 8).astype(np.uint8), "L")
    return picture


def decode_image(data: bytes, field: str = "image", max_pixels: int = MAX_IMAGE_PIXELS
                 ) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3]."""
    picture = _eight_bit(_open(data, field, max_pixels))
    return np.asarray(picture.convert("RGB"), dtype=np.uint8)


def decode_mask(data: bytes, field: str = "mask", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """A mask file as uint8 [H, W], 255 = repaint (see the module's conventions)."""
    picture = _eight_bit(_open(data, field, max_pixels))
    if picture.mode == "P" or "transparency" in picture.info:
        picture = picture.convert("RGBA")  # a palette's or a grey PNG's transparent colour
    if picture.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        alpha = np.asarray(picture.getchannel("A"), dtype=np.uint8)
        if alpha.min() < 255:
            return 255 - alpha
    return np.asarray(picture.convert("L"), dtype=np.uint8)


def edit_inputs(images: list[bytes], mask: bytes | None = None,
                max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """Image files and an optional mask file as `flux_bls`'s `image` uint8 [N, H, W, 3] and
    `mask` uint8 [1, H, W]: the images of one size, the mask of theirs."""
    if not images:
        raise ImageFileError("image", "no image file was sent")
    arrays = [decode_image(data, "image", max_pixels) for data in images]
    height, width = arrays[0].shape[:2]
    for array in arrays[1:]:
        if array.shape[:2] != (height, width):
            raise ImageFileError("image", f"all images must have one size; the first is {width} x "
                                 f"{height}, another {array.shape[1]} x {array.shape[0]}")
    if mask is None:
        return np.stack(arrays), None
    mask_array = decode_mask(mask, "mask", max_pixels)
    if mask_array.shape != (height, width):
        raise ImageFileError("mask", f"must have the image's size {width} x {height}, got "
                             f"{mask_array.shape[1]} x {mask_array.shape[0]}")
    return np.stack(arrays), mask_array[None]
