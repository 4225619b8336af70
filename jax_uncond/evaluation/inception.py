"""The Inception-v3 that FID is defined with, in Flax: pytorch-fid's `InceptionV3([3])` (`use_fid_inception`).

That network is torchvision's Inception-v3 with the blocks of TensorFlow's 2015 FID graph: average pools
that do not count the zero padding (`FIDInceptionA/C/E_1`) and a max pool in the last block
(`FIDInceptionE_2`). It returns the 2048 pool3 features (or, as pytorch-fid's `--dims`, an earlier
block's). Module names are PyTorch's attribute names, so `inception_weights.py` maps the two with one
table. NHWC inside, float32 with full-precision convolutions
(TPUs and GPUs would otherwise round their inputs to bfloat16/TF32 and move the score).

Input handling is pytorch-fid's for PNG files: uint8 RGB (grey repeated, as PIL's `convert("RGB")`),
divided by 255, resized to 299x299 by `F.interpolate(mode="bilinear", align_corners=False)` (no
antialias, also when shrinking), then mapped to [-1, 1].
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

INPUT_SIZE = 299
FEATURE_DIM = 2048
BLOCK_INDEX_BY_DIM = {64: 0, 192: 1, 768: 2, 2048: 3}
"""pytorch-fid's `InceptionV3.BLOCK_INDEX_BY_DIM`: feature size -> the block whose output is averaged."""
PRECISION = jax.lax.Precision.HIGHEST


class BatchNorm(nn.Module):
    """torch.nn.BatchNorm2d in eval mode (running statistics), eps 0.001 as in torchvision's BasicConv2d."""

    epsilon: float = 1e-3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        mean = self.param("mean", nn.initializers.zeros, (features,))
        var = self.param("var", nn.initializers.ones, (features,))
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: convolution without bias, batch norm, ReLU."""

    features: int
    kernel_size: int | tuple[int, int]
    strides: int = 1
    padding: int | tuple[int, int] = 0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = (self.kernel_size,) * 2 if isinstance(self.kernel_size, int) else self.kernel_size
        pad = (self.padding,) * 2 if isinstance(self.padding, int) else self.padding
        x = nn.Conv(self.features, kernel, (self.strides,) * 2, padding=[(p, p) for p in pad], use_bias=False,
                    precision=PRECISION, name="conv")(x)
        return nn.relu(BatchNorm(name="bn")(x))


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
    """`F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)`: TensorFlow's average pool."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: jax.Array, stride: int, padding: int = 0) -> jax.Array:
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((padding, padding),) * 2)


class FIDInceptionA(nn.Module):
    pool_features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(64, 1, name="branch1x1")(x)
        branch5x5 = BasicConv2d(48, 1, name="branch5x5_1")(x)
        branch5x5 = BasicConv2d(64, 5, padding=2, name="branch5x5_2")(branch5x5)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_3")(branch3x3dbl)
        branch_pool = BasicConv2d(self.pool_features, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch5x5, branch3x3dbl, branch_pool], axis=-1)


