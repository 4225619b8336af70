"""The model card (README.md) of a pipeline folder: Hub metadata, the newest grid, the loading snippet,
the training facts, a preset that reproduces the run, and no secret."""

import re

import numpy as np
import pytest
from huggingface_hub import ModelCard

from jax_uncond import model_card as mc
from jax_uncond.training.config import parse_args

SECRET = "hf_SECRETtokenTHATmustNEVERleak"
PARAMS = {"conv": np.zeros((3, 3, 3, 32), np.float32), "bias": np.zeros(32, np.float32)}


@pytest.fixture
def folder(tmp_path):
    for epoch in (9, 10, 1000):  # the newest by number, not by name
        (tmp_path / "samples").mkdir(exist_ok=True)
        (tmp_path / "samples" / f"epoch_{epoch:04d}.png").write_bytes(b"png")
    return tmp_path


def test_card_parses_and_holds_grid_snippet_and_facts(folder):
    config = parse_args(["--config", "quickstart", "--hub_token", SECRET, "--hub_license", "apache-2.0",
                         "--dataset_name", "huggan/flowers-102-categories", "--use_ema"])
    path = mc.write_model_card(str(folder), config, PARAMS, samples="samples", step=2048, hardware="8 x TPU v5 lite",
                               name_or_path="me/ddpm-flowers", metrics={"FID": 12.345})
    card = ModelCard.load(path)
    assert card.data.library_name == "diffusers" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert {"diffusers", "unconditional-image-generation", "jax", "ddpm"} <= set(card.data.tags)
    assert card.data.datasets == ["huggan/flowers-102-categories"]
    text = card.text
    assert "![Samples](samples/epoch_1000.png)" in text
    assert 'DiffusionPipeline.from_pretrained("me/ddpm-flowers")' in text
    assert "pipeline(num_inference_steps=1000)" in text
    assert "# ddpm-flowers" in text and "- Steps: 2,048 optimizer steps" in text
    assert "- Hardware: 8 x TPU v5 lite" in text and "exponential moving average" in text
    assert f"`UNet2DModel` of {3 * 3 * 3 * 32 + 32:,} parameters at 16x16" in text
    assert "| `--learning_rate` | `0.001` |" in text and "| FID | 12.35 |" in text
    assert SECRET not in open(path).read() and "hub_token" not in text


def test_card_preset_reproduces_the_run(tmp_path):
    """The folded block is every flag of the run as YAML: `--config` on it gives the same config back."""
    config = parse_args(["--config", "quickstart", "--hub_token", SECRET, "--learning_rate", "3e-4",
                         "--random_flip", "--snr_gamma", "5"])
    from jax_uncond.run.loop import build_model

    config = config.__class__(**{**vars(config), "unet": build_model(config).config})  # as the run saves it
    text = str(mc.model_card(config, PARAMS))
    preset = re.search(r"```yaml\n(.*?)\n```", text, re.S).group(1)
    (tmp_path / "run.yaml").write_text(preset)
    again = parse_args(["--config", str(tmp_path / "run.yaml")])
    again = again.__class__(**{**vars(again), "unet": build_model(again).config})  # YAML lists -> the model's tuples
    # A preset sets every flag it holds, so all of them count as given (explicit_flags) in the run it starts.
    expected = {**vars(config), "hub_token": None, "config": str(tmp_path / "run.yaml"),
                "explicit_flags": again.explicit_flags}
    assert again == config.__class__(**expected)


@pytest.mark.parametrize("flags,described", [
    ([], "the built-in dataset"),
    (["--train_data_dir", "/data/my-photos/"], "a folder of images (`my-photos`)"),
    (["--dataset_name", "tfds:cifar10"], "`tfds:cifar10`"),
])
def test_card_without_a_hub_dataset(tmp_path, flags, described):
    config = parse_args(["--output_dir", str(tmp_path / "ddpm-run"), *flags])
    card = mc.model_card(config, PARAMS, ema=False)
    assert card.data.datasets is None and card.data.license is None
    assert f"- Dataset: {described}" in card.text and "the trained weights (no EMA)" in card.text
    assert f'from_pretrained("{tmp_path / "ddpm-run"}")' in card.text and "# ddpm-run" in card.text
    assert "Steps:" not in card.text and "Hardware:" not in card.text and "![" not in card.text


def test_hardware_names_the_devices():
    assert mc.hardware() == "8 x cpu"  # tests/conftest.py: 8 CPU devices, one process


def test_fine_tuned_card_names_its_base_model(folder):
    """A run started from a Hub model says so in the metadata (`base_model`) and in the text."""
    config = parse_args(["--config", "quickstart", "--pretrained_model_name_or_path", "google/ddpm-cifar10-32"])
    card = ModelCard.load(mc.write_model_card(str(folder), config, PARAMS))
    assert card.data.base_model == "google/ddpm-cifar10-32"
    assert "- Fine-tuned from: `google/ddpm-cifar10-32`" in card.text
