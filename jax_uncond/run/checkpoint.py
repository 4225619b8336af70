"""Orbax checkpoints: asynchronous saves, a bounded history, exact resume onto any device count.

A checkpoint is `{output_dir}/checkpoints/checkpoint_{step}/` with three items: `state` (the
TrainState: params, EMA, optimizer state, counters), `loader` (the data loader's position) and
`config` (the run's flags as JSON, secrets removed), plus the list of its files with their CRC-32s
(`checkpoint_files.py`). Orbax writes each save to a temporary folder and renames it only when
complete, so a killed or failed save never hides the last good one.

A checkpoint that cannot be restored (a file missing, truncated or corrupted; unreadable metadata)
is never an unexplained crash nor a silent fresh start: with `--resume_from_checkpoint latest` the run
falls back to the newest checkpoint that restores, one warning line for each one it passes over, and
moves those aside as `checkpoint_{step}.broken` (never deleted; the run will save those steps again);
if none restores, or a checkpoint named by its path does not, it stops with one line (exit code 2).
A save that fails (full disk, lost permission) stops the run with one line (exit code 1); the
checkpoints before it are untouched, since `--checkpoints_total_limit` deletes old checkpoints only
after a newer save has completed. The checkpoints the limit keeps are the newest by step, and after a
fallback the newest of those are this run's completed saves and the checkpoint it restored: the
last good checkpoint is never deleted in favour of a broken one.

Resuming from an older checkpoint than the newest (`--resume_from_checkpoint PATH`, the usual answer to
a loss spike) would fail hours later at the first step saved again; it is refused at start-up unless
`--rollback` moves the newer checkpoints into `superseded-{step}-{time}/` (`resume_point`). Process 0
takes that decision, and reads every file list, for all processes (`agreement.py`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any, Callable, TypeVar

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jax_uncond.console import say
from jax_uncond.errors import RunError, UsageError
from jax_uncond.run import agreement, checkpoint_files
from jax_uncond.training.config import TrainConfig
from jax_uncond.run.faults import fail_if_injected

CHECKPOINTS_SUBDIR = "checkpoints"
STEP_PREFIX = "checkpoint"
BROKEN_SUFFIX = ".broken"
"""A checkpoint that could not be restored is renamed `checkpoint_{step}.broken` (Orbax ignores the name)."""
SUPERSEDED_PREFIX = "superseded-"
"""--rollback moves the checkpoints newer than the one resumed into `superseded-{step}-{time}/` (Orbax ignores it)."""
MAX_CAUSE_CHARS = 300

logger = logging.getLogger(__name__)
T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint could not be found or restored; never answered by starting over silently."""


class CheckpointNotFoundError(CheckpointError, UsageError):
    """`--resume_from_checkpoint` names no complete checkpoint: a bad invocation (exit code 2)."""


class UnrestorableCheckpointError(CheckpointError, UsageError):
    """No checkpoint that `--resume_from_checkpoint` allows can be restored: one line, exit code 2."""


class CheckpointSaveError(RunError):
    """A checkpoint could not be written: the run stops (exit code 1), earlier checkpoints intact."""


