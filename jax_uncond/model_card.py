"""The model card (README.md) of a pipeline folder, in the Hub's format: YAML metadata, then Markdown.

It says what the model is, shows the run's newest sample grid, how to load it with diffusers, and how
it was trained (dataset, steps, hardware, the flags that matter, all of them folded away, and metrics
such as FID once measured). Built from the secret-free `to_preset(config)`, so the token never appears.
Written by the run with every pipeline folder (and uploaded with it) and by `jax_uncond.export`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import huggingface_hub
import jax
import numpy as np
import yaml

from jax_uncond import __version__
from jax_uncond.training.config import TrainConfig, to_preset

CARD_FILE = "README.md"
TAGS = ("diffusers", "unconditional-image-generation", "jax", "ddpm", "jax_uncond")
KEY_FLAGS = ("resolution", "center_crop", "random_flip", "train_batch_size", "global_batch_size",
             "gradient_accumulation_steps", "num_epochs", "max_train_steps", "learning_rate", "lr_scheduler",
             "lr_warmup_steps", "adam_beta1", "adam_beta2", "adam_weight_decay", "use_ema", "ema_max_decay",
             "mixed_precision", "prediction_type", "ddpm_num_steps", "ddpm_beta_schedule", "snr_gamma", "seed")
"""The flags shown in the card's table (those that are set); the folded block lists every flag."""
_GRID = re.compile(r"epoch_(\d+)\.png")


def hardware() -> str:
    """This run's devices, e.g. `8 x TPU v5 lite` or `16 x NVIDIA H100 80GB HBM3 (2 processes)`."""
    processes = jax.process_count()
    return f"{jax.device_count()} x {jax.devices()[0].device_kind}" + (
        f" ({processes} processes)" if processes > 1 else "")


def newest_grid(samples_dir: str) -> str | None:
    """The path of the newest sample grid (`epoch_<epoch>.png` with the highest epoch) in samples_dir, if any."""
    if not os.path.isdir(samples_dir):
        return None
    epochs = {int(m.group(1)): name for name in os.listdir(samples_dir) if (m := _GRID.fullmatch(name))}
    return os.path.join(samples_dir, epochs[max(epochs)]) if epochs else None


def _hub_id(name: str | None) -> str | None:
    """`name` when it is a Hub repository id (not a local path, not `tfds:`), else None."""
    if name is None or name.startswith("tfds:") or os.path.exists(name):
        return None
    try:
        huggingface_hub.utils.validate_repo_id(name)
    except huggingface_hub.errors.HFValidationError:
        return None
    return name


def _dataset(config: TrainConfig, hub_id: str | None) -> str:
    """The dataset line: a link when --dataset_name is a Hub dataset id (`hub_id`)."""
    if hub_id is not None:
        subset = f" (config `{config.dataset_config_name}`)" if config.dataset_config_name else ""
        return f"[{hub_id}](https://huggingface.co/datasets/{hub_id}){subset}"
    if config.dataset_name is not None:
        return f"`{config.dataset_name}`"
    if config.train_data_dir is not None:
        return f"a folder of images (`{os.path.basename(os.path.normpath(config.train_data_dir))}`)"
    return "the built-in dataset (coloured shapes on plain backgrounds, drawn on the fly)"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 100_000 else f"{n:,}"


def _value(value: Any) -> str:
    return f"`{json.dumps(value)}`" if isinstance(value, (bool, list, tuple, dict)) else f"`{value}`"


