"""A training checkpoint -> a diffusers DDPMPipeline folder: `python -m jax_uncond.export SRC OUTPUT_DIR`.

SRC is a checkpoint folder (`.../checkpoints/checkpoint_<step>`) or a run's output folder (then its
newest checkpoint that restores: one warning line for each newer one that does not). The UNet and
scheduler are rebuilt from the config saved in the checkpoint, and `--ema` (the default when the run
kept an EMA) or `--no-ema` chooses the weights. No PyTorch needed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any, Sequence

import jax

from jax_uncond import __version__, xla_flags
from jax_uncond.console import setup_logging
from jax_uncond.errors import UsageError
from jax_uncond.model_card import newest_grid, write_model_card

if TYPE_CHECKING:
    from jax_uncond.run.checkpoint import Checkpoints

logger = logging.getLogger(__name__)


def locate(source: str) -> tuple[str, int, bool]:
    """(checkpoints directory, step, whether older checkpoints may stand in) for a checkpoint folder
    or a run's output folder (its newest checkpoint, and the older ones when that cannot be restored)."""
    from jax_uncond.run import checkpoint as ckpt

    if os.path.isdir(ckpt.checkpoints_dir(source)):
        found = ckpt.resolve_resume("latest", source)
        if found is None:
            raise UsageError(f"{source}: its checkpoints folder holds no complete checkpoint")
        return (*found, True)
    if os.path.isdir(source):
        try:
            return (*ckpt.resolve_resume(os.path.abspath(source), source), False)
        except ckpt.CheckpointError as e:
            raise UsageError(f"{source}: not a checkpoint folder nor a run's output folder with checkpoints "
                             f"({e})") from e
    raise UsageError(f"{source}: no such folder")


def saved_config(checkpoints: Checkpoints, step: int) -> Any:
    """The run's TrainConfig as saved in the checkpoint (secrets were never saved)."""
    from jax_uncond.training.config import TrainConfig

    saved = checkpoints.saved_config(step)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in saved.items() if k in known})


def restore_weights(checkpoints: Checkpoints, step: int, config: Any, model: Any, ema: bool) -> Any:
    """The UNet parameters (EMA or raw) of the checkpoint, on this machine's first device."""
    from jax_uncond.training import sharding
    from jax_uncond.training.optim import make_optimizer
    from jax_uncond.training.state import train_state_shapes

    optimizer, _ = make_optimizer(config, 1, model)
    shapes = train_state_shapes(config, model, optimizer)
    mesh = sharding.make_mesh(jax.devices()[:1])
    state, _, _ = checkpoints.restore(step, sharding.abstract_state(shapes, mesh))
    return state.ema_params if ema else state.params


def copy_newest_grid(directory: str, step: int, output_dir: str) -> None:
    """The run's newest sample grid into output_dir/samples/, for the model card, when `step` is the run's
    newest checkpoint (an older checkpoint's weights did not draw it)."""
    from jax_uncond.run import checkpoint as ckpt
    from jax_uncond.run.outputs import SAMPLES_DIR

    run_dir = os.path.dirname(os.path.abspath(directory))
    grid = newest_grid(os.path.join(run_dir, SAMPLES_DIR))
    newest = ckpt.resolve_resume("latest", run_dir)
    if grid is None or newest is None or newest != (ckpt.checkpoints_dir(run_dir), step):
        return
    target = os.path.join(output_dir, SAMPLES_DIR, os.path.basename(grid))
    if not os.path.exists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(grid, target)


def load(checkpoints: Checkpoints, step: int, source: str, ema: bool | None) -> tuple[Any, Any, Any, bool]:
    """(the run's config, the inference model, parameters, whether they are the EMA) of checkpoint `step`."""
    from jax_uncond.run.loop import build_model

    config = saved_config(checkpoints, step)
    if ema and not config.use_ema:
        raise UsageError(f"--ema: the run of {source} kept no EMA (it ran without --use_ema); use --no-ema")
    ema = config.use_ema if ema is None else ema
    inference = dataclasses.replace(config, mixed_precision="no", gradient_checkpointing=False,
                                    enable_xformers_memory_efficient_attention=False)
    model = build_model(inference)
    return config, model, restore_weights(checkpoints, step, inference, model, ema), ema


def export(source: str, output_dir: str, ema: bool | None = None) -> str:
    """Writes the DDPMPipeline folder of `source`'s checkpoint, with its model card, to `output_dir`;
    returns a one-line summary."""
    from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline
    from jax_uncond.run import checkpoint as ckpt
    from jax_uncond.run.loop import build_scheduler
    from jax_uncond.run.outputs import SAMPLES_DIR

    directory, newest, fallback = locate(source)
    checkpoints = ckpt.Checkpoints(directory, every=1, read_only=True)
    step, (config, model, params, ema), failures = ckpt.first_restorable(
        checkpoints, newest, fallback, lambda s: load(checkpoints, s, source, ema), source)
    for _, error in failures:
        logger.warning("%s; exporting an older checkpoint", error)
    FlaxDDPMPipeline(unet=model, scheduler=build_scheduler(config)).save_pretrained(output_dir, {"unet": params})
    copy_newest_grid(directory, step, output_dir)
    write_model_card(output_dir, config, params, samples=SAMPLES_DIR, step=step, ema=ema, name_or_path=output_dir)
    return f"{'EMA' if ema else 'raw'} weights of {directory}/checkpoint_{step} exported to {output_dir}"


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`jax-uncond-export` (`prog`: the command's name in --help and errors; default: how it was called)."""
    setup_logging()
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("source", metavar="CHECKPOINT_OR_OUTPUT_DIR",
                        help="A checkpoint folder, or a run's output folder (its newest checkpoint).")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="Where the DDPMPipeline folder is written.")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="Export the EMA weights (default when the run kept them) or, with --no-ema, the raw ones.")
    args = parser.parse_args(argv)
    xla_flags.apply()
    try:
        print(export(args.source, args.output_dir, args.ema))
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jax_uncond.export"))
