"""Every command-line flag of `train_flax.py`: its name, default and help, in one table.

The names, defaults and meanings of diffusers' `train_unconditional.py` are kept unchanged; the
flags that script lacks come after it in each group. A YAML preset (`--config FILE`) sets
defaults, and explicit flags override it. The result is one frozen `TrainConfig`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
from importlib import resources
from typing import Any, Callable, Mapping, Sequence

import yaml

from jax_uncond import __version__
from jax_uncond.evaluation.inception import BLOCK_INDEX_BY_DIM
from jax_uncond.schedulers.samplers import SAMPLERS
from jax_uncond.training.sharding import SHARD_STATE_MODES

SECRET_KEYS = frozenset({"hub_token"})
"""Config keys that never reach logs, saved configs, checkpoints or uploads."""

LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


@dataclasses.dataclass(frozen=True)
class Flag:
    """One command-line flag; `group` only orders `--help`."""

    name: str
    default: Any
    help: str
    type: Callable[[str], Any] | None = None
    choices: Sequence[Any] | None = None
    store_true: bool = False
    group: str = "misc"
    pytorch: bool = True  # False: a flag diffusers' train_unconditional.py does not have


def _flags() -> list[Flag]:
    F = Flag
    return [
        # --- data (diffusers' flags first)
        F("dataset_name", None, "A Hugging Face dataset: a Hub id or a local path saved by `datasets`; or "
          "`tfds:NAME[/CONFIG][:SPLIT]` for TensorFlow Datasets; or `arrayrecord:DIR` for a folder written by "
          "jax-uncond-prepare. With neither this nor --train_data_dir, the built-in dataset is used.", str,
          group="data"),
        F("dataset_config_name", None, "The config of the dataset; leave unset if there is only one.", str, group="data"),
        F("train_data_dir", None, "A folder of images (nested folders included), read as `datasets`' imagefolder; "
          "or a folder written by jax-uncond-prepare (recognised by its manifest).", str, group="data"),
        F("cache_dir", None, "Where downloaded datasets and models are stored.", str, group="data"),
        F("resolution", 64, "Images are resized (shorter side, bilinear) and cropped to this size.", int, group="data"),
        F("center_crop", False, "Center-crop to --resolution; otherwise crop at a random position.",
          store_true=True, group="data"),
        F("random_flip", False, "Flip images horizontally at random.", store_true=True, group="data"),
        F("dataloader_num_workers", 0, "Worker processes that decode and augment; 0 decodes in the main process.",
          int, group="data"),
        F("preserve_input_precision", False, "Keep 16-bit sources at full precision (no 8-bit RGB conversion); "
          "1/2/4-channel images are mapped to 3 channels.", store_true=True, group="data"),
        F("image_column", None, "The dataset column holding the images (default: the first Image feature, else "
          "`image` or `img`).", str, group="data", pytorch=False),
        F("tfds_data_dir", None, "TensorFlow Datasets' data_dir for `--dataset_name tfds:...`.", str, group="data",
          pytorch=False),
        # --- model
        F("model_config_name_or_path", None, "A UNet2DModel config: a folder or Hub id with config.json, or a "
          "config.json file. Default: the 6-level 64x64 UNet of diffusers' example.", str, group="model"),
        F("gradient_checkpointing", False, "Rematerialise each UNet block in the backward pass: less memory, "
          "about a third more compute.", store_true=True, group="model", pytorch=False),
        F("enable_xformers_memory_efficient_attention", False, "Memory-efficient attention: cuDNN flash attention "
          "on NVIDIA GPUs with --mixed_precision bf16; elsewhere XLA's attention, with a note.", store_true=True,
          group="model"),
        F("pretrained_model_name_or_path", None, "Start from a trained model instead of random weights: a "
          "DDPMPipeline or UNet2DModel folder, a Hub id of either, or a checkpoint-N folder of diffusers' "
          "train_unconditional.py (see docs/fine-tuning.md).", str, group="model", pytorch=False),
        F("revision", None, "The Hub revision (branch, tag or commit) of --pretrained_model_name_or_path.", str,
          group="model", pytorch=False),
        F("variant", None, "The weights variant of --pretrained_model_name_or_path, e.g. fp16 for "
          "diffusion_pytorch_model.fp16.safetensors.", str, group="model", pytorch=False),
        F("resume_step_from_pretrained", False, "With a checkpoint-N folder as --pretrained_model_name_or_path: "
          "continue the step count at N (LR schedule, EMA warm-up); optimizer moments start afresh.",
          store_true=True, group="model", pytorch=False),
        # --- training
        F("output_dir", "ddpm-model-64", "Where the DDPMPipeline folder, checkpoints, logs and samples are written.",
          str, group="training"),
        F("overwrite_output_dir", False, "Accepted for compatibility; an existing output folder is reused (and "
          "resumed from with --resume_from_checkpoint).", store_true=True, group="training"),
        F("train_batch_size", 16, "Batch size per device (as in the PyTorch script).", int, group="training"),
        F("eval_batch_size", 16, "How many images each sample grid holds.", int, group="training"),
        F("num_epochs", 100, "Passes over the training data.", int, group="training"),
        F("save_images_epochs", 10, "Save a sample grid every this many epochs (and after the last).", int,
          group="training"),
        F("save_model_epochs", 10, "Write the DDPMPipeline folder every this many epochs (and after the last).",
          int, group="training"),
        F("gradient_accumulation_steps", 1, "Micro-batches accumulated per optimizer step; the update equals one "
          "step on the combined batch, and the LR schedule counts optimizer steps.", int, group="training"),
        F("prediction_type", "epsilon", "What the UNet predicts.", str, ("epsilon", "sample", "v_prediction"),
          group="training"),
        F("ddpm_num_steps", 1000, "Training timesteps of the DDPM noise schedule.", int, group="training"),
        F("ddpm_num_inference_steps", 1000, "Denoising steps for the sample grids.", int, group="training"),
        F("ddpm_beta_schedule", "linear", "The beta schedule of the noise scheduler.", str, BETA_SCHEDULES,
          group="training"),
        F("mixed_precision", "no", "bf16 computes in bfloat16 with float32 parameters; fp16 adds dynamic loss "
          "scaling.", str, ("no", "fp16", "bf16"), group="training"),
        F("local_rank", -1, "Accepted for compatibility with launchers; has no effect (JAX finds its processes).",
          int, group="training"),
        F("seed", 0, "Seeds initialisation, data order, augmentation, noise and timesteps.", int, group="training",
          pytorch=False),
        F("max_train_steps", None, "Stop after this many optimizer steps (overrides --num_epochs).", int,
          group="training", pytorch=False),
        F("global_batch_size", None, "Batch size over all devices of all hosts (instead of --train_batch_size "
          "per device).", int, group="training", pytorch=False),
        F("snr_gamma", None, "Min-SNR-gamma loss weighting (5.0 is the paper's recommendation); off by default.",
          float, group="training", pytorch=False),
        F("max_nonfinite_steps", 25, "Stop after this many consecutive steps with a non-finite loss or gradient "
          "(each is skipped and counted; the last checkpoint stays untouched).", int, group="training",
          pytorch=False),
        F("eval_scheduler", "ddpm", "The sampler of the sample grids, built from the training noise schedule; "
          "it takes --ddpm_num_inference_steps steps, so lower that too (e.g. 20 for dpmsolver++; "
          "docs/sampling.md).", str, tuple(SAMPLERS), group="training", pytorch=False),
        F("config", None, "A YAML preset: a file, or the name of one shipped with the package (e.g. quickstart; "
          "jax_uncond/configs/); explicit flags override its values.", str, group="training", pytorch=False),
        # --- optimizer
        F("learning_rate", 1e-4, "Learning rate after warm-up.", float, group="optimizer"),
        F("lr_scheduler", "cosine", "The learning-rate schedule (diffusers' names).", str, LR_SCHEDULERS,
          group="optimizer"),
        F("lr_warmup_steps", 500, "Optimizer steps of linear warm-up.", int, group="optimizer"),
        F("adam_beta1", 0.95, "AdamW beta1.", float, group="optimizer"),
        F("adam_beta2", 0.999, "AdamW beta2.", float, group="optimizer"),
        F("adam_weight_decay", 1e-6, "AdamW weight decay.", float, group="optimizer"),
        F("adam_epsilon", 1e-08, "AdamW epsilon.", float, group="optimizer"),
        # --- ema
        F("use_ema", False, "Keep an exponential moving average of the weights; it is what gets exported.",
          store_true=True, group="ema"),
        F("ema_inv_gamma", 1.0, "EMA warm-up inverse gamma.", float, group="ema"),
        F("ema_power", 3 / 4, "EMA warm-up power.", float, group="ema"),
        F("ema_max_decay", 0.9999, "Largest EMA decay.", float, group="ema"),
        # --- checkpointing
        F("checkpointing_steps", 500, "Save an Orbax checkpoint every this many optimizer steps.", int,
          group="checkpointing"),
        F("checkpoints_total_limit", None, "Keep at most this many checkpoints.", int, group="checkpointing"),
        F("resume_from_checkpoint", None, "`latest`, or the path of a checkpoint saved by --checkpointing_steps.",
          str, group="checkpointing"),
        F("rollback", False, "With --resume_from_checkpoint PATH of an older checkpoint than the run's newest: move "
          "the newer ones into checkpoints/superseded-STEP-TIME/ (kept, never deleted) and continue from PATH. "
          "Without it such a run stops at start-up.", store_true=True, group="checkpointing", pytorch=False),
        # --- logging and the Hub
        F("logger", "tensorboard", "Experiment tracker.", str, ("tensorboard", "wandb"), group="logging"),
        F("logging_dir", "logs", "Tracker folder, relative to --output_dir.", str, group="logging"),
        F("push_to_hub", False, "Upload the pipeline and logs to the Hub (checkpoints excluded).", store_true=True,
          group="logging"),
        F("hub_token", None, "Hub token; never logged or saved.", str, group="logging"),
        F("hub_model_id", None, "Hub repository to keep in sync with --output_dir.", str, group="logging"),
        F("hub_private_repo", False, "Create the Hub repository as private.", store_true=True, group="logging"),
        F("hub_license", None, "The license in the model card (README.md) of the pipeline folder: a Hub license "
          "id such as apache-2.0, mit or cc-by-4.0.", str, group="logging", pytorch=False),
        F("logging_steps", 50, "Log the metrics (loss, lr, norms, images/s) every this many optimizer steps; "
          "non-finite steps are caught at every step whatever this is.", int, group="logging", pytorch=False),
        F("profile_steps", None, "START:END: write a jax.profiler trace of optimizer steps START to END-1 to "
          "--logging_dir (open it with TensorBoard's profile plugin or Perfetto). Off by default.", str,
          group="logging", pytorch=False),
        # --- distributed
        F("coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU pods and "
          "SLURM/Open MPI (which are detected).", str, group="distributed", pytorch=False),
        F("num_processes", None, "Number of processes, with --coordinator_address.", int, group="distributed",
          pytorch=False),
        F("process_id", None, "This process's index, with --coordinator_address.", int, group="distributed",
          pytorch=False),
        F("shard_state", "replicated", "Where the train state lives: replicated on every device (plain data "
          "parallelism); optimizer: AdamW's moments and the EMA split over the devices (ZeRO-1/2); full: the "
          "parameters too (FSDP). Same training either way; checkpoints restore across modes (docs/training.md).",
          str, SHARD_STATE_MODES, group="distributed", pytorch=False),
        # --- evaluation (docs/evaluation.md)
        F("fid_epochs", 0, "Compute FID and KID of the EMA weights (the raw ones without --use_ema) every this many "
          "epochs and at the end; 0: off.", int, group="evaluation", pytorch=False),
        F("fid_num_samples", 10000, "Images sampled for each FID.", int, group="evaluation", pytorch=False),
        F("fid_scheduler", "ddim", "The sampler of the FID images.", str, tuple(SAMPLERS), group="evaluation",
          pytorch=False),
        F("fid_inference_steps", None, "Denoising steps of the FID images (default: the sampler's usual count, 50 "
          "for ddim; --ddpm_num_steps for ddpm).", int, group="evaluation", pytorch=False),
        F("fid_batch_size", None, "Images per sampling call over all devices, a multiple of their count (default: "
          "the global training batch).", int, group="evaluation", pytorch=False),
        F("fid_dims", 2048, "Inception features FID and KID use: 2048 (pool3, the standard) or an earlier block's, as "
          "pytorch-fid's --dims.", int, tuple(BLOCK_INDEX_BY_DIM), group="evaluation", pytorch=False),
        F("fid_reference", None, "The reference: a folder of images, or an .npz with `mu` and `sigma` (pytorch-fid's "
          "format). Default: the training data through the loader, its statistics cached in --output_dir.", str,
          group="evaluation", pytorch=False),
        F("inception_weights", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: downloaded once "
          "into $JAX_UNCOND_CACHE or ~/.cache/jax_uncond, checksum checked).", str, group="evaluation",
          pytorch=False),
    ]


FLAGS: tuple[Flag, ...] = tuple(_flags())
PRESET_ONLY_KEYS = frozenset({"unet"})
"""YAML-only keys: `unet` is an inline UNet2DModel config mapping (instead of --model_config_name_or_path)."""
PRESET_KEYS = frozenset(f.name for f in FLAGS) | PRESET_ONLY_KEYS
"""The keys a YAML preset may hold."""

TrainConfig = dataclasses.make_dataclass(
    "TrainConfig",
    [(f.name, Any, dataclasses.field(default=f.default)) for f in FLAGS]
    + [("unet", Any, dataclasses.field(default=None)), ("noise_scheduler", Any, dataclasses.field(default=None)),
       ("explicit_flags", Any, dataclasses.field(default=()))],
    frozen=True,
)
TrainConfig.__doc__ = """The frozen run configuration: one field per flag, plus `unet` from a YAML preset,
`noise_scheduler` (a pretrained pipeline's scheduler config, which the --ddpm_* flags refine) and
`explicit_flags` (the flags given on the command line or in the preset, not left at their defaults)."""


def to_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict with secrets removed (their values, and their names from `explicit_flags`):
    the form that is logged and saved."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in SECRET_KEYS}
    values["explicit_flags"] = tuple(k for k in values["explicit_flags"] if k not in SECRET_KEYS)
    return values


def to_preset(config: Any) -> dict[str, Any]:
    """The config as a YAML preset that `--config` takes back: every flag and the `unet` mapping, no secrets."""
    return {k: v for k, v in to_dict(config).items() if k in PRESET_KEYS}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one clear line and exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The argparse parser of `train_flax.py` (or `prog`), grouped as in `--help`."""
    parser = _Parser(
        prog=prog or "train_flax.py",
        description="Train an unconditional diffusion UNet in JAX; the output folder is a diffusers DDPMPipeline.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in FLAGS:
        add_flag(groups.setdefault(flag.group, parser.add_argument_group(flag.group)), flag)
    return parser


def add_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup, flag: Flag) -> None:
    """Declare `flag` on a parser (also the other commands' parsers that share training flags)."""
    help_text = flag.help + ("" if flag.store_true else " (default: %(default)s)")
    if flag.store_true:
        parser.add_argument(f"--{flag.name}", action="store_true", default=flag.default, help=help_text)
    else:
        parser.add_argument(f"--{flag.name}", type=flag.type, default=flag.default, choices=flag.choices,
                            help=help_text)


def preset_names() -> list[str]:
    """The presets shipped in the package (jax_uncond/configs/NAME.yaml), by name."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files("jax_uncond").joinpath("configs").iterdir()
                  if p.name.endswith(".yaml"))


def preset_path(name_or_path: str) -> str:
    """`--config`'s file: an existing path as given, else the shipped preset of that name (`quickstart`)."""
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path.removesuffix(".yaml")
    if name in preset_names():
        return str(resources.files("jax_uncond").joinpath("configs", f"{name}.yaml"))
    raise ValueError(f"--config {name_or_path}: no such file, nor a preset name ({', '.join(preset_names())})")


def load_preset(path: str) -> dict[str, Any]:
    """A YAML preset (a file or a shipped preset's name) as a dict, every key checked against the known flags."""
    path = preset_path(path)
    with open(path) as f:
        preset = yaml.safe_load(f) or {}
    if not isinstance(preset, dict):
        raise ValueError(f"--config {path}: expected a mapping of flag names to values")
    unknown = sorted(set(preset) - PRESET_KEYS)
    if unknown:
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, PRESET_KEYS, 1)) else k
                 for k in unknown]
        raise ValueError(f"--config {path}: unknown keys: {', '.join(hints)}")
    if SECRET_KEYS & set(preset):
        raise ValueError(f"--config {path}: secrets ({', '.join(sorted(SECRET_KEYS))}) do not belong in presets")
    return preset


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Parse the command line (and its `--config` preset) into a frozen `TrainConfig`."""
    return parse_with(build_parser(prog), argv)[0]


def parse_with(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> tuple[Any, dict[str, Any]]:
    """Parse with `build_parser`'s parser extended by a command's own flags (`jax-uncond-plan`): the
    `TrainConfig` of the training flags (and preset), and the values of the other flags by name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        options = [a for a in parser._option_string_actions if a.startswith("--")]
        first = unknown[0].split("=")[0]
        match = difflib.get_close_matches(first, options, 1)
        parser.error(f"unrecognized argument {first}" + (f"; did you mean {match[0]}?" if match else ""))
    preset: dict[str, Any] = {}
    if args.config:
        try:
            preset = load_preset(args.config)
        except ValueError as e:
            parser.error(str(e))
        parser.set_defaults(**{k: v for k, v in preset.items() if k not in PRESET_ONLY_KEYS})
        args = parser.parse_args(argv)
    names = {f.name for f in FLAGS}
    values = {k: v for k, v in vars(args).items() if k in names}
    others = {k: v for k, v in vars(args).items() if k not in names}
    env_rank = int(os.environ.get("LOCAL_RANK", -1))
    if env_rank != -1:
        values["local_rank"] = env_rank
    explicit = tuple(sorted((set(preset) - PRESET_ONLY_KEYS) | _given_on_command_line(argv)))
    try:
        return validate(TrainConfig(**values, unet=preset.get("unet"), explicit_flags=explicit)), others
    except ValueError as e:
        parser.error(str(e))


