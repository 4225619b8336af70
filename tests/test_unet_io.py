"""Weight exchange of FlaxUNet2DModel with diffusers: round trips, file formats, the Hub path, clear errors."""

from __future__ import annotations

import inspect
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DModel
from flax import traverse_util
from safetensors.numpy import save_file
from test_unet import CONFIGS, SEED_EXAMPLE, TINY, random_params, saved_state_dict, torch_state_dict, torch_unet

from jax_uncond import FlaxUNet2DModel
from jax_uncond.models import pytorch_io
from jax_uncond.models.pytorch_io import WeightMismatchError
from jax_uncond.models.unet_2d import CONFIG_KEYS

SMALL = dict(TINY, down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """A diffusers-saved SMALL model folder (written by PyTorch)."""
    folder = tmp_path_factory.mktemp("small")
    torch_unet(SMALL).save_pretrained(folder)
    return folder


def test_config_keys_and_defaults_are_diffusers():
    signature = inspect.signature(UNet2DModel.__init__).parameters
    assert tuple(k for k in signature if k != "self") == CONFIG_KEYS
    fields = FlaxUNet2DModel.__dataclass_fields__
    for key in CONFIG_KEYS:
        assert fields[key].default == signature[key].default, key
    assert FlaxUNet2DModel().config == {k: signature[k].default for k in CONFIG_KEYS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flax_pytorch_flax_is_bit_exact(name, tmp_path):
    """Flax params -> save_pretrained -> diffusers (no missing/unexpected keys) -> save -> Flax: identical."""
    model = FlaxUNet2DModel.from_config(CONFIGS[name])
    params = random_params(model)
    model.save_pretrained(tmp_path / "flax", params)
    config = json.loads((tmp_path / "flax" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DModel" and "_diffusers_version" in config
    torch_model, info = UNet2DModel.from_pretrained(tmp_path / "flax", output_loading_info=True)
    assert info == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
    torch_model.save_pretrained(tmp_path / "torch")
    reloaded, params2 = FlaxUNet2DModel.from_pretrained(tmp_path / "torch")
    assert reloaded == model
    flat, flat2 = traverse_util.flatten_dict(params), traverse_util.flatten_dict(params2)
    assert flat.keys() == flat2.keys()
    for path, value in flat.items():
        assert flat2[path].dtype == jnp.float32 and np.array_equal(flat2[path], value), path


def test_bfloat16_params_are_written_as_float32(tmp_path):
    model = FlaxUNet2DModel.from_config(SMALL, param_dtype=jnp.bfloat16)
    params = random_params(model, dtype=jnp.bfloat16)
    model.save_pretrained(tmp_path, params)
    saved = saved_state_dict(tmp_path)
    expected = pytorch_io.state_dict_from_params(jax.tree.map(lambda x: x.astype(jnp.float32), params))
    assert saved.keys() == expected.keys()
    for key, value in saved.items():
        assert value.dtype == np.float32 and np.array_equal(value, expected[key]), key
    _, info = UNet2DModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_from_pretrained_dtypes_and_kwargs(small_folder):
    model, params = FlaxUNet2DModel.from_pretrained(small_folder, dtype=jnp.bfloat16, gradient_checkpointing=True)
    assert model.dtype == jnp.bfloat16 and model.gradient_checkpointing
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    _, params = FlaxUNet2DModel.from_pretrained(small_folder, param_dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_subfolder_and_bin_file(tmp_path):
    torch_model = torch_unet(SMALL)
    torch_model.save_pretrained(tmp_path / "pipe" / "unet", safe_serialization=False)
    assert (tmp_path / "pipe" / "unet" / pytorch_io.BIN_NAME).is_file()
    _, params = FlaxUNet2DModel.from_pretrained(tmp_path / "pipe", subfolder="unet")
    state_dict = pytorch_io.state_dict_from_params(params)
    for key, value in torch_state_dict(torch_model).items():
        assert np.array_equal(state_dict[key], value), key


def test_bin_file_without_torch_says_what_to_do(tmp_path, monkeypatch):
    torch_unet(SMALL).save_pretrained(tmp_path, safe_serialization=False)
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="needs PyTorch"):
        FlaxUNet2DModel.from_pretrained(tmp_path)


def test_legacy_attention_names_load(small_folder, tmp_path):
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state_dict = {}
    for key, value in saved_state_dict(small_folder).items():
        for new, old in legacy.items():
            key = key.replace(f".{new}.", f".{old}.")
        state_dict[key] = value
    assert any(".proj_attn." in k for k in state_dict)
    save_file(state_dict, str(tmp_path / pytorch_io.SAFETENSORS_NAME))
    (tmp_path / "config.json").write_text((small_folder / "config.json").read_text())
    _, params = FlaxUNet2DModel.from_pretrained(tmp_path)
    _, expected = FlaxUNet2DModel.from_pretrained(small_folder)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, expected))


def test_hub_id_goes_through_hf_hub_download(small_folder, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        path = small_folder / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    model, _ = FlaxUNet2DModel.from_pretrained("someone/ddpm", subfolder="unet", cache_dir="/c", revision="r1")
    assert model.block_out_channels == (32, 64)
    assert [c[1] for c in calls] == ["config.json", pytorch_io.SAFETENSORS_NAME]
    assert all(c[0] == "someone/ddpm" and c[2]["subfolder"] == "unet" and c[2]["cache_dir"] == "/c"
               and c[2]["revision"] == "r1" for c in calls)
    with pytest.raises(FileNotFoundError, match="neither"):
        FlaxUNet2DModel.from_pretrained("someone/ddpm", variant="fp16")


def _folder_with(tmp_path, source, edit):
    state_dict = saved_state_dict(source)
    edit(state_dict)
    save_file(state_dict, str(tmp_path / pytorch_io.SAFETENSORS_NAME))
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    return tmp_path


def test_missing_tensor_is_an_error(small_folder, tmp_path):
    folder = _folder_with(tmp_path, small_folder, lambda sd: sd.pop("mid_block.attentions.0.to_k.bias"))
    with pytest.raises(WeightMismatchError, match=r"missing \(1\): mid_block\.attentions\.0\.to_k\.bias"):
        FlaxUNet2DModel.from_pretrained(folder)


def test_extra_tensor_is_an_error(small_folder, tmp_path):
    folder = _folder_with(tmp_path, small_folder, lambda sd: sd.update({"extra.weight": np.zeros(3, np.float32)}))
    with pytest.raises(WeightMismatchError, match=r"unexpected \(1\): extra\.weight"):
        FlaxUNet2DModel.from_pretrained(folder)


def test_wrong_shape_is_an_error(small_folder, tmp_path):
    def edit(sd):
        sd["conv_in.weight"] = np.zeros((32, 3, 5, 5), np.float32)

    folder = _folder_with(tmp_path, small_folder, edit)
    with pytest.raises(WeightMismatchError, match=r"conv_in\.weight: file has \(32, 3, 5, 5\), config needs \(32, 3, 3, 3\)"):
        FlaxUNet2DModel.from_pretrained(folder)


def test_all_mismatches_are_listed_together(small_folder, tmp_path):
    def edit(sd):
        sd.pop("conv_out.bias")
        sd.pop("time_embedding.linear_1.weight")
        sd["bogus"] = np.zeros(1, np.float32)
        sd["conv_norm_out.weight"] = np.zeros(7, np.float32)

    folder = _folder_with(tmp_path, small_folder, edit)
    with pytest.raises(WeightMismatchError) as err:
        FlaxUNet2DModel.from_pretrained(folder)
    message = str(err.value)
    for text in ("missing (2)", "conv_out.bias", "time_embedding.linear_1.weight", "unexpected (1): bogus",
                 "wrong shape (1)", "conv_norm_out.weight"):
        assert text in message


def test_unknown_block_type_in_config_json(small_folder, tmp_path):
    config = json.loads((small_folder / "config.json").read_text())
    config["down_block_types"] = ["DownBlock2D", "CrossAttnDownBlock2D"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / pytorch_io.SAFETENSORS_NAME).write_bytes((small_folder / pytorch_io.SAFETENSORS_NAME).read_bytes())
    with pytest.raises(ValueError, match=r"down_block_types entry='CrossAttnDownBlock2D'.*allowed values.*AttnDownBlock2D"):
        FlaxUNet2DModel.from_pretrained(tmp_path)


def test_not_a_unet_folder(tmp_path, small_folder):
    config = json.loads((small_folder / "config.json").read_text())
    config["_class_name"] = "AutoencoderKL"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / pytorch_io.SAFETENSORS_NAME).write_bytes((small_folder / pytorch_io.SAFETENSORS_NAME).read_bytes())
    with pytest.raises(ValueError, match="AutoencoderKL, not a UNet2DModel"):
        FlaxUNet2DModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        FlaxUNet2DModel.from_pretrained(tmp_path / "..")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(up_block_types=("AttnUpBlock2D", "KUpBlock2D")), "up_block_types entry='KUpBlock2D'"),
        (dict(mid_block_type="UNetMidBlock2DCrossAttn"), "mid_block_type="),
        (dict(time_embedding_type="sinusoidal"), "time_embedding_type="),
        (dict(time_embedding_type="learned"), "needs num_train_timesteps"),
        (dict(downsample_type="pool"), "downsample_type="),
        (dict(upsample_type="transpose"), "upsample_type="),
        (dict(act_fn="tanh"), "act_fn="),
        (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift="),
        (dict(class_embed_type="projection"), "class_embed_type="),
        (dict(attention_implementation="flash"), "attention_implementation="),
        (dict(sample_size=10, block_out_channels=(32, 64, 64), down_block_types=("DownBlock2D",) * 3,
              up_block_types=("UpBlock2D",) * 3), "multiple of 2\\*\\*\\(len\\(block_out_channels\\) - 1\\) = 4"),
        (dict(block_out_channels=(32, 64, 64)), "same length"),
        (dict(norm_num_groups=None), "norm_num_groups=None only works with Skip blocks"),
        (dict(in_channels=4, down_block_types=("SkipDownBlock2D", "DownBlock2D")), "3-channel input"),
    ],
)
def test_bad_config_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        FlaxUNet2DModel(**dict(SMALL, **overrides))


