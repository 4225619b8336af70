"""The presets shipped in jax_uncond/configs/ parse and their UNets build; docs/flags.md's table lists every flag."""

import os
import re

import jax
import pytest

from jax_uncond.training import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = [cfg.preset_path(name) for name in cfg.preset_names()]  # the package's (the installed wheel's in CI)


def test_the_promised_presets_exist():
    names = {os.path.basename(p) for p in PRESETS}
    assert {"quickstart.yaml", "flowers-64.yaml", "butterflies-128.yaml", "cifar10-32.yaml",
            "celebahq-256.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_parses_and_says_what_it_reproduces(path):
    config = cfg.parse_args(["--config", path])
    with open(path) as f:
        text = f.read()
    assert text.startswith("# ") and "Hardware:" in text.split("\n\n")[0].split("\n# python")[0]
    assert config.config == path


def test_flag_table_lists_every_flag():
    with open(os.path.join(ROOT, "docs", "flags.md")) as f:
        page = f.read()
    table = page[page.index("| PyTorch `train_unconditional.py` |"):].split("\n\n")[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("| ")]
    cells = {name for row in rows for name in re.findall(r"`--([a-z0-9_]+)`", row)}
    missing = [f.name for f in cfg.FLAGS if f.name not in cells]
    assert not missing, f"docs/flags.md flag table lacks {missing}"
    pytorch_rows = {re.findall(r"`--([a-z0-9_]+)`", row.split("|")[1])[0] for row in rows
                    if re.search(r"`--", row.split("|")[1])}
    assert pytorch_rows == {f.name for f in cfg.FLAGS if f.pytorch}


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_unet_builds(path):
    """The UNet each preset trains: its config resolves and initialises (shapes only, no compute)."""
    from jax_uncond.run.loop import build_model

    config = cfg.parse_args(["--config", path])
    model = build_model(config)
    params = jax.eval_shape(model.init_weights, jax.random.key(0))
    count = sum(x.size for x in jax.tree.leaves(params))
    assert model.config["sample_size"] == config.resolution
    if os.path.basename(path) == "cifar10-32.yaml":
        assert count == 35_746_307  # the DDPM paper's 35.7M-parameter CIFAR-10 model (google/ddpm-cifar10-32)
    if os.path.basename(path) == "flowers-64.yaml":
        assert count == 113_673_219  # diffusers' seed example
