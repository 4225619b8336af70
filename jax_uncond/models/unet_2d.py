"""FlaxUNet2DModel: diffusers' UNet2DModel in flax.linen, with the same config keys and weights.

The module's fields are exactly diffusers' `UNet2DModel` config keys (same defaults and meaning) plus
five non-config fields: `dtype` (computation), `param_dtype`, `gradient_checkpointing`,
`attention_implementation` and `mesh` (the devices a program runs it on: `training.sharding.on_mesh`). Inputs and outputs are NCHW like diffusers; inside the network is NHWC.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any

import flax
import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jax_uncond.diffusers_format import DIFFUSERS_VERSION
from jax_uncond.models import pytorch_io
from jax_uncond.models.blocks import DOWN_BLOCKS, UP_BLOCKS, BlockArgs, MidBlock, canonical_block_type
from jax_uncond.models.embeddings import GaussianFourierProjection, TimestepEmbedding, get_timestep_embedding
from jax_uncond.models.layers import ACTIVATIONS, Dtype, GroupNorm, conv2d

# diffusers' UNet2DModel.__init__ signature, in order (tests check it against the installed diffusers).
CONFIG_KEYS = (
    "sample_size", "in_channels", "out_channels", "center_input_sample", "time_embedding_type",
    "time_embedding_dim", "freq_shift", "flip_sin_to_cos", "down_block_types", "mid_block_type",
    "up_block_types", "block_out_channels", "layers_per_block", "mid_block_scale_factor",
    "downsample_padding", "downsample_type", "upsample_type", "dropout", "act_fn", "attention_head_dim",
    "norm_num_groups", "attn_norm_num_groups", "norm_eps", "resnet_time_scale_shift", "add_attention",
    "class_embed_type", "num_class_embeds", "num_train_timesteps",
)  # fmt: skip
_TUPLE_KEYS = ("down_block_types", "up_block_types", "block_out_channels")
CLASS_NAME = "UNet2DModel"
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")


@flax.struct.dataclass
class FlaxUNet2DOutput:
    """The output of FlaxUNet2DModel: `sample` is NCHW, like diffusers' UNet2DOutput."""

    sample: jax.Array