def profile_window(spec: str) -> tuple[int, int]:
    """`--profile_steps START:END` -> (START, END), 0 <= START < END; a ValueError naming the flag otherwise."""
    try:
        start, end = (int(part) for part in str(spec).split(":"))
    except ValueError:
        start = end = -1
    if not 0 <= start < end:
        raise ValueError(f"--profile_steps {spec!r}: expected START:END with 0 <= START < END, e.g. 10:20")
    return start, end


def _given_on_command_line(argv: Sequence[str]) -> set[str]:
    """The flags `argv` sets (parsed again with every default replaced by a marker)."""
    unset = object()
    parser = build_parser()
    parser.set_defaults(**{f.name: unset for f in FLAGS})
    args, _ = parser.parse_known_args(argv)
    return {name for name, value in vars(args).items() if value is not unset}


def validate(config: Any) -> Any:
    """Checks that need no file system or devices; raises ValueError naming the flag."""
    positive = ["resolution", "train_batch_size", "eval_batch_size", "num_epochs", "save_images_epochs",
                "save_model_epochs", "gradient_accumulation_steps", "ddpm_num_steps", "ddpm_num_inference_steps",
                "checkpointing_steps", "max_nonfinite_steps", "logging_steps"]
    for key in positive + ["max_train_steps", "global_batch_size", "checkpoints_total_limit", "fid_num_samples",
                           "fid_inference_steps", "fid_batch_size"]:
        value = getattr(config, key)
        if value is not None and value <= 0:
            raise ValueError(f"--{key} must be positive, got {value}")
    if config.profile_steps is not None:
        profile_window(config.profile_steps)
    if config.fid_epochs < 0:
        raise ValueError(f"--fid_epochs must be >= 0 (0: no FID), got {config.fid_epochs}")
    if config.dataloader_num_workers < 0:
        raise ValueError(f"--dataloader_num_workers must be >= 0, got {config.dataloader_num_workers}")
    if config.dataset_name is not None and config.train_data_dir is not None:
        raise ValueError("give either --dataset_name or --train_data_dir, not both")
    if config.unet is not None and config.model_config_name_or_path is not None:
        raise ValueError("the preset's `unet` mapping and --model_config_name_or_path both set the model; give one")
    if config.unet is not None and not isinstance(config.unet, Mapping):
        raise ValueError("the preset's `unet` must be a mapping of UNet2DModel config keys")
    if config.rollback and config.resume_from_checkpoint in (None, "latest"):
        raise ValueError("--rollback goes with --resume_from_checkpoint PATH, an older checkpoint than the newest")
    if config.pretrained_model_name_or_path is None:
        needing = [f"--{k}" for k in ("revision", "variant", "resume_step_from_pretrained") if getattr(config, k)]
        if needing:
            raise ValueError(f"{', '.join(needing)} only apply to --pretrained_model_name_or_path, which is not given")
    return config