def first_line(error: BaseException) -> str:
    """`Type: first line` of the innermost cause of `error` (Orbax wraps TensorStore's errors), without
    TensorStore's JSON spec, at most MAX_CAUSE_CHARS characters."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text.split(" [tensorstore_spec")[0]
    line = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return line if len(line) <= MAX_CAUSE_CHARS else line[:MAX_CAUSE_CHARS - 3] + "..."


READ_ERRORS = (OSError, ValueError, KeyError, TypeError)
"""What Orbax and TensorStore raise for an unreadable checkpoint (found by breaking real ones):
ValueError (TensorStore's NOT_FOUND, OUT_OF_RANGE, DATA_LOSS, FAILED_PRECONDITION; JSON decoding; a
pytree that no longer matches its metadata), KeyError (an item folder missing), OSError (a file
missing or unreadable), TypeError (a tree of another structure); plus the bare `Exception` Orbax wraps
a failed array read in (its cause is TensorStore's ValueError), see `_storage_error`."""
WRITE_ERRORS = (OSError, ValueError)
"""What a failed save raises: TensorStore's RESOURCE_EXHAUSTED (full disk) or PERMISSION_DENIED as
ValueError, OSError from Orbax's own file writes, TimeoutError (an OSError) from its barriers."""


def _storage_error(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether `error` is one of `kinds`, or Orbax's bare `Exception` around one."""
    if isinstance(error, kinds):
        return True
    return type(error) is Exception and isinstance(error.__cause__, kinds)


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
        self._saving: int | None = None  # the step whose asynchronous save has not been waited for
        self._failed = False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            step_prefix=STEP_PREFIX,
            enable_async_checkpointing=True,
            create=not read_only,
            read_only=read_only,
            save_root_metadata=not read_only,  # its write is followed by a barrier: a reader must not wait for all
            save_interval_steps=0 if read_only else 1,
            async_options=None if read_only else ocp.options.AsyncOptions(
                post_finalization_callback=self._list_files),
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _list_files(self) -> None:
        """Orbax's last step before it renames a finished save into place (process 0 only): the file list."""
        step = self._saving
        fail_if_injected("save", step)
        final = self.path(step)
        temporary = final + ocp.path.atomicity_types.TMP_DIR_SUFFIX
        checkpoint_files.write(temporary if os.path.isdir(temporary) else final)

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step (partial/temporary folders are ignored)."""
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def path(self, step: int) -> str:
        return step_path(self.directory, step)

    def save(self, step: int, state: Any, loader_state: dict[str, Any], config: dict[str, Any]) -> None:
        """Start an asynchronous save of `step` (every process must call it); returns once the
        arrays are copied off the devices, so `state` may be donated right after. Raises
        CheckpointSaveError when this save or the previous one failed."""
        self.wait()
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=ocp.args.JsonSave(loader_state),
            config=ocp.args.JsonSave(config),
        )
        self._saving = step
        self._guarded(functools.partial(self.manager.save, step, args=args, force=True))

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
        error = None
        try:
            fail_if_injected("read", step)
            if jax.process_index() == 0:  # one process reads every file once; the others learn the answer
                checkpoint_files.verify(self.path(step))
        except (checkpoint_files.ChecksumError, OSError) as e:
            error = e
        failed = agreement.failures("verify", None if error is None else first_line(error))
        if not failed:
            try:
                restored = self.manager.restore(step, args=args)
            except Exception as e:  # noqa: BLE001 - only what _storage_error recognises; the rest re-raised
                if not _storage_error(e, READ_ERRORS):
                    raise
                error = e
            failed = agreement.failures("restore", None if error is None else first_line(error))
        if failed:
            causes = "; ".join(c if jax.process_count() == 1 else f"on process {p}: {c}" for p, c in failed.items())
            raise CheckpointError(f"could not restore {self.path(step)}: {causes}") from error
        return restored["state"], restored["loader"], restored["config"]

    def saved_config(self, step: int) -> dict[str, Any]:
        """The `config` item of checkpoint `step`: the run's flags (raises CheckpointError if unreadable)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
        except Exception as e:  # noqa: BLE001 - only what _storage_error recognises; the rest re-raised
            if not _storage_error(e, READ_ERRORS):
                raise
            raise CheckpointError(f"could not restore {self.path(step)}: {first_line(e)}") from e

    def _guarded(self, operation: Callable[[], Any]) -> None:
        """Runs a save-side Orbax call; a storage failure becomes one CheckpointSaveError naming the step."""
        try:
            operation()
        except Exception as e:  # noqa: BLE001 - only what _storage_error recognises; the rest re-raised
            if not _storage_error(e, WRITE_ERRORS):
                raise
            self._failed = True
            if isinstance(e, ocp.checkpoint_manager.StepAlreadyExistsError):
                raise CheckpointSaveError(
                    f"checkpoint {self._saving} already exists in {self.directory}: this run resumed from an older "
                    "checkpoint than the newest; rerun with --rollback to move the newer ones aside, or resume with "
                    "--resume_from_checkpoint latest") from e
            raise CheckpointSaveError(
                f"saving checkpoint {self._saving} to {self.directory} failed ({first_line(e)}); the earlier "
                "checkpoints are intact: free space or fix permissions, then rerun with "
                "--resume_from_checkpoint latest") from e

    def wait(self) -> None:
        """Block until every started save is complete on disk (raises CheckpointSaveError if one failed)."""
        if not self._failed:
            self._guarded(self.manager.wait_until_finished)

    def close(self) -> None:
        """Waits for the last save; after a failed save, only lets go (Orbax would raise its error again)."""
        if self._failed:
            return
        self.wait()
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
        broken = sorted(n for n in os.listdir(directory) if BROKEN_SUFFIX in n)
        if step is None and broken:
            raise UnrestorableCheckpointError(f"--resume_from_checkpoint latest: {directory} holds only checkpoints "
                                              f"that could not be restored ({', '.join(broken)}); repair or move "
                                              "them away to start fresh")
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


def resume_point(config: TrainConfig) -> tuple[str, int] | None:
    """Which checkpoint the run resumes from (`resolve_resume`), decided on process 0 for every process.

    A checkpoint named by its path, while the run's own folder holds newer ones the run would save over, is
    refused at start-up (one line, exit code 2) unless --rollback moves those aside first (`supersede`).
    """
    def decide() -> list[Any] | None:
        resume = resolve_resume(config.resume_from_checkpoint, config.output_dir)
        if resume is not None and config.resume_from_checkpoint != "latest":
            _roll_back(config, resume[1])
        return None if resume is None else list(resume)

    resume = agreement.on_process_0("resume", decide)
    return None if resume is None else (resume[0], int(resume[1]))


def _roll_back(config: TrainConfig, step: int) -> None:
    """Refuses, or with --rollback moves aside (one line), the checkpoints of the run's folder newer than `step`."""
    directory = checkpoints_dir(config.output_dir)
    newer = [s for s in Checkpoints(directory, 1, read_only=True).all_steps() if s > step] \
        if os.path.isdir(directory) else []
    if not newer:
        return
    steps = ", ".join(map(str, newer))
    if not config.rollback:
        raise UsageError(f"--resume_from_checkpoint {config.resume_from_checkpoint}: {directory} holds newer "
                         f"checkpoints ({steps}), which this run would save over; add --rollback to move them to "
                         f"{directory}/{SUPERSEDED_PREFIX}{step}-<time>/ and continue from step {step}, or pass a new "
                         "--output_dir")
    target = supersede(directory, step, newer)
    say(f"--rollback: checkpoints {steps} moved to {target} (kept, never deleted); continuing from step {step}")


def supersede(directory: str, step: int, newer: list[int]) -> str:
    """Moves the checkpoints `newer` of `directory` into a new `superseded-{step}-{time}` folder there: kept,
    never deleted, out of Orbax's sight, so a run resumed from `step` saves those steps again. Returns it."""
    target = os.path.join(directory, f"{SUPERSEDED_PREFIX}{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    suffix = 1
    while os.path.exists(target if suffix == 1 else f"{target}.{suffix}"):
        suffix += 1
    target = target if suffix == 1 else f"{target}.{suffix}"
    os.makedirs(target)
    for s in newer:
        os.rename(step_path(directory, s), step_path(target, s))
    return target


def first_restorable(checkpoints: Checkpoints, newest: int, fallback: bool, attempt: Callable[[int], T],
                     asked: str) -> tuple[int, T, list[tuple[int, CheckpointError]]]:
    """(step, attempt(step), the newer failures) for `newest` or, with `fallback`, the newest older
    complete checkpoint for which `attempt` raises no CheckpointError. If none does: one-line
    UnrestorableCheckpointError starting with `asked` (what the user asked for), and nothing on disk
    is changed."""
    steps = [s for s in sorted(checkpoints.all_steps(), reverse=True) if s <= newest] if fallback else [newest]
    failures: list[tuple[int, CheckpointError]] = []
    for step in steps:
        try:
            return step, attempt(step), failures
        except CheckpointError as e:
            failures.append((step, e))
    if not fallback:
        raise UnrestorableCheckpointError(f"{asked}: {failures[0][1]}; choose another checkpoint, or the run's "
                                          "newest one that restores")
    raise UnrestorableCheckpointError(
        f"{asked}: none of the {len(steps)} checkpoints in {checkpoints.directory} can be restored (the newest: "
        f"{failures[0][1]}); nothing was changed: repair them, or move them away to start fresh")


def quarantine(checkpoints: Checkpoints, step: int) -> str:
    """Renames checkpoint `step` to `checkpoint_{step}.broken` (or `.broken.2`, ...): kept for inspection,
    out of Orbax's sight, so the run can save that step again. Process 0 renames; every process reloads."""
    path = checkpoints.path(step)
    target = path + BROKEN_SUFFIX
    if jax.process_index() == 0:
        n = 1
        while os.path.exists(target):
            n += 1
            target = f"{path}{BROKEN_SUFFIX}.{n}"
        os.rename(path, target)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jax_uncond quarantine {step}")
    checkpoints.manager.reload()
    return target


def restore_resume(resume: tuple[str, int], resume_from_checkpoint: str, run_checkpoints: Checkpoints, target: Any
                   ) -> tuple[Checkpoints, int, tuple[Any, dict[str, Any], dict[str, Any]]]:
    """(where, step, (state, loader position, config)) to resume from: `resolve_resume`'s checkpoint, or
    with `--resume_from_checkpoint latest` the newest that restores. Each newer one passed over is one
    warning line and, in the run's own folder, is moved aside (`quarantine`)."""
    directory, newest = resume
    source = run_checkpoints if directory == run_checkpoints.directory else Checkpoints(directory, 1, read_only=True)
    step, restored, failures = first_restorable(source, newest, resume_from_checkpoint == "latest",
                                                lambda s: source.restore(s, target),
                                                f"--resume_from_checkpoint {resume_from_checkpoint}")
    for broken, error in failures:
        kept = quarantine(source, broken) if source is run_checkpoints else source.path(broken)
        if jax.process_index() == 0:
            logger.warning("%s; kept as %s (never deleted) and resuming from an older checkpoint", error, kept)
    return source, step, restored