def test_unknown_config_keys_warn_and_metadata_is_ignored():
    config = dict(SMALL, _class_name="UNet2DModel", _diffusers_version="0.1.1", resnet_num_groups=4)
    with pytest.warns(UserWarning, match="resnet_num_groups"):
        model = FlaxUNet2DModel.from_config(config)
    assert model == FlaxUNet2DModel(**SMALL)


def test_config_json_lists_become_tuples(small_folder):
    config = json.loads((small_folder / "config.json").read_text())
    model = FlaxUNet2DModel.from_config(config)
    assert model.block_out_channels == (32, 64) and model.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    hash(model)


def test_torch_is_not_imported_by_the_package():
    code = "import sys, jax_uncond; from jax_uncond.models import pytorch_io; assert 'torch' not in sys.modules"
    import subprocess

    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_parameter_count_of_the_seed_example_model():
    """train_unconditional.py's 64x64 UNet, counted through eval_shape (no compute)."""
    model = FlaxUNet2DModel(**SEED_EXAMPLE)
    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
    assert sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes)) == 113_673_219


def test_torch_state_dict_dtype_float_for_bf16_bin(tmp_path):
    """A bfloat16 .bin (PyTorch's usual half format) loads, upcast to float32."""
    torch_model = torch_unet(SMALL).to(torch.bfloat16)
    torch_model.save_pretrained(tmp_path, safe_serialization=False)
    _, params = FlaxUNet2DModel.from_pretrained(tmp_path)
    state_dict = pytorch_io.state_dict_from_params(params)
    for key, value in torch_model.state_dict().items():
        assert np.array_equal(state_dict[key], value.float().numpy()), key


def test_init_on_a_mesh_then_save(tmp_path):
    """init_weights jitted straight onto 8 devices gives the same values, and saves from there."""
    from jax_uncond.training.sharding import make_mesh, replicated

    model = FlaxUNet2DModel(**SMALL)
    key = jax.random.key(3)
    sharded = jax.jit(model.init_weights, out_shardings=replicated(make_mesh()))(key)
    plain = model.init_weights(key)
    assert len(jax.tree.leaves(sharded)[0].sharding.device_set) == 8
    assert jax.tree.all(jax.tree.map(np.array_equal, sharded, plain))
    model.save_pretrained(tmp_path, sharded)
    _, params = FlaxUNet2DModel.from_pretrained(tmp_path)
    assert jax.tree.all(jax.tree.map(np.array_equal, params, plain))
