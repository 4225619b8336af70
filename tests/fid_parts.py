"""Shared parts for the FID tests: a seeded random state dict with exactly pytorch-fid's Inception keys and
shapes (the published weights are not reachable here), saved with `torch.save` in both formats, and
pytorch-fid's own `InceptionV3([3])` loading such a file."""

from __future__ import annotations

import atexit
import contextlib
import functools
import math
import os
import shutil
import tempfile
from unittest import mock

import numpy as np
from PIL import Image


@contextlib.contextmanager
def _weights_from(path):
    """pytorch-fid's `fid_inception_v3()` reads its state dict from `path` instead of its release URL."""
    import pytorch_fid.inception as pytorch_inception
    import torch

    def load(url, progress=True):
        assert url == pytorch_inception.FID_WEIGHTS_URL
        return torch.load(path, map_location="cpu", weights_only=True)

    with mock.patch.object(pytorch_inception, "load_state_dict_from_url", load):
        yield


def fid_state_dict_template() -> dict:
    """The state dict pytorch-fid's FID Inception loads (keys, shapes, dtypes), without its weights."""
    import pytorch_fid.inception as pytorch_inception
    import torch

    with mock.patch.object(torch.nn.Module, "load_state_dict", lambda self, state_dict, *a, **k: None), \
            mock.patch.object(pytorch_inception, "load_state_dict_from_url", lambda *a, **k: {}):
        return pytorch_inception.fid_inception_v3().state_dict()


def random_state_dict(seed: int = 0) -> dict:
    """Seeded random weights of pytorch-fid's FID Inception, scaled so features stay O(0.1-1) through the net:
    He-normal convolutions, batch-norm statistics near the identity, small positive shifts (ReLU keeps half)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in fid_state_dict_template().items():
        shape = value.shape
        if key.endswith("conv.weight"):
            fan_in = math.prod(shape[1:])
            out[key] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        elif key.endswith("bn.weight") or key.endswith("bn.running_var"):
            out[key] = 0.8 + 0.4 * torch.rand(shape, generator=generator)
        elif key.endswith("bn.bias"):
            out[key] = 0.1 * torch.rand(shape, generator=generator)
        elif key.endswith("bn.running_mean"):
            out[key] = 0.1 * torch.randn(shape, generator=generator)
        elif key.startswith("fc."):
            out[key] = 0.01 * torch.randn(shape, generator=generator)
        else:  # num_batches_tracked
            out[key] = value.clone()
    return out


def save_weights(path, state_dict, legacy: bool) -> str:
    import torch

    torch.save(state_dict, str(path), _use_new_zipfile_serialization=not legacy)
    return str(path)


@functools.cache
def weights_files(seed: int = 0) -> dict[str, str]:
    """{"zip": path, "legacy": path}: `random_state_dict(seed)` saved in both formats, once per test session."""
    folder = tempfile.mkdtemp(prefix="jax_uncond_fid_weights_")
    atexit.register(shutil.rmtree, folder, True)
    state_dict = random_state_dict(seed)
    return {fmt: save_weights(os.path.join(folder, f"inception_{fmt}.pth"), state_dict, legacy=fmt == "legacy")
            for fmt in ("zip", "legacy")}


def pytorch_inception(weights_path, dims: int = 2048):
    """pytorch-fid's InceptionV3 (block 3: the FID network) with the weights of `weights_path`, in eval mode."""
    from pytorch_fid.inception import InceptionV3

    with _weights_from(weights_path):
        return InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[dims]]).eval()


@contextlib.contextmanager
def pytorch_fid_weights(weights_path):
    """Inside: pytorch-fid's functions (`calculate_fid_given_paths`, ...) build their network with these weights."""
    with _weights_from(weights_path):
        yield


def pytorch_features(model, images: np.ndarray) -> np.ndarray:
    """pytorch-fid's features of uint8 NHWC images, fed as its PNG path does (RGB, ToTensor: /255, CHW)."""
    import torch

    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    batch = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float().div(255)
    with torch.no_grad():
        return model(batch)[0].squeeze(3).squeeze(2).numpy()


def write_pngs(folder, images: np.ndarray, prefix: str = "img") -> str:
    """uint8 NHWC images as PNG files (grey when one channel)."""
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        pixels = image[..., 0] if image.shape[-1] == 1 else image
        Image.fromarray(pixels).save(os.path.join(folder, f"{prefix}_{i:04d}.png"))
    return str(folder)


def structured_images(n: int, size: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    """Smooth random images (gradients plus blobs), closer to photographs than uniform noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    out = np.empty((n, size, size, channels), np.uint8)
    for i in range(n):
        for c in range(channels):
            a, b, phase = rng.uniform(-1, 1, 3)
            cx, cy, r = rng.uniform(0.2, 0.8, 3)
            blob = ((x - cx) ** 2 + (y - cy) ** 2) < r * r / 4
            field = 0.5 + 0.3 * np.sin(3 * (a * x + b * y) + phase) + 0.4 * blob
            out[i, :, :, c] = np.clip(field * 255 + rng.normal(0, 8, field.shape), 0, 255).astype(np.uint8)
    return out