class InceptionB(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(384, 3, strides=2, name="branch3x3")(x)
        branch3x3dbl = BasicConv2d(64, 1, name="branch3x3dbl_1")(x)
        branch3x3dbl = BasicConv2d(96, 3, padding=1, name="branch3x3dbl_2")(branch3x3dbl)
        branch3x3dbl = BasicConv2d(96, 3, strides=2, name="branch3x3dbl_3")(branch3x3dbl)
        return jnp.concatenate([branch3x3, branch3x3dbl, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionC(nn.Module):
    channels_7x7: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c7 = self.channels_7x7
        branch1x1 = BasicConv2d(192, 1, name="branch1x1")(x)
        branch7x7 = BasicConv2d(c7, 1, name="branch7x7_1")(x)
        branch7x7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(branch7x7)
        branch7x7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(branch7x7)
        dbl = BasicConv2d(c7, 1, name="branch7x7dbl_1")(x)
        dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(dbl)
        dbl = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(dbl)
        dbl = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(dbl)
        dbl = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(dbl)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(_avg_pool_3x3(x))
        return jnp.concatenate([branch1x1, branch7x7, dbl, branch_pool], axis=-1)


class InceptionD(nn.Module):
    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch3x3 = BasicConv2d(192, 1, name="branch3x3_1")(x)
        branch3x3 = BasicConv2d(320, 3, strides=2, name="branch3x3_2")(branch3x3)
        branch7x7x3 = BasicConv2d(192, 1, name="branch7x7x3_1")(x)
        branch7x7x3 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(branch7x7x3)
        branch7x7x3 = BasicConv2d(192, 3, strides=2, name="branch7x7x3_4")(branch7x7x3)
        return jnp.concatenate([branch3x3, branch7x7x3, _max_pool_3x3(x, 2)], axis=-1)


class FIDInceptionE(nn.Module):
    """FIDInceptionE_1 (average pool without the padding) or, with `max_pool`, FIDInceptionE_2."""

    max_pool: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        branch1x1 = BasicConv2d(320, 1, name="branch1x1")(x)
        branch3x3 = BasicConv2d(384, 1, name="branch3x3_1")(x)
        branch3x3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(branch3x3),
                                     BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(branch3x3)], -1)
        dbl = BasicConv2d(448, 1, name="branch3x3dbl_1")(x)
        dbl = BasicConv2d(384, 3, padding=1, name="branch3x3dbl_2")(dbl)
        dbl = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(dbl),
                               BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(dbl)], -1)
        pooled = _max_pool_3x3(x, 1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        branch_pool = BasicConv2d(192, 1, name="branch_pool")(pooled)
        return jnp.concatenate([branch1x1, branch3x3, dbl, branch_pool], axis=-1)


class FIDInceptionV3(nn.Module):
    """(N, 299, 299, 3) float32 in [-1, 1] -> (N, dims) features: pytorch-fid's block `BLOCK_INDEX_BY_DIM[dims]`,
    averaged over space (2048: pool3, the FID standard; 64, 192, 768: pytorch-fid's `--dims` alternatives)."""

    dims: int = FEATURE_DIM

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        last = BLOCK_INDEX_BY_DIM[self.dims]
        x = BasicConv2d(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
        x = BasicConv2d(32, 3, name="Conv2d_2a_3x3")(x)
        x = BasicConv2d(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3(x, 2)
        if last >= 1:
            x = BasicConv2d(80, 1, name="Conv2d_3b_1x1")(x)
            x = BasicConv2d(192, 3, name="Conv2d_4a_3x3")(x)
            x = _max_pool_3x3(x, 2)
        if last >= 2:
            x = FIDInceptionA(32, name="Mixed_5b")(x)
            x = FIDInceptionA(64, name="Mixed_5c")(x)
            x = FIDInceptionA(64, name="Mixed_5d")(x)
            x = InceptionB(name="Mixed_6a")(x)
            for name, channels in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
                x = FIDInceptionC(channels, name=name)(x)
        if last >= 3:
            x = InceptionD(name="Mixed_7a")(x)
            x = FIDInceptionE(name="Mixed_7b")(x)
            x = FIDInceptionE(max_pool=True, name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


@functools.cache
def param_shapes() -> Any:
    """The parameter tree's shapes (traced once, no computation)."""
    return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))["params"]


def _linear_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's bilinear source indices and weights along one axis (align_corners=False), bit for bit.

    `compute_source_index_and_lambda` in ATen's UpSampleKernel.cpp: src = max(scale * (dst + 0.5) - 0.5, 0)
    in float32 with scale = in / out, the multiply-add fused (one rounding, as the compiled kernel does);
    the upper neighbour is clamped to the last pixel.
    """
    dst = np.arange(out_size)
    if in_size == out_size:
        return dst, dst, np.ones(out_size, np.float32), np.zeros(out_size, np.float32)
    scale = np.float64(np.float32(in_size) / np.float32(out_size))
    real = (scale * (dst + 0.5) - 0.5).astype(np.float32)  # exact in float64, so one rounding: the fused result
    real = np.maximum(real, np.float32(0))
    index0 = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    lambda1 = np.clip(real - index0.astype(np.float32), np.float32(0), np.float32(1)).astype(np.float32)
    index1 = index0 + (index0 < in_size - 1)
    return index0, index1, np.float32(1) - lambda1, lambda1


def resize_bilinear(x: jax.Array, size: Sequence[int] = (INPUT_SIZE, INPUT_SIZE)) -> jax.Array:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` on NHWC float32 (width, then height,
    in the order of ATen's CPU kernel)."""
    (w0, w1, wl0, wl1), (h0, h1, hl0, hl1) = (_linear_indices(x.shape[2], size[1]),
                                              _linear_indices(x.shape[1], size[0]))
    x = x[:, :, w0] * wl0[:, None] + x[:, :, w1] * wl1[:, None]
    return hl0[:, None, None] * x[:, h0] + hl1[:, None, None] * x[:, h1]


def preprocess(images: jax.Array) -> jax.Array:
    """uint8 NHWC (1 or 3 channels) -> the network's input: RGB, /255, resized to 299x299, in [-1, 1]."""
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels (NHWC); got shape {images.shape}")
    x = images.astype(jnp.float32) / jnp.float32(255)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return 2 * resize_bilinear(x) - 1
