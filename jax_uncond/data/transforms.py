"""Decode one image and turn it into a training example, exactly as diffusers' script does.

The 8-bit path is torchvision's `Resize(resolution, BILINEAR)`, `CenterCrop`/`RandomCrop`,
`RandomHorizontalFlip`, `ToTensor`, `Normalize([0.5], [0.5])` on `image.convert("RGB")` (torchvision
resizes PIL images with PIL, so PIL is used here too). `--preserve_input_precision` follows the
script's tensor path: keep the source's bit depth, map 1/2/>3 channels to 3, scale to [0, 1], then
resize with antialiased bilinear filtering in float32. Randomness comes from the generator passed in.
EXIF orientation is applied as `datasets`' Image feature does (the PyTorch script decodes through it).
"""

from __future__ import annotations

import dataclasses
import io
import struct
from typing import Any

import numpy as np
from PIL import Image, ImageOps

BAD_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)
"""What PIL raises for a corrupt, truncated or non-image file (UnidentifiedImageError is an OSError);
ImageTooLargeError is a ValueError."""
MIN_PIXEL_LIMIT = 8000 * 8000
"""64 megapixels: more than a camera photo (bar medium format), far more than a resolution up to 2000 needs."""


class ImageTooLargeError(ValueError):
    """An image declares more pixels than training at the resolution needs: refused before decoding."""


def pixel_limit(resolution: int) -> int:
    """The most pixels an image may declare, and be resized to, at `resolution` before it is refused as
    a decompression bomb: 64 megapixels, or 16 x resolution^2 when that is more; never above PIL's own
    MAX_IMAGE_PIXELS, so PIL's DecompressionBombWarning never fires on an image that is decoded."""
    return min(max(MIN_PIXEL_LIMIT, 16 * resolution * resolution), Image.MAX_IMAGE_PIXELS or MIN_PIXEL_LIMIT)


def check_image_size(image: Image.Image, resolution: int) -> None:
    """Raises ImageTooLargeError (reading the header only) when decoding `image`, or resizing it to
    `resolution` (a 1 x 100000 strip becomes 8 x 800000 at 8), would exceed `pixel_limit`."""
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageTooLargeError(f"the image declares a size of {width} x {height}")
    limit = pixel_limit(resolution)
    new_width, new_height = _resized_size(width, height, resolution)
    if max(width * height, new_width * new_height) > limit:
        raise ImageTooLargeError(f"the image declares {width} x {height} pixels (resized: {new_width} x "
                                 f"{new_height}), more than the limit of {limit} at resolution {resolution}")


@dataclasses.dataclass(frozen=True)
class TransformSpec:
    """The augmentation flags of the training script."""

    resolution: int
    center_crop: bool = False
    random_flip: bool = False
    preserve_input_precision: bool = False


def decode_image(record: Any, resolution: int | None = None) -> Image.Image:
    """A PIL image from what a source holds: a PIL image, a path, bytes, a `datasets` Image dict, or an array.

    An encoded image is decoded now, so a truncated file fails here and not later; with `resolution`,
    one too large for it (`check_image_size`) is refused from its header, before decoding.
    """
    if isinstance(record, Image.Image):
        return record
    if isinstance(record, dict):  # datasets' Image(decode=False): {"bytes": ..., "path": ...}
        record = record["bytes"] if record.get("bytes") is not None else record["path"]
    if isinstance(record, (bytes, bytearray, memoryview)):
        image = Image.open(io.BytesIO(record))
    elif isinstance(record, str):
        image = Image.open(record)
    else:
        return Image.fromarray(_storable(np.asarray(record)))
    if resolution is not None:
        check_image_size(image, resolution)
    image.load()
    if image.getexif().get(Image.ExifTags.Base.Orientation) is not None:
        image = ImageOps.exif_transpose(image)
    return image


def _storable(array: np.ndarray) -> np.ndarray:
    """An HW or HWC pixel array as PIL takes it: integers (e.g. nested lists read as int64) as uint8/uint16."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if np.issubdtype(array.dtype, np.integer) and array.dtype not in (np.uint8, np.uint16):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535 or (high > 255 and array.ndim == 3):
            raise ValueError(f"pixel values in [{low}, {high}] fit neither 8 nor 16 bits per channel")
        array = array.astype(np.uint8 if high <= 255 else np.uint16)
    return array


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    """torchvision's `Resize(int)` output size: the shorter side becomes `size`, the longer is truncated."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = size, int(size * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _crop_box(height: int, width: int, spec: TransformSpec, rng: np.random.Generator | None) -> tuple[int, int]:
    """Top-left corner of the square crop: torchvision's CenterCrop rounding, or RandomCrop's uniform draw."""
    size = spec.resolution
    if spec.center_crop:
        return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def resized_rgb(image: Image.Image, resolution: int) -> np.ndarray:
    """The 8-bit path's deterministic start: RGB, the shorter side resized to `resolution` (bilinear), as HWC uint8."""
    image = image.convert("RGB")
    new_size = _resized_size(image.width, image.height, resolution)
    if new_size != image.size:
        image = image.resize(new_size, Image.BILINEAR)
    return np.asarray(image)


def center_cropped(array: np.ndarray, resolution: int) -> np.ndarray:
    """The `--center_crop` square of an HWC array whose shorter side is `resolution`."""
    top, left = _crop_box(*array.shape[:2], TransformSpec(resolution, center_crop=True), None)
    return array[top : top + resolution, left : left + resolution]


def _to_three_channels(array: np.ndarray) -> np.ndarray:
    """diffusers' `_ensure_three_channels` on an HWC array: 1 -> repeated, 2 -> [c0, c1, c0], >3 -> first 3."""
    if array.ndim == 2:
        array = array[..., None]
    channels = array.shape[-1]
    if channels == 1:
        return np.repeat(array, 3, axis=-1)
    if channels == 2:
        return np.concatenate([array, array[..., :1]], axis=-1)
    return array[..., :3]


def _to_unit_float(array: np.ndarray) -> np.ndarray:
    """torchvision's ConvertImageDtype(float32): integers divided by their dtype's maximum, floats kept."""
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / np.float32(np.iinfo(array.dtype).max)
    return array.astype(np.float32)


def _resize_float(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize of an HWC float32 array, per channel (PIL's float filter = torch's antialias)."""
    channels = [Image.fromarray(np.ascontiguousarray(array[..., c], dtype=np.float32)).resize(size, Image.BILINEAR)
                for c in range(array.shape[-1])]
    return np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=-1)


def transform_image(image: Image.Image, spec: TransformSpec, rng: np.random.Generator) -> np.ndarray:
    """One training example: (3, resolution, resolution) float32 in [-1, 1]."""
    size = spec.resolution
    if spec.preserve_input_precision:
        if image.mode == "P":
            image = image.convert("RGB")
        array = _to_unit_float(_to_three_channels(np.asarray(image)))
        height, width = array.shape[:2]
        new_size = _resized_size(width, height, size)
        if new_size != (width, height):
            array = _resize_float(array, new_size)
    else:
        array = resized_rgb(image, size)
    height, width = array.shape[:2]
    top, left = _crop_box(height, width, spec, rng)
    array = array[top : top + size, left : left + size]
    if spec.random_flip and rng.random() < 0.5:
        array = array[:, ::-1]
    if not spec.preserve_input_precision:
        array = array.astype(np.float32) / np.float32(255)
    array = (array - np.float32(0.5)) / np.float32(0.5)
    return np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32)
