"""FlaxUNet2DModel against diffusers' UNet2DModel on CPU: outputs, parameter counts, init statistics, knobs."""

from __future__ import annotations

import os

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from safetensors.numpy import load_file

from jax_uncond import FlaxUNet2DModel
from jax_uncond.models import pytorch_io


TINY = dict(sample_size=16, block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1)

# Small configs that together exercise every UNet2DModel option (each compiles once).
CONFIGS = {
    "attn_default": dict(TINY, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "ddpm_cifar_style": dict(TINY, down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "AttnUpBlock2D"), downsample_padding=0,
                             flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
                             center_input_sample=True),
    "resnet_resampling_scale_shift": dict(TINY, down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D"),
                                          up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
                                          downsample_type="resnet", upsample_type="resnet",
                                          resnet_time_scale_shift="scale_shift", attn_norm_num_groups=4,
                                          time_embedding_dim=48, attention_head_dim=16),
    "resnet_blocks_class_table_no_mid": dict(TINY, down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D"),
                                             up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D"),
                                             act_fn="gelu", num_class_embeds=10, mid_block_type=None),
    "fourier_skip_sde_ve": dict(TINY, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
                                up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), time_embedding_type="fourier",
                                norm_num_groups=None, mid_block_scale_factor=math.sqrt(2.0), norm_eps=1e-6,
                                attention_head_dim=None, layers_per_block=2),
    "learned_identity_nonsquare": dict(TINY, sample_size=(16, 8), in_channels=1, out_channels=2,
                                       time_embedding_type="learned", num_train_timesteps=1000,
                                       class_embed_type="identity", act_fn="mish", add_attention=False,
                                       dropout=0.1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                       up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "three_levels_class_timestep": dict(sample_size=16, block_out_channels=(16, 32, 32), norm_num_groups=8,
                                        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D",
                                                                              "DownBlock2D"),
                                        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                                        class_embed_type="timestep", act_fn="relu", attention_head_dim=16),
    "scale_shift_mid_without_norm": dict(TINY, down_block_types=("DownBlock2D", "UNetResAttnDownBlock2D"),
                                         up_block_types=("UNetResAttnUpBlock2D", "UpBlock2D"), act_fn="swish",
                                         resnet_time_scale_shift="scale_shift", norm_eps=1e-4),
}
TIMESTEPS = {"fourier": [0.01, 1.0, 37.0]}
DEFAULT_TIMESTEPS = [0, 421, 999]


def torch_unet(config: dict, seed: int = 0) -> UNet2DModel:
    """A randomly initialised diffusers UNet2DModel in eval mode, with non-trivial norm parameters."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config).eval()
    with torch.no_grad():  # PyTorch inits norms to ones/zeros; perturb them so a scale/bias mix-up shows
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model


def inputs(config: dict, timesteps: list[float], seed: int = 0) -> dict[str, np.ndarray]:
    """NCHW sample, per-example timesteps and (when the config needs them) class labels."""
    rng = np.random.RandomState(seed)
    size = config.get("sample_size") or 16
    height, width = size if isinstance(size, (tuple, list)) else (size, size)
    batch = len(timesteps)
    out = {
        "sample": rng.randn(batch, config.get("in_channels", 3), height, width).astype(np.float32),
        "timesteps": np.asarray(timesteps, np.float32 if config.get("time_embedding_type") == "fourier" else np.int64),
    }
    class_embed_type = config.get("class_embed_type")
    if class_embed_type == "identity":
        dim = config.get("time_embedding_dim") or 4 * config["block_out_channels"][0]
        out["class_labels"] = rng.randn(batch, dim).astype(np.float32)
    elif class_embed_type == "timestep":
        out["class_labels"] = rng.randint(0, 10, size=batch).astype(np.int64)
    elif config.get("num_class_embeds") is not None:
        out["class_labels"] = rng.randint(0, config["num_class_embeds"], size=batch).astype(np.int64)
    return out


def torch_forward(model: UNet2DModel, x: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        labels = torch.from_numpy(x["class_labels"]) if "class_labels" in x else None
        return model(torch.from_numpy(x["sample"]), torch.from_numpy(x["timesteps"]), class_labels=labels).sample.numpy()


def flax_forward_fn(model: FlaxUNet2DModel):
    """One jitted forward per model (compiled once per input shape)."""
    return jax.jit(lambda params, x: model.apply({"params": params}, x["sample"], x["timesteps"],
                                                x.get("class_labels")).sample)


def relative_error(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def saved_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    return load_file(os.path.join(folder, pytorch_io.SAFETENSORS_NAME))


def torch_state_dict(model: UNet2DModel) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in model.state_dict().items()}


class Case:
    """One config: the diffusers model, its folder, the Flax twin loaded from it, and both outputs."""

    def __init__(self, name: str, config: dict, folder):
        self.name, self.config, self.folder = name, config, folder
        self.torch_model = torch_unet(config)
        self.torch_model.save_pretrained(folder)
        self.model, self.params = FlaxUNet2DModel.from_pretrained(folder)
        self.inputs = inputs(config, TIMESTEPS.get(config.get("time_embedding_type"), DEFAULT_TIMESTEPS))
        self.forward = flax_forward_fn(self.model)
        self.out = np.asarray(self.forward(self.params, self.inputs))
        self.ref = torch_forward(self.torch_model, self.inputs)


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory) -> Case:
    return Case(request.param, CONFIGS[request.param], tmp_path_factory.mktemp(request.param))


def test_output_matches_diffusers(case):
    assert case.out.shape == case.ref.shape
    err = relative_error(case.out, case.ref)
    print(f"{case.name}: max abs diff / max |out| = {err:.2e}")
    assert err <= 1e-4


def test_second_timesteps_match_diffusers(case):
    """Same compiled function, other timesteps and inputs."""
    x = inputs(case.config, TIMESTEPS.get(case.config.get("time_embedding_type"), [1, 500, 998]), seed=1)
    assert relative_error(case.forward(case.params, x), torch_forward(case.torch_model, x)) <= 1e-4


def test_parameter_count_matches_diffusers(case):
    shapes = jax.eval_shape(case.model.init_weights, jax.random.key(0))
    count = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    assert count == sum(p.numel() for p in case.torch_model.parameters())


def test_pytorch_flax_pytorch_is_bit_exact(case, tmp_path):
    case.model.save_pretrained(tmp_path, case.params)
    saved, original = saved_state_dict(tmp_path), torch_state_dict(case.torch_model)
    assert saved.keys() == original.keys()
    for key, value in original.items():
        assert saved[key].dtype == np.float32 and np.array_equal(saved[key], value), key


def test_config_round_trip(case):
    config = case.model.config
    assert {k: v for k, v in config.items()} == {k: (tuple(v) if isinstance(v, list) else v)
                                                 for k, v in dict(case.torch_model.config).items()
                                                 if not k.startswith("_")}
    assert FlaxUNet2DModel.from_config(config) == case.model
