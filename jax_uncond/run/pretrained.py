"""Start a run from a trained model: `--pretrained_model_name_or_path` (fine-tuning, or continuing a PyTorch run).

A source is a local folder, or a Hub id of the first two kinds:
- a diffusers `DDPMPipeline` folder: `model_index.json`, `unet/`, `scheduler/scheduler_config.json`;
- a `UNet2DModel` folder: `config.json` and its weights (a pipeline's `unet` subfolder is one);
- a `checkpoint-N` folder of diffusers' `train_unconditional.py` (accelerate's `save_state`). With the
  script's save hook it holds `unet/` and, with --use_ema, `unet_ema/` (UNet folders; `unet_ema`'s config
  also carries `EMAModel`'s counters) beside accelerate's `optimizer.bin`, `scheduler.bin` and
  `random_states_*.pkl`; without the hook (accelerate < 0.16) the model's state dict sits at the top as
  `model.safetensors` or `pytorch_model.bin`, with no config.
The UNet config and weights come from the source (every tensor checked against the config by
`models/pytorch_io.py`; torch-free for safetensors), the EMA from `unet_ema/` where there is one, the
noise schedule from a pipeline's `scheduler_config.json` under the --ddpm_* / --prediction_type flags
given explicitly, and with --resume_step_from_pretrained the step count N of `checkpoint-N`. Optimizer
moments are never carried over. Whatever is wrong is a UsageError, raised before anything compiles.
Resuming a run restores its own checkpoint: the pretrained files are then not read at all.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jax_uncond.errors import UsageError
from jax_uncond.models import pytorch_io
from jax_uncond.models.unet_2d import FlaxUNet2DModel
from jax_uncond.pipelines.ddpm import MODEL_INDEX_NAME, PIPELINE_CLASSES
from jax_uncond.schedulers import FlaxDDPMScheduler
from jax_uncond.schedulers.base import SCHEDULER_CONFIG_NAME
from jax_uncond.run import checkpoint as ckpt
from jax_uncond.training.config import TrainConfig
from jax_uncond.training.state import StartWeights

FLAG = "--pretrained_model_name_or_path"
ACCELERATE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""accelerate's `save_state` names for the model's state dict, where no save hook wrote `unet/`."""
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""State-dict key prefixes of DistributedDataParallel and torch.compile, which accelerate's `save_state` keeps."""
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")
"""The PyTorch script's checkpoint folders: `{output_dir}/checkpoint-{global_step}`."""
SCHEDULER_FLAGS = {"ddpm_num_steps": "num_train_timesteps", "ddpm_beta_schedule": "beta_schedule",
                   "prediction_type": "prediction_type"}
"""The flags that set the training noise schedule, and the scheduler_config.json keys they stand for."""


@dataclasses.dataclass(frozen=True)
class Source:
    """A resolved --pretrained_model_name_or_path: what it holds and where its files are.

    `unet_config` None: accelerate's bare state dict, whose UNet config is the run's own (as in the
    PyTorch run: --model_config_name_or_path, the preset's `unet`, else the seed example's). `notes`
    are phrases for the start-up line.
    """

    name: str
    kind: str
    weights: Path
    weights_label: str
    unet_config: dict[str, Any] | None = None
    ema_weights: Path | None = None
    scheduler_config: dict[str, Any] | None = None
    step: int | None = None
    notes: tuple[str, ...] = ()


class FineTune(NamedTuple):
    """A fresh run's start from pretrained weights, and the start-up line that says what it uses."""

    weights: StartWeights
    line: str


def prepare(config: TrainConfig, resume: tuple[str, int] | None,
            say: Callable[[str], None]) -> tuple[TrainConfig, Source | None]:
    """The run's config with the pretrained model's UNet config and noise schedule, and the source to
    `load` the weights from. When resuming, the UNet config and schedule recorded in the checkpoint
    instead, and no source: a run's own checkpoint wins and the pretrained files are not read."""
    if resume is not None:
        return _as_recorded(config, resume), None
    if config.pretrained_model_name_or_path is None:
        return config, None
    source = resolve(config)
    if config.resume_step_from_pretrained and source.step is None:
        raise UsageError(f"--resume_step_from_pretrained needs a checkpoint-N folder of train_unconditional.py; "
                         f"{source.name} ({source.kind}) has no step count")
    notes = []
    if source.unet_config is None:
        origin = config.model_config_name_or_path or ("the preset's `unet`" if config.unet is not None
                                                      else "the seed example's (the PyTorch script's default)")
        notes.append(f"UNet config from {origin}")
    else:
        if config.model_config_name_or_path is not None:
            raise UsageError(f"--model_config_name_or_path and {FLAG} both set the UNet, and {source.name} has its "
                             "own config: drop --model_config_name_or_path")
        if config.unet is not None:
            notes.append("the preset's `unet` is not used")
        unet = dict(source.unet_config)
        factor = 2 ** (len(unet.get("block_out_channels", FlaxUNet2DModel.block_out_channels)) - 1)
        if config.resolution % factor == 0:  # else check_resolution's usage error names --resolution
            if unet.get("sample_size") != config.resolution:
                notes.append(f"sample_size {unet.get('sample_size')} -> {config.resolution}")
            unet["sample_size"] = config.resolution
        config = dataclasses.replace(config, unet=unet, model_config_name_or_path=None)
    config, schedule = _with_scheduler(config, source, say)
    return config, dataclasses.replace(source, notes=(*notes, schedule))