def _to_host(x: Any) -> Any:
    """A host copy of a parameter, gathering it first when it spans several processes."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)


def _allowed(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not supported; allowed values: {list(allowed)}")


class FlaxUNet2DModel(nn.Module):
    """diffusers' UNet2DModel in Flax. `model.apply({"params": p}, sample_nchw, t).sample` is NCHW."""

    sample_size: int | tuple[int, int] | None = None
    in_channels: int = 3
    out_channels: int = 3
    center_input_sample: bool = False
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    freq_shift: int = 0
    flip_sin_to_cos: bool = True
    down_block_types: tuple[str, ...] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2D"
    up_block_types: tuple[str, ...] = ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    block_out_channels: tuple[int, ...] = (224, 448, 672, 896)
    layers_per_block: int = 2
    mid_block_scale_factor: float = 1
    downsample_padding: int = 1
    downsample_type: str = "conv"
    upsample_type: str = "conv"
    dropout: float = 0.0
    act_fn: str = "silu"
    attention_head_dim: int | None = 8
    norm_num_groups: int | None = 32
    attn_norm_num_groups: int | None = None
    norm_eps: float = 1e-5
    resnet_time_scale_shift: str = "default"
    add_attention: bool = True
    class_embed_type: str | None = None
    num_class_embeds: int | None = None
    num_train_timesteps: int | None = None
    # Not part of diffusers' config:
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    gradient_checkpointing: bool = False
    attention_implementation: str | None = None
    mesh: Mesh | None = None

    def __post_init__(self) -> None:
        for key in _TUPLE_KEYS:
            object.__setattr__(self, key, tuple(getattr(self, key)))
        if isinstance(self.sample_size, list):
            object.__setattr__(self, "sample_size", tuple(self.sample_size))
        self._validate()
        super().__post_init__()

    def _validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(
                "down_block_types, up_block_types and block_out_channels must have the same length; got "
                f"{len(self.down_block_types)}, {len(self.up_block_types)} and {n}"
            )
        for key, names, table in (("down_block_types", self.down_block_types, DOWN_BLOCKS),
                                  ("up_block_types", self.up_block_types, UP_BLOCKS)):
            for name in names:
                _allowed(key + " entry", canonical_block_type(name), table)
        _allowed("mid_block_type", self.mid_block_type, ("UNetMidBlock2D", None))
        _allowed("time_embedding_type", self.time_embedding_type, ("positional", "fourier", "learned"))
        if self.time_embedding_type == "learned" and self.num_train_timesteps is None:
            raise ValueError("time_embedding_type='learned' needs num_train_timesteps (the embedding table size)")
        _allowed("downsample_type", self.downsample_type, ("conv", "resnet"))
        _allowed("upsample_type", self.upsample_type, ("conv", "resnet"))
        _allowed("act_fn", self.act_fn.lower(), tuple(ACTIVATIONS))
        _allowed("resnet_time_scale_shift", self.resnet_time_scale_shift, ("default", "scale_shift"))
        _allowed("class_embed_type", self.class_embed_type, (None, "timestep", "identity"))
        _allowed("attention_implementation", self.attention_implementation, ATTENTION_IMPLEMENTATIONS)
        if self.norm_num_groups is None:
            plain = [t for t in self.down_block_types + self.up_block_types if "Skip" not in t]
            if plain:
                raise ValueError(f"norm_num_groups=None only works with Skip blocks; {plain} need a group count")
        skip_down = [t for t in self.down_block_types if "Skip" in t]
        if skip_down and self.in_channels != 3:
            raise ValueError(f"{skip_down} read a 3-channel input (diffusers' skip_conv); in_channels={self.in_channels}")
        skip_up = [t for t in self.up_block_types if "Skip" in t]
        if skip_up and self.out_channels != 3:
            raise ValueError(f"{skip_up} write a 3-channel output (diffusers' skip_conv); out_channels={self.out_channels}")
        if self.sample_size is not None:
            factor = 2 ** (n - 1)
            sizes = self.sample_size if isinstance(self.sample_size, tuple) else (self.sample_size,) * 2
            if any(s % factor for s in sizes):
                raise ValueError(
                    f"sample_size={self.sample_size} must be a multiple of 2**(len(block_out_channels) - 1) = {factor}: "
                    f"the {n - 1} down-sampling steps halve it each time"
                )

    # ---- config -------------------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """diffusers' config dict (UNet2DModel keys only)."""
        return {key: getattr(self, key) for key in CONFIG_KEYS}

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs: Any) -> FlaxUNet2DModel:
        """Build from a diffusers config dict; `_`-prefixed keys are metadata, other unknown keys warn."""
        merged = {k: v for k, v in config.items() if not k.startswith("_")}
        merged.update(kwargs)
        allowed = set(CONFIG_KEYS) | {"dtype", "param_dtype", "gradient_checkpointing", "attention_implementation", "mesh"}
        unknown = sorted(set(merged) - allowed)
        if unknown:
            warnings.warn(f"UNet2DModel config keys {unknown} are not UNet2DModel arguments and are ignored", stacklevel=2)
        return cls(**{k: v for k, v in merged.items() if k in allowed})

    # ---- parameters ---------------------------------------------------------------------------
    def _dummy_inputs(self) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        side = 2 ** (len(self.block_out_channels) - 1)
        sample = jnp.zeros((1, self.in_channels, side, side), jnp.float32)
        timesteps = jnp.ones((1,), jnp.float32 if self.time_embedding_type == "fourier" else jnp.int32)
        class_labels = None
        if self.class_embed_type == "identity":
            class_labels = jnp.zeros((1, self._time_embed_dim), jnp.float32)
        elif self.class_embed_type == "timestep":  # labels go through the time projection
            class_labels = timesteps
        elif self.num_class_embeds is not None:
            class_labels = jnp.zeros((1,), jnp.int32)
        return sample, timesteps, class_labels

    def init_weights(self, rng: jax.Array) -> dict:
        """Parameters drawn like PyTorch's defaults for UNet2DModel (the rules: `pytorch_io.init_plan`).

        Jittable (e.g. `jax.jit(model.init_weights, out_shardings=...)`), and cheap to compile: the whole
        tree comes from two random draws, not one per tensor.
        """
        template = jax.eval_shape(lambda key: self.init({"params": key}, *self._dummy_inputs())["params"], rng)
        return pytorch_io.draw_init(pytorch_io.init_plan(template), rng, self.param_dtype)

    def trainable_mask(self, params: dict) -> dict:
        """A pytree of bools like `params`: False for tensors diffusers keeps frozen (the Fourier weights)."""
        flat = flax.traverse_util.flatten_dict(params)
        frozen = self.time_embedding_type == "fourier"
        return flax.traverse_util.unflatten_dict({p: not (frozen and p[0] == "time_proj") for p in flat})

    # ---- weight exchange ----------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike,
        subfolder: str | None = None,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        cache_dir: str | os.PathLike | None = None,
        revision: str | None = None,
        variant: str | None = None,
        token: str | None = None,
        local_files_only: bool = False,
        **kwargs: Any,
    ) -> tuple[FlaxUNet2DModel, dict]:
        """Load a diffusers UNet2DModel folder (local or Hub id): returns (model, params in param_dtype).

        `dtype` is the computation dtype; kwargs set non-config fields (e.g. gradient_checkpointing=True).
        Every tensor name and shape is checked; mismatches raise one error that lists them all.
        """
        config_path, weights_path = pytorch_io.resolve_files(
            pretrained_model_name_or_path, subfolder=subfolder, cache_dir=cache_dir, revision=revision,
            variant=variant, token=token, local_files_only=local_files_only,
        )
        model = cls.from_config(cls.read_config(config_path), dtype=dtype, param_dtype=param_dtype, **kwargs)
        template = jax.eval_shape(model.init_weights, jax.random.key(0))
        state_dict = pytorch_io.load_state_dict(weights_path)
        params = pytorch_io.params_from_state_dict(state_dict, template, source=str(weights_path))
        return model, jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)

    @staticmethod
    def read_config(config_path: str | os.PathLike) -> dict[str, Any]:
        """A diffusers `config.json`; ValueError if it is not JSON or describes another model class."""
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        class_name = config.get("_class_name", CLASS_NAME)
        if class_name != CLASS_NAME:
            raise ValueError(f"{config_path} describes a {class_name}, not a {CLASS_NAME}")
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, params: dict, is_main_process: bool = True) -> None:
        """Write diffusers' `config.json` and `diffusion_pytorch_model.safetensors` (float32 tensors).

        In a multi-process run call it on every process (arrays spread over processes are gathered,
        a collective) with `is_main_process=True` on the one that writes.
        """
        state_dict = pytorch_io.state_dict_from_params(jax.tree.map(_to_host, params))
        if not is_main_process:
            return
        os.makedirs(save_directory, exist_ok=True)
        config = {"_class_name": CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
        config.update({k: list(v) if isinstance(v, tuple) else v for k, v in self.config.items()})
        with open(os.path.join(save_directory, pytorch_io.CONFIG_NAME), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        pytorch_io.save_state_dict(state_dict, os.path.join(save_directory, pytorch_io.SAFETENSORS_NAME))

    # ---- forward ------------------------------------------------------------------------------
    @property
    def _time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    def _head_dim(self, channels: int) -> int:
        return self.attention_head_dim if self.attention_head_dim is not None else channels

    @nn.compact
    def __call__(
        self,
        sample: jax.Array,
        timesteps: jax.Array | float | int,
        class_labels: jax.Array | None = None,
        train: bool = False,
        return_dict: bool = True,
    ) -> FlaxUNet2DOutput | tuple[jax.Array]:
        """sample: (B, C, H, W); timesteps: scalar or (B,); class_labels: (B,) or (B, D) for "identity".

        `train=True` turns dropout on and needs a "dropout" rng.
        """
        self._check_input(sample)
        batch = sample.shape[0]
        c0 = self.block_out_channels[0]
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        args = BlockArgs(
            eps=self.norm_eps, act_fn=self.act_fn, groups=self.norm_num_groups,
            time_embedding_norm=self.resnet_time_scale_shift, dropout=self.dropout, deterministic=not train,
            attention_implementation=self.attention_implementation, mesh=self.mesh, **kw,
        )  # fmt: skip

        if self.center_input_sample:
            sample = 2 * sample - 1.0
        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)

        # 1. time (and class) embedding
        t = jnp.asarray(timesteps)
        t = jnp.broadcast_to(t.reshape(-1) if t.ndim else t[None], (batch,))
        if self.time_embedding_type == "fourier":
            time_proj = GaussianFourierProjection(c0, param_dtype=self.param_dtype, name="time_proj")
        elif self.time_embedding_type == "learned":
            time_proj = nn.Embed(self.num_train_timesteps, c0, param_dtype=self.param_dtype, name="time_proj")
        else:
            time_proj = lambda ts: get_timestep_embedding(ts, c0, self.flip_sin_to_cos, self.freq_shift)  # noqa: E731
        emb = TimestepEmbedding(self._time_embed_dim, name="time_embedding", **kw)(time_proj(t).astype(self.dtype))
        emb = emb + self._class_embedding(class_labels, time_proj, kw)

        # 2. pre-process; 3. down
        skip_sample = x
        x = conv2d(c0, 3, padding=1, name="conv_in", **kw)(x)
        res_samples: tuple[jax.Array, ...] = (x,)
        for i, name in enumerate(self.down_block_types):
            block = self._down_block(i, canonical_block_type(name), args)
            if "Skip" in name:
                x, res, skip_sample = block(x, emb, skip_sample)
            else:
                x, res = block(x, emb)
            res_samples += res

        # 4. mid
        if self.mid_block_type is not None:
            channels = self.block_out_channels[-1]
            groups = self.norm_num_groups if self.norm_num_groups is not None else min(channels // 4, 32)
            attn_groups = self.attn_norm_num_groups
            if attn_groups is None:
                attn_groups = groups if self.resnet_time_scale_shift == "default" else None
            mid = self._maybe_remat(MidBlock)(
                dataclasses.replace(args, groups=groups), self._head_dim(channels), attn_groups,
                add_attention=self.add_attention, output_scale_factor=self.mid_block_scale_factor, name="mid_block",
            )
            x = mid(x, emb)

        # 5. up
        skip_sample = None
        num_res = self.layers_per_block + 1
        for i, name in enumerate(self.up_block_types):
            res, res_samples = res_samples[-num_res:], res_samples[:-num_res]
            block = self._up_block(i, canonical_block_type(name), args)
            if "Skip" in name:
                x, skip_sample = block(x, res, emb, skip_sample)
            else:
                x = block(x, res, emb)

        # 6. post-process
        groups_out = self.norm_num_groups if self.norm_num_groups is not None else min(c0 // 4, 32)
        x = jax.nn.silu(GroupNorm(groups_out, self.norm_eps, name="conv_norm_out", **kw)(x))
        x = conv2d(self.out_channels, 3, padding=1, name="conv_out", **kw)(x)
        if skip_sample is not None:
            x = x + skip_sample
        if self.time_embedding_type == "fourier":
            x = x / t.reshape(batch, 1, 1, 1).astype(x.dtype)
        out = jnp.transpose(x, (0, 3, 1, 2))
        return FlaxUNet2DOutput(sample=out) if return_dict else (out,)

    def _check_input(self, sample: jax.Array) -> None:
        factor = 2 ** (len(self.block_out_channels) - 1)
        if sample.ndim != 4 or sample.shape[1] != self.in_channels:
            raise ValueError(f"sample must be NCHW with C={self.in_channels}; got shape {sample.shape}")
        if sample.shape[2] % factor or sample.shape[3] % factor:
            raise ValueError(f"sample height and width must be multiples of {factor}; got shape {sample.shape}")

    def _class_embedding(self, class_labels: jax.Array | None, time_proj, kw: dict) -> jax.Array | float:
        has_embedding = self.class_embed_type is not None or self.num_class_embeds is not None
        if not has_embedding:
            if class_labels is not None:
                raise ValueError("class_labels were given but the model has no class embedding "
                                 "(set class_embed_type or num_class_embeds)")
            return 0.0
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning")
        if self.class_embed_type == "timestep":
            return TimestepEmbedding(self._time_embed_dim, name="class_embedding", **kw)(
                time_proj(jnp.asarray(class_labels)).astype(self.dtype))
        if self.class_embed_type == "identity":
            return jnp.asarray(class_labels).astype(self.dtype)
        table = nn.Embed(self.num_class_embeds, self._time_embed_dim, param_dtype=self.param_dtype,
                         name="class_embedding")
        return table(jnp.asarray(class_labels)).astype(self.dtype)

    def _maybe_remat(self, module_cls: type[nn.Module]) -> type[nn.Module]:
        return nn.remat(module_cls) if self.gradient_checkpointing else module_cls

    def _down_block(self, i: int, name: str, args: BlockArgs) -> nn.Module:
        spec = DOWN_BLOCKS[name]
        channels = self.block_out_channels[i]
        is_final = i == len(self.block_out_channels) - 1
        common = dict(
            num_layers=self.layers_per_block,
            out_channels=channels,
            attention_head_dim=self._head_dim(channels) if spec.attention else None,
            name=f"down_blocks_{i}",
        )
        if spec.resample == "fir":
            return self._maybe_remat(spec.family)(args, add_downsample=not is_final, **common)
        downsample = self.downsample_type if spec.resample == "downsample_type" else spec.resample
        return self._maybe_remat(spec.family)(
            args, downsample=None if is_final else downsample, downsample_padding=self.downsample_padding, **common
        )

    def _up_block(self, i: int, name: str, args: BlockArgs) -> nn.Module:
        spec = UP_BLOCKS[name]
        channels = self.block_out_channels[::-1][i]
        is_final = i == len(self.block_out_channels) - 1
        common = dict(
            num_layers=self.layers_per_block + 1,
            out_channels=channels,
            attention_head_dim=self._head_dim(channels) if spec.attention else None,
            name=f"up_blocks_{i}",
        )
        if spec.resample == "fir":
            return self._maybe_remat(spec.family)(args, add_upsample=not is_final, **common)
        upsample = self.upsample_type if spec.resample == "upsample_type" else spec.resample
        return self._maybe_remat(spec.family)(args, upsample=None if is_final else upsample, **common)
