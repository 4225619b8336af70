"""Write failures a run survives, and the one hook that injects them for tests.

A sample grid, the pipeline folder or a log event that cannot be written costs one warning and the
run goes on (`Survivor`); a checkpoint that cannot be saved stops the run (checkpoint.py). Tests
inject failures through one environment variable, read here only:

    JAX_UNCOND_FAULTS=save:30,read:20,grid,pipeline,log,upload

`save:N` fails the save of checkpoint N as a full disk would (inside Orbax's commit, so the folder is
never completed); `read:N` makes the files of checkpoint N unreadable to this process (an I/O error, as
from a failing disk or a network file system that one host sees differently: set it on one process);
`grid`, `pipeline`, `log` and `upload` fail every sample grid, pipeline folder, tracker event and Hub
upload attempt with an OSError; `prepare_kill:N` makes jax-uncond-prepare kill
itself (SIGKILL, as a preempted machine) once N records are written.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Any, Callable

FAULTS_ENV = "JAX_UNCOND_FAULTS"

logger = logging.getLogger(__name__)


def _entries() -> list[tuple[str, str]]:
    """JAX_UNCOND_FAULTS as (kind, N or "") pairs."""
    return [entry.strip().partition(":")[::2] for entry in os.environ.get(FAULTS_ENV, "").split(",")]


def injected(kind: str, step: int | None = None) -> bool:
    """Whether JAX_UNCOND_FAULTS asks `kind` (at `step`, for `save:N`) to fail."""
    return any(name == kind and (not at or (step is not None and at == str(step))) for name, at in _entries())


def injected_at(kind: str) -> int | None:
    """N of a `kind:N` entry of JAX_UNCOND_FAULTS, or None (read once, for checks in a hot loop)."""
    return next((int(at) for name, at in _entries() if name == kind and at.isdigit()), None)


def fail_if_injected(kind: str, step: int | None = None) -> None:
    """Raises the OSError a full disk (an unreadable file, for `read`) would, when JAX_UNCOND_FAULTS asks for it."""
    if injected(kind, step):
        code = errno.EIO if kind == "read" else errno.ENOSPC
        raise OSError(code, f"{os.strerror(code)} (injected by {FAULTS_ENV})")


class Survivor:
    """Turns a failed side write into one warning per kind of write; the run goes on."""

    def __init__(self) -> None:
        self.failures: dict[str, int] = {}

    def attempt(self, kind: str, what: str, write: Callable[[], Any]) -> bool:
        """Calls `write`; an OSError (full disk, lost permission, network file system) is a warning naming
        `what` (the first of its `kind`; later ones are counted) and False, and the run goes on."""
        try:
            fail_if_injected(kind)
            write()
        except OSError as e:
            count = self.failures[kind] = self.failures.get(kind, 0) + 1
            if count == 1:
                logger.warning("could not write %s (%s: %s); training goes on (further %s failures are "
                               "counted in the run summary, not repeated)", what, type(e).__name__, e, kind)
            return False
        return True