def load(source: Source, model: FlaxUNet2DModel, config: TrainConfig) -> FineTune:
    """The weights (and EMA weights, with --use_ema) of `source` as host arrays shaped like `model`'s
    parameters, each tensor checked, with the step to start at; and the start-up line."""
    template = jax.eval_shape(model.init_weights, jax.random.key(0))
    params = _read_params(source, source.weights, template)
    ema = None
    if source.ema_weights is not None and config.use_ema:
        ema = _read_params(source, source.ema_weights, template)
    step = source.step if config.resume_step_from_pretrained else 0
    parts = [f"weights {source.weights_label}"]
    if config.use_ema:
        parts.append("EMA from unet_ema/" if ema is not None else "EMA starts from the weights")
    elif source.ema_weights is not None:
        parts.append("unet_ema/ not used (no --use_ema)")
    if step:
        parts.append(f"continuing at step {step} (LR schedule, EMA warm-up)")
    elif source.step is not None:
        parts.append(f"steps counted from 0 (--resume_step_from_pretrained continues at {source.step})")
    parts += [*source.notes, "optimizer moments not carried over (AdamW starts afresh)"]
    line = f"start: fine-tuning from {source.name} ({source.kind}): " + "; ".join(parts)
    return FineTune(StartWeights(params, ema, np.int32(step)), line)


def resolve(config: TrainConfig) -> Source:
    """What --pretrained_model_name_or_path is (a local folder, else a Hub id) and where its files are."""
    name = config.pretrained_model_name_or_path
    path = Path(name).expanduser()
    if path.is_dir():
        return _local(name, path, config)
    if path.exists():
        raise UsageError(f"{FLAG} {name} is a file; pass the folder that holds it")
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UsageError(f"{FLAG} {name}: no such folder")
    return _hub(name, config)


def _local(name: str, path: Path, config: TrainConfig) -> Source:
    if (path / MODEL_INDEX_NAME).is_file():
        _check_pipeline(_read_json(path / MODEL_INDEX_NAME))
        config_file, weights = _unet_files(name, path, "unet", config)
        scheduler_file = path / "scheduler" / SCHEDULER_CONFIG_NAME
        return Source(name, "DDPMPipeline folder", weights, f"unet/{weights.name}", _unet_config(config_file),
                      scheduler_config=_read_json(scheduler_file) if scheduler_file.is_file() else None)
    if (path / pytorch_io.CONFIG_NAME).is_file():
        config_file, weights = _unet_files(name, path, None, config)
        return Source(name, "UNet2DModel folder", weights, weights.name, _unet_config(config_file))
    match = CHECKPOINT_FOLDER.fullmatch(path.resolve().name)
    step = int(match.group(1)) if match else None
    if (path / "unet" / pytorch_io.CONFIG_NAME).is_file():
        config_file, weights = _unet_files(name, path, "unet", config)
        ema = _unet_files(name, path, "unet_ema", config)[1] if (path / "unet_ema").is_dir() else None
        return Source(name, "train_unconditional.py checkpoint", weights, f"unet/{weights.name}",
                      _unet_config(config_file), ema_weights=ema, step=step)
    for filename in ACCELERATE_WEIGHTS:
        if (path / filename).is_file():
            return Source(name, "accelerate checkpoint without unet/", path / filename, filename, step=step)
    raise UsageError(f"{FLAG} {name}: not a DDPMPipeline folder (model_index.json), a UNet2DModel folder "
                     "(config.json) nor a checkpoint-N folder of train_unconditional.py (unet/ or model.safetensors)")


