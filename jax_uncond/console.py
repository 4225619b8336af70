"""What reaches the user's terminal: this package's lines, not its libraries' internal chatter.

`setup_logging()` is called once at start-up by every command (`jax-uncond-train` / `train_flax.py`,
`-export`, `-sample`, `-evaluate`). Library records that say nothing the user must act on are dropped:
absl records below ERROR (Orbax logs through absl: "Given directory is read only", "Waiting for
previous save to complete took ..."), absl errors that carry a traceback (Orbax logs every failure it
also raises, and the run reports the raised exception in one line), and asyncio's "exception was never
retrieved" (the sibling reads or writes of a checkpoint operation that already failed). An OSError
that ends a background thread (a library's writer or uploader on a full disk) is one line instead of a
traceback. `JAX_UNCOND_LIBRARY_LOGS=1` shows everything, for debugging.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, TextIO

LIBRARY_LOGS_ENV = "JAX_UNCOND_LIBRARY_LOGS"
FORMAT = "%(levelname)s: %(message)s"

logger = logging.getLogger("jax_uncond")


class _TqdmHandler(logging.StreamHandler):
    """Writes each record above the progress bar (tqdm.write), so warnings do not garble it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except OSError:
            self.handleError(record)


class _AbslFilter(logging.Filter):
    """Passes absl records the user must act on: errors without a traceback (their first line only)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or record.exc_info:
            return False
        record.msg, record.args = record.getMessage().splitlines()[0], None
        return True


class _AsyncioFilter(logging.Filter):
    """Drops asyncio's reports of sibling tasks that failed with an operation already reported."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "exception was never retrieved" not in str(record.msg)


def _thread_excepthook(args: Any) -> None:
    """An OSError that ends a background thread is one warning line; anything else keeps its traceback."""
    if isinstance(args.exc_value, OSError):
        name = args.thread.name if args.thread is not None else "a background thread"
        logger.warning("background thread %s stopped: %s: %s", name, type(args.exc_value).__name__, args.exc_value)
        return
    threading.__excepthook__(args)


def say(message: str, file: TextIO | None = None) -> None:
    """One line for the user, from process 0 only, above any progress bar (on stdout unless `file`)."""
    import jax
    from tqdm import tqdm

    if jax.process_index() == 0:
        tqdm.write(message, file=file)


def setup_logging() -> None:
    """Our warnings as `WARNING: ...` on stderr, above the progress bar; library chatter filtered (idempotent)."""
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter(FORMAT))
    logging.basicConfig(handlers=[handler])
    if os.environ.get(LIBRARY_LOGS_ENV, "") not in ("", "0"):
        return
    for name, kind in (("absl", _AbslFilter), ("asyncio", _AsyncioFilter)):
        target = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in target.filters):
            target.addFilter(kind())
    threading.excepthook = _thread_excepthook
