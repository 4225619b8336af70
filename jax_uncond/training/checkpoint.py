"""Orbax checkpoints: asynchronous saves, a bounded history, exact resume onto any device count.

A checkpoint is `{output_dir}/checkpoints/checkpoint_{step}/` with three items: `state` (the
TrainState: params, EMA, optimizer state, counters), `loader` (the data loader's position) and
`config` (the run's flags as JSON, secrets removed). Orbax writes each save to a temporary folder
and renames it only when complete, so a killed or failed save never hides the last good one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from jax_uncond.errors import UsageError
from jax_uncond.training import sharding

CHECKPOINTS_SUBDIR = "checkpoints"
STEP_PREFIX = "checkpoint"


class CheckpointError(RuntimeError):
    """A checkpoint could not be found or restored; never answered by starting over silently."""


class CheckpointNotFoundError(CheckpointError, UsageError):
    """`--resume_from_checkpoint` names no complete checkpoint: a bad invocation (exit code 2)."""


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), CHECKPOINTS_SUBDIR)


def step_path(directory: str, step: int) -> str:
    """The folder of checkpoint `step` in a checkpoints directory (complete once it exists)."""
    return os.path.join(directory, f"{STEP_PREFIX}_{step}")


def _step_of(path: str) -> int | None:
    name = os.path.basename(os.path.normpath(path))
    prefix = STEP_PREFIX + "_"
    if name.startswith(prefix) and name[len(prefix):].isdigit():
        return int(name[len(prefix):])
    return None


class Checkpoints:
    """The run's checkpoint folder: save every `every` steps (async), keep `max_to_keep`, restore."""

    def __init__(self, directory: str, every: int, max_to_keep: int | None = None, *, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            step_prefix=STEP_PREFIX,
            enable_async_checkpointing=True,
            create=not read_only,
            read_only=read_only,
            save_interval_steps=1,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (partial/temporary folders are ignored)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def path(self, step: int) -> str:
        return step_path(self.directory, step)

    def save(self, step: int, state: Any, loader_state: dict[str, Any], config: dict[str, Any]) -> None:
        """Start an asynchronous save of `step` (every process must call it); returns once the
        arrays are copied off the devices, so `state` may be donated right after."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=ocp.args.JsonSave(loader_state),
            config=ocp.args.JsonSave(config),
        )
        self.manager.save(step, args=args, force=True)

    def should_save(self, step: int) -> bool:
        return step > 0 and step % self.every == 0

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
        """(state, loader position, config) of `step`, the arrays placed as `abstract_state`'s
        shardings say (so a checkpoint from 8 devices restores onto 1 and the reverse)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            loader=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
        )
        try:
            restored = self.manager.restore(step, args=args)
        except (FileNotFoundError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"could not restore {self.path(step)}: {type(e).__name__}: {e}") from e
        return restored["state"], restored["loader"], restored["config"]

    def wait(self) -> None:
        """Block until every started save is complete on disk (raises if one failed)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str) -> tuple[str, int] | None:
    """Which checkpoint `--resume_from_checkpoint` means, as (checkpoints directory, step).

    `latest` -> the newest complete checkpoint under `output_dir`, or None (start fresh);
    a path (or, as in the PyTorch script, a name under the output folder's checkpoints) -> that one,
    and a path that is not a complete checkpoint is an error.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        directory = checkpoints_dir(output_dir)
        if not os.path.isdir(directory):
            return None
        step = Checkpoints(directory, every=1, read_only=True).latest_step()
        return None if step is None else (directory, step)
    candidates = [resume_from_checkpoint, os.path.join(checkpoints_dir(output_dir), resume_from_checkpoint)]
    for path in candidates:
        step = _step_of(path)
        if step is not None and os.path.isdir(path):
            directory = os.path.dirname(os.path.abspath(os.path.normpath(path)))
            if step not in Checkpoints(directory, every=1, read_only=True).all_steps():
                raise CheckpointNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: {path} is an "
                                      "incomplete checkpoint (its save did not finish); pick another one")
            return directory, step
    raise CheckpointNotFoundError(f"--resume_from_checkpoint {resume_from_checkpoint}: not a checkpoint folder "
                          f"(expected `latest` or a path like {checkpoints_dir(output_dir)}/{STEP_PREFIX}_500)")


def abstract_state(state_shapes: Any, mesh: Mesh) -> Any:
    """`jax.ShapeDtypeStruct`s carrying the current mesh's shardings: the restore target."""
    shardings = sharding.state_shardings(mesh, state_shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings)
