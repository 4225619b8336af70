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
                                             up_block_types=("ResnetUpsampleBlock2D", "UpBlock2D"),
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
# Well-known full-size configs (slow tests).
# diffusers' examples/unconditional_image_generation/train_unconditional.py at resolution 64.
SEED_EXAMPLE = dict(
    sample_size=64, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
)  # fmt: skip
# google/ddpm-cifar10-32 (Ho et al.'s 35.7M-parameter CIFAR-10 model).
DDPM_CIFAR10 = dict(
    sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, attention_head_dim=None,
)  # fmt: skip
# Score-SDE VE (google/ncsnpp-* layout): Fourier time, FIR skip blocks, sqrt(2) scaling; run at 64x64.
SCORE_SDE_VE = dict(
    sample_size=64, block_out_channels=(128, 128, 256, 256, 256, 256, 256), layers_per_block=2,
    down_block_types=("SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D",
                      "AttnSkipDownBlock2D", "SkipDownBlock2D", "SkipDownBlock2D"),
    up_block_types=("SkipUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "SkipUpBlock2D", "SkipUpBlock2D",
                    "SkipUpBlock2D", "SkipUpBlock2D"),
    time_embedding_type="fourier", norm_num_groups=None, mid_block_scale_factor=math.sqrt(2.0), norm_eps=1e-6,
    attention_head_dim=None,
)  # fmt: skip
BIG_CONFIGS = {"ddpm_cifar10": DDPM_CIFAR10, "seed_example_64": SEED_EXAMPLE, "score_sde_ve": SCORE_SDE_VE}
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


def random_params(model: FlaxUNet2DModel, seed: int = 0, dtype=jnp.float32) -> dict:
    """Arbitrary values in the model's parameter shapes."""
    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
    rng = np.random.RandomState(seed)
    return jax.tree.map(lambda s: jnp.asarray(0.1 * rng.randn(*s.shape).astype(np.float32), dtype), shapes)


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


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Build each config's Case once per module (so each forward compiles once)."""
    built: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in built:
            built[name] = Case(name, CONFIGS[name], tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, cases) -> Case:
    return cases(request.param)


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


# ---- initialisation ------------------------------------------------------------------------------
def test_init_statistics_match_pytorch():
    """Per tensor: the same distribution as PyTorch's default init (support, spread, centre)."""
    config = CONFIGS["fourier_skip_sde_ve"] | dict(num_class_embeds=5)
    torch.manual_seed(0)
    reference = torch_state_dict(UNet2DModel(**config))
    model = FlaxUNet2DModel.from_config(config)
    ours = pytorch_io.state_dict_from_params(model.init_weights(jax.random.key(0)))
    assert ours.keys() == reference.keys()
    for key, ref in reference.items():
        value = ours[key]
        if "norm" in key:  # ones / zeros exactly
            assert np.array_equal(value, ref), key
            continue
        n = value.size
        # the spread: std within sampling error (generous: 5 sigma plus 2 %)
        assert abs(value.std() / ref.std() - 1) < 5 * np.sqrt(1 / n) + 0.02, key
        assert abs(value.mean() - ref.mean()) < 5 * ref.std() * np.sqrt(2 / n), key
        if key.endswith("time_proj.weight") or key.startswith("class_embedding"):  # normal: N(0, 16^2), N(0, 1)
            assert abs(ref.std() - (16 if "time_proj" in key else 1)) < 5 * np.sqrt(1 / n) * ref.std() + 0.02
            continue
        # uniform(+-1/sqrt(fan_in)): the bound holds for both, and the sample max gets close to it
        weight = reference[key.replace(".bias", ".weight")]
        bound = 1 / np.sqrt(np.prod(weight.shape[1:]))
        for tensor in (value, ref):
            assert np.abs(tensor).max() <= bound * (1 + 1e-6), key
            assert np.abs(tensor).max() >= bound * (1 - 20 / n), key  # P(fail) ~ exp(-20)


def test_fourier_weight_is_frozen():
    config = CONFIGS["fourier_skip_sde_ve"]
    model = FlaxUNet2DModel.from_config(config)
    params = jax.eval_shape(model.init_weights, jax.random.key(1))
    mask = model.trainable_mask(params)
    assert mask["time_proj"]["weight"] is False and mask["conv_in"]["kernel"] is True


# ---- knobs ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def attn_case(cases) -> Case:
    return cases("attn_default")


def test_scalar_timestep_broadcasts(attn_case):
    x = dict(attn_case.inputs, timesteps=np.asarray(250))
    out = jax.jit(lambda p, s: attn_case.model.apply({"params": p}, s, 250).sample)(attn_case.params, x["sample"])
    assert relative_error(out, torch_forward(attn_case.torch_model, x)) <= 1e-4