def _hub(name: str, config: TrainConfig) -> Source:
    """A DDPMPipeline or UNet2DModel repository on the Hub (its files downloaded into the cache)."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    options = {"cache_dir": config.cache_dir, "revision": config.revision, "token": config.hub_token}

    def fetch(filename: str, subfolder: str | None = None) -> Path | None:
        try:
            return Path(huggingface_hub.hf_hub_download(name, filename, subfolder=subfolder, **options))
        except EntryNotFoundError:
            return None

    try:
        index = fetch(MODEL_INDEX_NAME)
        if index is not None:
            _check_pipeline(_read_json(index))
        subfolder = None if index is None else "unet"
        config_file, weights = pytorch_io.resolve_files(name, subfolder=subfolder, variant=config.variant, **options)
        scheduler_file = None if index is None else fetch(SCHEDULER_CONFIG_NAME, "scheduler")
    except UsageError:
        raise
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        raise UsageError(f"{FLAG} {name}: not a local folder, and no DDPMPipeline or UNet2DModel could be fetched "
                         f"from the Hub under that id ({type(e).__name__}: {_first_line(e)})") from e
    kind = "UNet2DModel on the Hub" if index is None else "DDPMPipeline on the Hub"
    label = weights.name if subfolder is None else f"{subfolder}/{weights.name}"
    return Source(name, kind, weights, label, _unet_config(config_file),
                  scheduler_config=None if scheduler_file is None else _read_json(scheduler_file))


def _unet_files(name: str, root: Path, subfolder: str | None, config: TrainConfig) -> tuple[Path, Path]:
    try:
        return pytorch_io.resolve_files(root, subfolder=subfolder, variant=config.variant)
    except FileNotFoundError as e:
        raise UsageError(f"{FLAG} {name}: {e}") from e


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{FLAG}: {path} is not valid JSON ({e})") from e


def _check_pipeline(index: dict[str, Any]) -> None:
    if index.get("_class_name") not in PIPELINE_CLASSES:
        raise UsageError(f"{FLAG}: its {MODEL_INDEX_NAME} describes a {index.get('_class_name')}, not a DDPMPipeline; "
                         "jax_uncond trains unconditional UNet2DModel pipelines")


def _unet_config(path: Path) -> dict[str, Any]:
    try:
        return FlaxUNet2DModel.read_config(path)
    except json.JSONDecodeError as e:
        raise UsageError(f"{FLAG}: {path} is not valid JSON ({e})") from e
    except ValueError as e:  # another model class
        raise UsageError(f"{FLAG}: {e}") from e


def _with_scheduler(config: TrainConfig, source: Source, say: Callable[[str], None]) -> tuple[TrainConfig, str]:
    """The noise schedule: the pipeline's scheduler_config.json, with the --ddpm_* / --prediction_type
    flags given explicitly on top (a warning where they differ from what the model was trained for)."""
    explicit = [flag for flag in SCHEDULER_FLAGS if flag in config.explicit_flags]
    if source.scheduler_config is None:
        return config, "noise schedule from the --ddpm_* flags (no scheduler_config.json)"
    try:
        pretrained = FlaxDDPMScheduler.from_config(source.scheduler_config).config
    except ValueError as e:
        raise UsageError(f"{FLAG} {source.name}: its {SCHEDULER_CONFIG_NAME}: {e}") from e
    values = {}
    for flag, key in SCHEDULER_FLAGS.items():
        if flag not in explicit:
            values[flag] = pretrained[key]
        elif getattr(config, flag) != pretrained[key]:
            say(f"warning: --{flag} {getattr(config, flag)} differs from the pretrained scheduler's {key} "
                f"{pretrained[key]}: the model was trained for that schedule")
    config = dataclasses.replace(config, noise_scheduler=dict(source.scheduler_config), **values)
    given = f", with {', '.join('--' + flag for flag in explicit)} as given" if explicit else ""
    return config, f"noise schedule from its {SCHEDULER_CONFIG_NAME}{given}"


def _as_recorded(config: TrainConfig, resume: tuple[str, int]) -> TrainConfig:
    """A resumed fine-tuning run's config: the UNet config and noise schedule its checkpoint recorded (the
    --ddpm_* flags given explicitly still apply, as on any resume), whether or not the command repeats
    --pretrained_model_name_or_path. With `latest`, from the newest checkpoint whose config reads, as the
    loop restores the newest that restores (a run's checkpoints all record the same config)."""
    directory, newest = resume
    checkpoints = ckpt.Checkpoints(directory, every=1, read_only=True)
    _, saved, _ = ckpt.first_restorable(checkpoints, newest, config.resume_from_checkpoint == "latest",
                                        checkpoints.saved_config,
                                        f"--resume_from_checkpoint {config.resume_from_checkpoint}")
    if saved.get("pretrained_model_name_or_path") is None and config.pretrained_model_name_or_path is None:
        return config
    values = {flag: saved.get(flag, getattr(config, flag)) for flag in SCHEDULER_FLAGS
              if flag not in config.explicit_flags}
    return dataclasses.replace(config, unet=saved.get("unet") or config.unet, model_config_name_or_path=None,
                               noise_scheduler=saved.get("noise_scheduler"), **values)


def _read_params(source: Source, path: Path, template: Any) -> Any:
    """Float32 host parameters from one weight file, every tensor checked against `template`."""
    try:
        state_dict = pytorch_io.load_state_dict(path)
    except ImportError as e:  # a .bin without PyTorch
        raise UsageError(f"{FLAG} {source.name}: {e}") from e
    if source.unet_config is None:  # accelerate's state dict of a possibly wrapped model
        state_dict = {_unwrapped(key): value for key, value in state_dict.items()}
    try:
        params = pytorch_io.params_from_state_dict(state_dict, template, source=str(path))
    except pytorch_io.WeightMismatchError as e:
        raise UsageError(f"{FLAG} {source.name}: " + " ".join(line.strip() for line in str(e).splitlines())) from e
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def _unwrapped(key: str) -> str:
    while key.startswith(WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
