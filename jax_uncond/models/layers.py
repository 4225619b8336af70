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
from jax.sharding import Mesh, PartitionSpec as P

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
    """torch.nn.GroupNorm over the last (channel) axis; statistics in float32 whatever `dtype` is.

    Two passes over the activation each way (XLA fuses the rest): per-channel sums of the input and
    its square, shifted by the channel's first value so they stay accurate (Chan's combination gives
    the group's mean and variance from them), then `x * a + b` with per-(sample, channel) `a`, `b`.
    The backward pass likewise reduces once and writes once.
    """

    num_groups: int
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        channels = x.shape[-1]
        groups = self.num_groups
        if groups <= 0 or channels % groups:
            raise ValueError(
                f"GroupNorm: {channels} channels cannot be split into {groups} groups "
                "(check norm_num_groups / attn_norm_num_groups against block_out_channels)"
            )
        scale = self.param("scale", nn.initializers.ones, (channels,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (channels,), self.param_dtype)
        h = x.astype(jnp.float32)
        batch, per_group = h.shape[0], channels // groups
        spatial = tuple(range(1, h.ndim - 1))
        count = float(np.prod(h.shape[1:-1]))
        # The statistics do not depend on the shift, so no gradient flows through it.
        shift = jax.lax.stop_gradient(h[(slice(None),) + (slice(0, 1),) * len(spatial)])
        centred = h - shift
        sums, squares = centred.sum(spatial), jnp.square(centred).sum(spatial)  # (batch, channels)
        channel_mean = (shift.reshape(batch, channels) + sums / count).reshape(batch, groups, per_group)
        channel_m2 = (squares - sums * sums / count).reshape(batch, groups, per_group)
        mean = channel_mean.mean(-1, keepdims=True)
        m2 = channel_m2.sum(-1, keepdims=True) + count * jnp.square(channel_mean - mean).sum(-1, keepdims=True)
        inv_std = jax.lax.rsqrt(jnp.maximum(m2 / (count * per_group), 0.0) + self.epsilon)
        gain = inv_std * scale.astype(jnp.float32).reshape(groups, per_group)  # (batch, groups, per_group)
        offset = bias.astype(jnp.float32) - (mean * gain).reshape(batch, channels)
        shape = (batch,) + (1,) * len(spatial) + (channels,)
        return (h * gain.reshape(shape) + offset.reshape(shape)).astype(self.dtype)


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


ATTENTION_LOGITS_BYTES = 2**21
"""The float32 logits one step of the blocked attention holds (2 MiB: about what a CPU core keeps in cache)."""


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str | None,
                          mesh: Mesh | None = None) -> jax.Array:
    """softmax(q k^T / sqrt(head_dim)) v over (batch, tokens, heads, head_dim), logits and softmax in float32.

    `implementation`: "blocked" (run per device of `mesh`, the batch split over its axes), else
    `jax.nn.dot_product_attention`'s ("xla", "cudnn", or None: XLA's). The program that runs the model picks
    it for its devices (`training.sharding.attention_on`).
    """
    if implementation != "blocked":
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    if mesh is None or mesh.size == 1:
        return blocked_attention(q, k, v)
    # Per device: the groups of (batch, head) pairs are formed from the device's own rows, so the batch stays
    # split (over the whole mesh, a `lax.map` over groups of the global batch gathered it on every device).
    rows = P(mesh.axis_names)
    return jax.shard_map(blocked_attention, mesh=mesh, in_specs=(rows, rows, rows), out_specs=rows)(q, k, v)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """`jax.nn.dot_product_attention`'s XLA math, a few (batch, head) pairs at a time, so that each group's
    logits stay in cache (PyTorch's CPU flash attention does the like): XLA's one-shot form writes and
    rereads the whole (batch, heads, tokens, tokens) logits some ten times per training step, and on a
    CPU that memory traffic costs more than the products themselves."""
    b, t, n, h = q.shape
    groups = b * n
    chunk = max(c for c in range(1, groups + 1)
                if groups % c == 0 and (c == 1 or c * t * k.shape[1] * 4 <= ATTENTION_LOGITS_BYTES))

    def heads_first(x: jax.Array) -> jax.Array:
        return x.transpose(0, 2, 1, 3).reshape(groups // chunk, chunk, x.shape[1], h)

    out = jax.lax.map(lambda qkv: _attend(*qkv), (heads_first(q), heads_first(k), heads_first(v)))
    return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)


def _probabilities(q: jax.Array, k: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(d)) over (group, query, key), in float32."""
    logits = jnp.einsum("cth,csh->cts", q, k, preferred_element_type=jnp.float32)
    return jax.nn.softmax(logits * np.float32(1.0 / np.sqrt(q.shape[-1])), axis=-1)


@jax.custom_vjp
def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Attention of one group of (batch, head) pairs, (group, tokens, head_dim) each."""
    return jnp.einsum("cts,csh->cth", _probabilities(q, k).astype(v.dtype), v)


def _attend_forward(q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, tuple]:
    return _attend(q, k, v), (q, k, v)


def _attend_backward(residuals: tuple, d_out: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The gradients, the probabilities recomputed (flash attention's trade: products for memory).

    Every product contracts its left operand's last axis, the form XLA:CPU hands to its fast kernels
    (YNNPACK): the key and value gradients are computed transposed, from transposed (small) queries and
    output gradients, behind barriers that keep XLA from folding the transposes back into products that
    contract the (large) probabilities' query axis. The softmax gradient is cast to the inputs' dtype
    (bfloat16 products under mixed precision), as flash attention does.
    """
    q, k, v = residuals
    p = _probabilities(q, k)
    dp = jnp.einsum("cth,csh->cts", d_out, v, preferred_element_type=jnp.float32)
    ds = (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)) * np.float32(1.0 / np.sqrt(q.shape[-1]))).astype(q.dtype)
    dq = jnp.einsum("cts,csh->cth", ds, k, preferred_element_type=jnp.float32)
    barrier = jax.lax.optimization_barrier
    dk_t = barrier(jnp.einsum("cht,cts->chs", barrier(jnp.swapaxes(q, 1, 2)), ds, preferred_element_type=jnp.float32))
    dv_t = barrier(jnp.einsum("cht,cts->chs", barrier(jnp.swapaxes(d_out, 1, 2)), p.astype(v.dtype),
                              preferred_element_type=jnp.float32))
    return dq.astype(q.dtype), jnp.swapaxes(dk_t, 1, 2).astype(k.dtype), jnp.swapaxes(dv_t, 1, 2).astype(v.dtype)


_attend.defvjp(_attend_forward, _attend_backward)


class Attention(nn.Module):
    """diffusers' spatial self-attention (`Attention(..., _from_deprecated_attn_block=True)`).

    heads = channels // head_dim; the residual is added and the sum divided by rescale_output_factor.
    The product runs through `dot_product_attention` (softmax in float32; float16 inputs are attended
    in float32).
    """

    head_dim: int
    norm_num_groups: int | None
    eps: float = 1e-6
    rescale_output_factor: float = 1.0
    implementation: str | None = None
    mesh: Mesh | None = None
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
        out = dot_product_attention(q, k, v, self.implementation, self.mesh).astype(self.dtype)
        out = dense(channels, name="to_out_0", **kw)(out.reshape(b, height * width, inner))
        return ((out.reshape(x.shape) + x) / self.rescale_output_factor).astype(self.dtype)