def test_bfloat16_compute_is_close(attn_case):
    model = attn_case.model.clone(dtype=jnp.bfloat16)
    out = jax.jit(lambda p, x, t: model.apply({"params": p}, x, t).sample)(
        attn_case.params, attn_case.inputs["sample"], attn_case.inputs["timesteps"])
    assert out.dtype == jnp.bfloat16
    assert relative_error(np.asarray(out, np.float32), attn_case.ref) < 5e-2


def test_gradient_checkpointing_and_xla_attention_forward(attn_case):
    model = attn_case.model.clone(gradient_checkpointing=True, attention_implementation="xla")
    assert relative_error(flax_forward_fn(model)(attn_case.params, attn_case.inputs), attn_case.ref) <= 1e-4


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_blocked_attention_matches_xla_attention_and_its_gradients(dtype, tolerance):
    """The CPU default (a loop over groups of (batch, head) pairs, with its own backward pass) against
    jax.nn.dot_product_attention: the output and the gradients of q, k and v (4 groups of 8 pairs)."""
    from jax_uncond.models.layers import blocked_attention

    q, k, v, cotangent = (jax.random.normal(key, (4, 256, 8, 8), dtype) for key in jax.random.split(jax.random.key(0), 4))

    def value_and_grads(attention):
        loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    got, want = value_and_grads(blocked_attention), value_and_grads(jax.nn.dot_product_attention)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        assert relative_error(np.asarray(a, np.float32), np.asarray(b, np.float32)) <= tolerance


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(attn_case):
    x = attn_case.inputs

    def grads(model):
        loss = lambda p: jnp.mean(model.apply({"params": p}, x["sample"], x["timesteps"]).sample ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(attn_case.params)

    value, reference = grads(attn_case.model)
    value2, remat = grads(attn_case.model.clone(gradient_checkpointing=True))
    np.testing.assert_allclose(value2, value, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), remat, reference)


def test_dropout_only_in_train_mode(tmp_path):
    model = FlaxUNet2DModel(sample_size=8, block_out_channels=(32,), norm_num_groups=8, layers_per_block=1,
                            down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), dropout=0.5)
    params = random_params(model)
    x = inputs(model.config, DEFAULT_TIMESTEPS)

    @jax.jit
    def run(key):
        train = model.apply({"params": params}, x["sample"], x["timesteps"], train=True, rngs={"dropout": key})
        return train.sample, model.apply({"params": params}, x["sample"], x["timesteps"]).sample

    a, evaluation = run(jax.random.key(1))
    b, _ = run(jax.random.key(2))
    a_again, _ = run(jax.random.key(1))
    assert np.array_equal(a, a_again) and not np.allclose(a, b) and not np.allclose(a, evaluation)
    with pytest.raises(Exception, match="dropout"):
        model.apply({"params": params}, x["sample"], x["timesteps"], train=True)


def test_bad_inputs_are_clear_errors(attn_case):
    apply = lambda *a, **k: attn_case.model.apply({"params": attn_case.params}, *a, **k)  # noqa: E731
    with pytest.raises(ValueError, match="NCHW with C=3"):
        apply(np.zeros((1, 16, 16, 3), np.float32), 1)
    with pytest.raises(ValueError, match="multiples of 2"):
        apply(np.zeros((1, 3, 15, 16), np.float32), 1)
    with pytest.raises(ValueError, match="no class embedding"):
        apply(np.zeros((1, 3, 16, 16), np.float32), 1, class_labels=np.zeros(1, np.int32))
    model = FlaxUNet2DModel.from_config(dict(CONFIGS["attn_default"], num_class_embeds=3))
    with pytest.raises(ValueError, match="class_labels should be provided"):
        jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 3, 16, 16)), 1))


# ---- full-size configs (slow) --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("name", list(BIG_CONFIGS))
def test_full_size_config_matches_diffusers(name, tmp_path):
    config = BIG_CONFIGS[name]
    torch_model = torch_unet(config)
    count = sum(p.numel() for p in torch_model.parameters())
    torch_model.save_pretrained(tmp_path)
    model, params = FlaxUNet2DModel.from_pretrained(tmp_path)
    assert sum(x.size for x in jax.tree.leaves(params)) == count
    if name == "seed_example_64":
        assert count == 113_673_219
    if name == "ddpm_cifar10":
        assert round(count / 1e6, 1) == 35.7
    x = inputs(config, [0.05, 20.0] if config.get("time_embedding_type") == "fourier" else [10, 900])
    err = relative_error(flax_forward_fn(model)(params, x), torch_forward(torch_model, x))
    print(f"{name}: {count} parameters, max abs diff / max |out| = {err:.2e}")
    assert err <= 1e-4
