"""The down, mid and up blocks of diffusers' UNet2DModel, one Flax module per family.

`DownBlock` covers DownBlock2D / AttnDownBlock2D / ResnetDownsampleBlock2D, `SkipDownBlock` covers
SkipDownBlock2D / AttnSkipDownBlock2D (score-SDE's FIR skip path), and likewise for the up blocks.
`DOWN_BLOCKS` / `UP_BLOCKS` map each diffusers block name to its family and the options that make it
that block, with the quirks of diffusers' `get_down_block` / `get_up_block` kept (e.g. DownBlock2D
ignores `downsample_type`, skip blocks pick their own group counts).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from jax_uncond.models.layers import (
    Attention,
    Downsample2D,
    Dtype,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    fir_downsample,
    fir_upsample,
)

SQRT2 = math.sqrt(2.0)


@dataclasses.dataclass(frozen=True)
class BlockArgs:
    """Settings every block shares (hashable, so blocks can be rematerialised)."""

    eps: float
    act_fn: str
    groups: int | None
    time_embedding_norm: str
    dropout: float
    deterministic: bool
    attention_implementation: str | None
    mesh: Mesh | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def resnet(self, out_channels: int, *, name: str, **overrides) -> ResnetBlock2D:
        kwargs = dict(
            groups=self.groups,
            eps=self.eps,
            act_fn=self.act_fn,
            time_embedding_norm=self.time_embedding_norm,
            dropout=self.dropout,
            deterministic=self.deterministic,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        kwargs.update(overrides)
        return ResnetBlock2D(out_channels, name=name, **kwargs)

    def attention(self, head_dim: int, groups: int | None, *, name: str, rescale: float = 1.0) -> Attention:
        return Attention(
            head_dim,
            groups,
            eps=self.eps,
            rescale_output_factor=rescale,
            implementation=self.attention_implementation,
            mesh=self.mesh,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )


def skip_groups(channels: int) -> int:
    """The group count diffusers' skip blocks use: min(channels // 4, 32)."""
    return min(channels // 4, 32)


class DownBlock(nn.Module):
    """DownBlock2D (no attention, conv downsampler), AttnDownBlock2D, ResnetDownsampleBlock2D."""

    args: BlockArgs
    num_layers: int
    out_channels: int
    attention_head_dim: int | None = None  # None: no attention
    downsample: str | None = "conv"  # "conv", "resnet" or None (last block)
    downsample_padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        a = self.args
        outputs = []
        for i in range(self.num_layers):
            x = a.resnet(self.out_channels, name=f"resnets_{i}")(x, temb)
            if self.attention_head_dim is not None:
                x = a.attention(self.attention_head_dim, a.groups, name=f"attentions_{i}")(x)
            outputs.append(x)
        if self.downsample == "conv":
            x = Downsample2D(self.out_channels, self.downsample_padding, a.dtype, a.param_dtype, name="downsamplers_0")(x)
        elif self.downsample == "resnet":
            x = a.resnet(self.out_channels, down=True, name="downsamplers_0")(x, temb)
        if self.downsample is not None:
            outputs.append(x)
        return x, tuple(outputs)


class SkipDownBlock(nn.Module):
    """SkipDownBlock2D / AttnSkipDownBlock2D: FIR-downsampling resnet plus a 1x1 conv of the FIR-downsampled input."""

    args: BlockArgs
    num_layers: int
    out_channels: int
    attention_head_dim: int | None = None
    add_downsample: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, temb: jax.Array, skip: jax.Array
    ) -> tuple[jax.Array, tuple[jax.Array, ...], jax.Array]:
        a, out = self.args, self.out_channels
        outputs = []
        for i in range(self.num_layers):
            x = a.resnet(out, groups=skip_groups(x.shape[-1]), groups_out=skip_groups(out), output_scale_factor=SQRT2,
                         name=f"resnets_{i}")(x, temb)
            if self.attention_head_dim is not None:
                x = a.attention(self.attention_head_dim, 32, rescale=SQRT2, name=f"attentions_{i}")(x)
            outputs.append(x)
        if self.add_downsample:
            x = a.resnet(out, groups=skip_groups(out), output_scale_factor=SQRT2, use_in_shortcut=True, down=True,
                         kernel="fir", name="resnet_down")(x, temb)
            skip = fir_downsample(skip)
            x = conv2d(out, 1, padding=0, dtype=a.dtype, param_dtype=a.param_dtype, name="skip_conv")(skip) + x
            outputs.append(x)
        return x, tuple(outputs), skip


class MidBlock(nn.Module):
    """UNetMidBlock2D with one attention layer: resnet, [attention], resnet."""

    args: BlockArgs
    attention_head_dim: int
    attn_groups: int | None
    add_attention: bool = True
    output_scale_factor: float = 1.0

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        a, channels, scale = self.args, x.shape[-1], self.output_scale_factor
        x = a.resnet(channels, output_scale_factor=scale, name="resnets_0")(x, temb)
        if self.add_attention:
            x = a.attention(self.attention_head_dim, self.attn_groups, rescale=scale, name="attentions_0")(x)
        return a.resnet(channels, output_scale_factor=scale, name="resnets_1")(x, temb)


