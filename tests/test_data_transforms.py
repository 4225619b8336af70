"""Transforms against independent references: PIL (what torchvision's Resize runs on PIL images) + torch
for the 8-bit path, torch's antialiased interpolate (what torchvision's Resize runs on tensors) for
--preserve_input_precision. torchvision itself is not importable beside the CPU torch here (its PyPI
wheel's C ops do not load), so the references are written out from its documented semantics."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from jax_uncond.data.transforms import TransformSpec, decode_image, transform_image

RES = 16


def _image(mode, width, height, seed=0):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    if mode == "P":
        return rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    return rgb.convert(mode)


def _torchvision_size(width, height, size):
    short, long = sorted((width, height))
    new_long = int(size * long / short)
    return (size, new_long) if width <= height else (new_long, size)


def _center(tensor_chw, size):
    _, h, w = tensor_chw.shape
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return tensor_chw[:, top:top + size, left:left + size]


def reference_8bit(image, size):
    """Resize (PIL bilinear) -> CenterCrop -> ToTensor -> Normalize, as torchvision composes them."""
    image = image.convert("RGB")
    new = _torchvision_size(*image.size, size)
    if new != image.size:
        image = image.resize(new, Image.BILINEAR)
    tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1).float().div(255)
    return ((_center(tensor, size) - 0.5) / 0.5).numpy()


def reference_precise(image, size):
    """PILToTensor -> 3 channels -> ConvertImageDtype -> Resize(antialias) -> CenterCrop -> Normalize."""
    if image.mode == "P":
        image = image.convert("RGB")
    array = np.array(image)
    tensor = torch.from_numpy(array.astype(np.int64) if array.dtype == np.uint16 else array)
    tensor = tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
    channels = tensor.shape[0]
    if channels == 1:
        tensor = tensor.repeat(3, 1, 1)
    elif channels == 2:
        tensor = torch.cat([tensor, tensor[:1]])
    else:
        tensor = tensor[:3]
    tensor = tensor.float() / float(np.iinfo(array.dtype).max)
    new_w, new_h = _torchvision_size(image.size[0], image.size[1], size)
    if (new_w, new_h) != image.size:
        tensor = F.interpolate(tensor[None], size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=True)[0]
    return ((_center(tensor, size) - 0.5) / 0.5).numpy()


SIZES = [(40, 50), (50, 40), (RES, RES), (5, 7), (16, 33)]


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "CMYK", "LA", "I;16", "1"])
@pytest.mark.parametrize("width,height", SIZES)
def test_8bit_path_matches_reference(mode, width, height):
    image = _image(mode, width, height)
    out = transform_image(image, TransformSpec(RES, center_crop=True), np.random.default_rng(0))
    assert out.shape == (3, RES, RES) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_8bit(image, RES), atol=1 / 255, rtol=0)
    assert out.min() >= -1 and out.max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "RGBA", "LA", "I;16"])
@pytest.mark.parametrize("width,height", SIZES)
def test_preserve_precision_matches_reference(mode, width, height):
    image = _image(mode, width, height)
    out = transform_image(image, TransformSpec(RES, center_crop=True, preserve_input_precision=True),
                          np.random.default_rng(0))
    assert out.shape == (3, RES, RES) and out.dtype == np.float32
    np.testing.assert_allclose(out, reference_precise(image, RES), atol=1e-4, rtol=0)


def test_preserve_precision_keeps_16_bit_levels():
    ramp = np.linspace(0, 65535, RES * RES).astype(np.uint16).reshape(RES, RES)
    spec = TransformSpec(RES, center_crop=True, preserve_input_precision=True)
    out = transform_image(Image.fromarray(ramp), spec, np.random.default_rng(0))
    assert len(np.unique(out[0])) == RES * RES  # 8 bits would leave at most 256 levels
    np.testing.assert_allclose(out[0], ramp / 65535 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(out[0], out[1])  # one channel repeated


def test_two_channel_and_four_channel_mapping():
    la = _image("LA", RES, RES)
    out = transform_image(la, TransformSpec(RES, center_crop=True, preserve_input_precision=True),
                          np.random.default_rng(0))
    np.testing.assert_array_equal(out[0], out[2])  # [c0, c1, c0]
    assert not np.array_equal(out[0], out[1])
    rgba = _image("RGBA", RES, RES)
    out = transform_image(rgba, TransformSpec(RES, center_crop=True, preserve_input_precision=True),
                          np.random.default_rng(0))
    np.testing.assert_allclose(out, reference_8bit(rgba, RES), atol=1e-6)  # alpha dropped


def test_random_crop_and_flip_come_from_the_generator():
    image = _image("RGB", 30, 20)
    spec = TransformSpec(RES, random_flip=True)
    first = transform_image(image, spec, np.random.default_rng([0, 1, 2]))
    np.testing.assert_array_equal(first, transform_image(image, spec, np.random.default_rng([0, 1, 2])))
    full = np.array(image.resize((24, RES), Image.BILINEAR), dtype=np.float32).transpose(2, 0, 1) / 255 * 2 - 1
    windows = {(left, flip) for left in range(24 - RES + 1) for flip in (False, True)}
    outs = [transform_image(image, spec, np.random.default_rng([0, 0, i])) for i in range(40)]
    seen = set()
    for out in outs:
        for left, flip in windows:
            crop = full[:, :, left:left + RES]
            if np.allclose(out, crop[:, :, ::-1] if flip else crop, atol=1e-6):
                seen.add((left, flip))
    assert len(seen) > 4 and {f for _, f in seen} == {False, True}


def test_decode_accepts_every_record_kind(tmp_path):
    image = _image("RGB", 9, 7)
    path = tmp_path / "a.png"
    image.save(path)
    as_bytes = path.read_bytes()
    for record in (image, str(path), as_bytes, {"bytes": as_bytes, "path": None}, {"bytes": None, "path": str(path)},
                   np.array(image)):
        np.testing.assert_array_equal(np.array(decode_image(record).convert("RGB")), np.array(image))
