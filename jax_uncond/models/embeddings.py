"""Timestep embeddings of diffusers' UNet2DModel: sinusoidal, Gaussian Fourier, and the MLP on top."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from jax_uncond.models.layers import Dtype, dense

FOURIER_SCALE = 16.0  # UNet2DModel's GaussianFourierProjection(scale=16)


def get_timestep_embedding(
    timesteps: jax.Array,
    embedding_dim: int,
    flip_sin_to_cos: bool = False,
    downscale_freq_shift: float = 1,
    scale: float = 1,
    max_period: int = 10000,
) -> jax.Array:
    """diffusers' sinusoidal embedding of a 1-D array of (possibly fractional) timesteps, in float32."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * jnp.arange(half_dim, dtype=jnp.float32) / (half_dim - downscale_freq_shift)
    emb = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half_dim:], emb[:, :half_dim]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """diffusers' GaussianFourierProjection(log=True): [sin, cos](2 pi log(t) W), W ~ N(0, scale^2).

    UNet2DModel uses scale FOURIER_SCALE (`init_weights` draws W). W is frozen in diffusers
    (requires_grad=False); here its gradient is stopped, and `FlaxUNet2DModel.trainable_mask` marks it
    so an optimizer can leave it alone (no weight decay either).
    """

    embedding_size: int = 256
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.normal(FOURIER_SCALE), (self.embedding_size,), self.param_dtype)
        weight = jax.lax.stop_gradient(weight).astype(jnp.float32)
        x_proj = jnp.log(t.astype(jnp.float32))[:, None] * weight[None, :] * 2 * np.pi
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class TimestepEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.time_embed_dim, name="linear_1", **kw)(x)
        return dense(self.time_embed_dim, name="linear_2", **kw)(jax.nn.silu(x))