class UpBlock(nn.Module):
    """UpBlock2D (no attention, conv upsampler), AttnUpBlock2D, ResnetUpsampleBlock2D."""

    args: BlockArgs
    num_layers: int
    out_channels: int
    attention_head_dim: int | None = None
    upsample: str | None = "conv"  # "conv", "resnet" or None (last block)

    @nn.compact
    def __call__(self, x: jax.Array, res_samples: tuple[jax.Array, ...], temb: jax.Array) -> jax.Array:
        a = self.args
        for i in range(self.num_layers):
            x = jnp.concatenate([x, res_samples[-1 - i]], axis=-1)
            x = a.resnet(self.out_channels, name=f"resnets_{i}")(x, temb)
            if self.attention_head_dim is not None:
                x = a.attention(self.attention_head_dim, a.groups, name=f"attentions_{i}")(x)
        if self.upsample == "conv":
            x = Upsample2D(self.out_channels, a.dtype, a.param_dtype, name="upsamplers_0")(x)
        elif self.upsample == "resnet":
            x = a.resnet(self.out_channels, up=True, name="upsamplers_0")(x, temb)
        return x


class SkipUpBlock(nn.Module):
    """SkipUpBlock2D / AttnSkipUpBlock2D: FIR-upsampled RGB skip path accumulating 3x3 conv outputs."""

    args: BlockArgs
    num_layers: int
    out_channels: int
    attention_head_dim: int | None = None
    add_upsample: bool = True

    @nn.compact
    def __call__(
        self, x: jax.Array, res_samples: tuple[jax.Array, ...], temb: jax.Array, skip: jax.Array | None
    ) -> tuple[jax.Array, jax.Array | None]:
        a, out = self.args, self.out_channels
        kw = dict(dtype=a.dtype, param_dtype=a.param_dtype)
        for i in range(self.num_layers):
            res = res_samples[-1 - i]
            if self.attention_head_dim is None:
                groups = skip_groups(x.shape[-1] + res.shape[-1])
            else:  # diffusers' AttnSkipUpBlock2D computes min(resnet_in + res_skip // 4, 32): kept as is
                groups = min(x.shape[-1] + res.shape[-1] // 4, 32)
            x = jnp.concatenate([x, res], axis=-1)
            x = a.resnet(out, groups=groups, groups_out=skip_groups(out), output_scale_factor=SQRT2,
                         name=f"resnets_{i}")(x, temb)
        if self.attention_head_dim is not None:
            x = a.attention(self.attention_head_dim, 32, rescale=SQRT2, name="attentions_0")(x)
        if skip is not None:
            skip = fir_upsample(skip)
        if self.add_upsample:
            s = jax.nn.silu(GroupNorm(skip_groups(out), a.eps, name="skip_norm", **kw)(x))
            s = conv2d(3, 3, padding=1, name="skip_conv", **kw)(s)
            skip = s if skip is None else skip + s
            x = a.resnet(out, groups=skip_groups(out), groups_out=skip_groups(out), output_scale_factor=SQRT2,
                         use_in_shortcut=True, up=True, kernel="fir", name="resnet_up")(x, temb)
        return x, skip


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What a diffusers block name means: the Flax family and the options that select it."""

    family: type[nn.Module]
    attention: bool
    resample: str  # "conv", "resnet", "downsample_type"/"upsample_type" (the config decides), or "fir"


DOWN_BLOCKS: dict[str, BlockSpec] = {
    "DownBlock2D": BlockSpec(DownBlock, attention=False, resample="conv"),
    "AttnDownBlock2D": BlockSpec(DownBlock, attention=True, resample="downsample_type"),
    "ResnetDownsampleBlock2D": BlockSpec(DownBlock, attention=False, resample="resnet"),
    "SkipDownBlock2D": BlockSpec(SkipDownBlock, attention=False, resample="fir"),
    "AttnSkipDownBlock2D": BlockSpec(SkipDownBlock, attention=True, resample="fir"),
}
UP_BLOCKS: dict[str, BlockSpec] = {
    "UpBlock2D": BlockSpec(UpBlock, attention=False, resample="conv"),
    "AttnUpBlock2D": BlockSpec(UpBlock, attention=True, resample="upsample_type"),
    "ResnetUpsampleBlock2D": BlockSpec(UpBlock, attention=False, resample="resnet"),
    "SkipUpBlock2D": BlockSpec(SkipUpBlock, attention=False, resample="fir"),
    "AttnSkipUpBlock2D": BlockSpec(SkipUpBlock, attention=True, resample="fir"),
}


def canonical_block_type(name: str) -> str:
    """diffusers accepts a legacy "UNetRes" prefix on block names; strip it the same way."""
    return name[7:] if name.startswith("UNetRes") else name