def model_card(config: TrainConfig, params: Any, *, grid: str | None = None, step: int | None = None,
               ema: bool | None = None, hardware: str | None = None, name_or_path: str | None = None,
               metrics: Mapping[str, float] | None = None) -> huggingface_hub.ModelCard:
    """The card of a pipeline folder holding `params` (the UNet's) trained as `config` says.

    `grid`: the sample grid's path relative to the folder; `ema`: whether `params` are the EMA weights
    (default: --use_ema); `name_or_path`: what the snippet hands `from_pretrained`, the Hub repository
    or the folder (default: --output_dir); `metrics`: evaluation figures by name, e.g. {"FID": 12.3}.
    Facts not given are left out.
    """
    ema = config.use_ema if ema is None else ema
    count = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    size = (config.unet or {}).get("sample_size", config.resolution)
    dataset = _hub_id(config.dataset_name)  # a Hub dataset id, for the metadata and a link
    data = huggingface_hub.ModelCardData(library_name="diffusers", license=config.hub_license, tags=list(TAGS),
                                         pipeline_tag="unconditional-image-generation",
                                         datasets=None if dataset is None else [dataset],
                                         base_model=_hub_id(config.pretrained_model_name_or_path))
    where = name_or_path or config.output_dir
    lines = [
        "---", data.to_yaml(), "---", "",
        f"<!-- Written by jax_uncond {__version__} with the pipeline folder: saving the folder again overwrites "
        "it. -->",
        "", f"# {os.path.basename(os.path.normpath(where))}", "",
        f"An unconditional image diffusion model: a diffusers `DDPMPipeline` (a `UNet2DModel` of "
        f"{_count(count)} parameters at {size}x{size} and a `DDPMScheduler` of {config.ddpm_num_steps} steps), "
        f"trained in JAX with jax_uncond, the JAX/Flax port of diffusers' `train_unconditional.py`.",
        "",
    ]
    if grid is not None:
        grid = grid.replace(os.sep, "/")
        lines += [f"![Samples]({grid})", "",
                  f"The run's newest sample grid (`{grid}`), drawn from the same noise at every epoch.", ""]
    lines += [
        "## How to use", "",
        "```python", "from diffusers import DiffusionPipeline", "",
        f"pipeline = DiffusionPipeline.from_pretrained({json.dumps(where)})",
        f"image = pipeline(num_inference_steps={config.ddpm_num_inference_steps}).images[0]",
        'image.save("sample.png")', "```", "",
        "In JAX, without PyTorch, with jax_uncond installed, on a local copy of the folder: "
        "`jax-uncond-sample FOLDER --num_images 16 --out samples/`.", "",
        "## Training", "",
        f"- Dataset: {_dataset(config, dataset)}",
    ]
    if config.pretrained_model_name_or_path is not None:
        lines.append(f"- Fine-tuned from: `{config.pretrained_model_name_or_path}`")
    if step is not None:
        lines.append(f"- Steps: {step:,} optimizer steps")
    lines.append(f"- Weights: {'the exponential moving average (EMA)' if ema else 'the trained weights (no EMA)'}")
    if hardware is not None:
        lines.append(f"- Hardware: {hardware}")
    lines += [f"- Software: jax_uncond {__version__}, jax {jax.__version__}", "",
              "| flag | value |", "|---|---|"]
    settings = json.loads(json.dumps(to_preset(config)))  # tuples (the resolved UNet config's) become lists
    lines += [f"| `--{k}` | {_value(settings[k])} |" for k in KEY_FLAGS if settings.get(k) is not None]
    lines += ["", "<details><summary>Every flag of the run, as a preset for <code>--config</code></summary>", "",
              "```yaml", yaml.safe_dump(settings, sort_keys=False, default_flow_style=None).rstrip(), "```", "",
              "</details>", ""]
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4g} |" for name, value in metrics.items()] + [""]
    return huggingface_hub.ModelCard("\n".join(lines))


def write_model_card(folder: str, config: TrainConfig, params: Any, *, samples: str | None = None,
                     **facts: Any) -> str:
    """Writes folder/README.md and returns its path: `model_card` with `facts` (its keywords), showing the
    newest grid under folder/`samples` if there is one."""
    grid = newest_grid(os.path.join(folder, samples)) if samples is not None else None
    card = model_card(config, params, grid=grid and os.path.relpath(grid, folder), **facts)
    path = os.path.join(folder, CARD_FILE)
    card.save(path)
    return path
