"""Leaf layers of the UNet: conv/dense named like PyTorch, float32 GroupNorm, FIR resampling, attention.

Module and parameter names follow diffusers' PyTorch modules so that `pytorch_io.py` can map the two
trees with a handful of rules. Everything works on NHWC arrays.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """diffusers' `get_activation`: case-insensitive lookup of the activation table."""
    try:
        return ACTIVATIONS[name.lower()]
    except KeyError:
        raise ValueError(f"act_fn={name!r} is not supported; allowed values: {sorted(ACTIVATIONS)}") from None


def conv2d(
    features: int, kernel_size: int, *, stride: int = 1, padding: int | Any, dtype: Dtype, param_dtype: Dtype,
    name: str,
) -> nn.Conv:
    """nn.Conv2d's twin: square kernel, padding an int (both sides) or ((top, bottom), (left, right)).

    Initial values come from `init_weights`.
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nn.Conv(features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding, dtype=dtype,
                   param_dtype=param_dtype, name=name)


def dense(features: int, *, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    """nn.Linear's twin. Initial values come from `init_weights`."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm over the last (channel) axis; statistics in float32 whatever `dtype` is."""

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        if self.num_groups <= 0 or channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: {channels} channels cannot be split into {self.num_groups} groups "
                "(check norm_num_groups / attn_norm_num_groups against block_out_channels)"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        h = x.astype(jnp.float32)
        grouped = h.reshape(*h.shape[:-1], self.num_groups, channels // self.num_groups)
        axes = tuple(range(1, grouped.ndim - 2)) + (grouped.ndim - 1,)
        mean = grouped.mean(axis=axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axis=axes, keepdims=True)
        grouped = (grouped - mean) * jax.lax.rsqrt(var + self.epsilon)
        h = grouped.reshape(h.shape) * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return h.astype(self.dtype)


# FIR resampling (score-SDE "fir" kernel (1, 3, 3, 1)), as diffusers' upfirdn2d_native does it.
_FIR_KERNEL = (1.0, 3.0, 3.0, 1.0)


def _fir_filter(x: jax.Array, gain: float, lhs_dilation: int, stride: int, padding: tuple[int, int]) -> jax.Array:
    kernel = np.outer(_FIR_KERNEL, _FIR_KERNEL)
    kernel = kernel / kernel.sum() * gain
    channels = x.shape[-1]
    # The kernel is symmetric, so correlation and convolution coincide; one depthwise filter per channel.
    weight = jnp.asarray(np.tile(kernel[:, :, None, None], (1, 1, 1, channels)), dtype=x.dtype)
    return jax.lax.conv_general_dilated(
        x,
        weight,
        window_strides=(stride, stride),
        padding=(padding, padding),
        lhs_dilation=(lhs_dilation, lhs_dilation),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=channels,
    )


def fir_downsample(x: jax.Array) -> jax.Array:
    """diffusers' `downsample_2d(x, kernel=(1, 3, 3, 1))`: FIR low-pass, then keep every 2nd pixel."""
    return _fir_filter(x, gain=1.0, lhs_dilation=1, stride=2, padding=(1, 1))


def fir_upsample(x: jax.Array) -> jax.Array:
    """diffusers' `upsample_2d(x, kernel=(1, 3, 3, 1))`: zero-stuff by 2, then FIR with gain 4."""
    # upfirdn2d pads (2, 1) around the zero-stuffed 2H signal, whose last row is a stuffed zero:
    # with lhs_dilation (length 2H - 1) that is padding (2, 2).
    return _fir_filter(x, gain=4.0, lhs_dilation=2, stride=1, padding=(2, 2))


def nearest_upsample(x: jax.Array) -> jax.Array:
    """F.interpolate(scale_factor=2, mode="nearest") on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_downsample(x: jax.Array) -> jax.Array:
    """nn.AvgPool2d(kernel_size=2, stride=2) on NHWC."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class Downsample2D(nn.Module):
    """diffusers' Downsample2D(use_conv=True): a stride-2 3x3 conv; padding 0 means pad right/bottom by 1."""

    out_channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        conv = conv2d(self.out_channels, 3, stride=2, padding=pad, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv")
        return conv(x)


class Upsample2D(nn.Module):
    """diffusers' Upsample2D(use_conv=True): nearest x2, then a 3x3 conv."""

    out_channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = conv2d(self.out_channels, 3, padding=1, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="conv")
        return conv(nearest_upsample(x))


class ResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (pre-norm, time embedding added or as scale/shift, optional up/down)."""

    out_channels: int
    groups: int
    groups_out: int | None = None
    eps: float = 1e-6
    act_fn: str = "silu"
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    dropout: float = 0.0
    deterministic: bool = True
    use_in_shortcut: bool | None = None
    up: bool = False
    down: bool = False
    kernel: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        act = get_activation(self.act_fn)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        in_channels = x.shape[-1]
        groups_out = self.groups if self.groups_out is None else self.groups_out

        h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        if self.up:
            resample = fir_upsample if self.kernel == "fir" else nearest_upsample
            x, h = resample(x), resample(h)
        elif self.down:
            resample = fir_downsample if self.kernel == "fir" else avg_pool_downsample
            x, h = resample(x), resample(h)
        h = conv2d(self.out_channels, 3, padding=1, name="conv1", **kw)(h)

        proj_features = self.out_channels * (2 if self.time_embedding_norm == "scale_shift" else 1)
        t = dense(proj_features, name="time_emb_proj", **kw)(act(temb))[:, None, None, :]
        norm2 = GroupNorm(groups_out, self.eps, name="norm2", **kw)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(t, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            h = norm2(h + t)
        h = nn.Dropout(self.dropout, deterministic=self.deterministic)(act(h))
        h = conv2d(self.out_channels, 3, padding=1, name="conv2", **kw)(h)

        use_shortcut = in_channels != self.out_channels if self.use_in_shortcut is None else self.use_in_shortcut
        if use_shortcut:
            x = conv2d(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
        return ((x + h) / self.output_scale_factor).astype(self.dtype)


class Attention(nn.Module):
    """diffusers' spatial self-attention (`Attention(..., _from_deprecated_attn_block=True)`).

    heads = channels // head_dim; the residual is added and the sum divided by rescale_output_factor.
    The product runs through `jax.nn.dot_product_attention` (softmax in float32; float16 inputs are
    attended in float32).
    """

    head_dim: int
    norm_num_groups: int | None
    eps: float = 1e-6
    rescale_output_factor: float = 1.0
    implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, height, width, channels = x.shape
        heads = channels // self.head_dim
        if heads < 1:
            raise ValueError(f"attention_head_dim={self.head_dim} exceeds the {channels} channels of an attention block")
        inner = heads * self.head_dim
        h = x.reshape(b, height * width, channels)
        if self.norm_num_groups is not None:
            h = GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(h)
        q, k, v = (
            dense(inner, name=name, **kw)(h).reshape(b, height * width, heads, self.head_dim)
            for name in ("to_q", "to_k", "to_v")
        )
        if q.dtype == jnp.float16:
            # float16 logits overflow past 65504, and XLA:CPU has no float16 product with float32
            # accumulation: fp16 (GPUs without bf16, which have no flash attention either) attends in float32.
            q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation).astype(self.dtype)
        out = dense(channels, name="to_out_0", **kw)(out.reshape(b, height * width, inner))
        return ((out.reshape(x.shape) + x) / self.rescale_output_factor).astype(self.dtype)
