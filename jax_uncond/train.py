"""Train an unconditional diffusion UNet in JAX: `jax-uncond-train --help` (also `python train_flax.py`)."""

from __future__ import annotations

import os
import sys
from typing import Sequence

from jax_uncond import xla_flags
from jax_uncond.console import setup_logging
from jax_uncond.errors import RunError, UsageError
from jax_uncond.training.config import parse_args


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parses the flags (and the `--config` preset) and runs the training; returns 2 for a bad invocation,
    1 when the run cannot go on.

    `prog` names the command in `--help` and in errors; by default, the way it was called
    (`train_flax.py`, `jax-uncond-train`).
    """
    setup_logging()
    prog = prog or os.path.basename(sys.argv[0])
    config = parse_args(argv, prog)
    xla_flags.apply()
    from jax_uncond.run.loop import run

    try:
        run(config)
    except UsageError as e:  # a bad invocation found at start-up: one line, exit code 2, like argparse
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # the run cannot go on (e.g. a checkpoint cannot be written): one line, exit code 1
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jax_uncond.train"))
