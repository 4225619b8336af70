"""Train an unconditional diffusion UNet in JAX: `python train_flax.py --help`."""

import sys

from jax_uncond.console import setup_logging
from jax_uncond.errors import RunError, UsageError
from jax_uncond.training.config import parse_args


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    config = parse_args(argv)
    from jax_uncond.training.loop import run

    try:
        run(config)
    except UsageError as e:  # a bad invocation found at start-up: one line, exit code 2, like argparse
        print(f"train_flax.py: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # the run cannot go on (e.g. a checkpoint cannot be written): one line, exit code 1
        print(f"train_flax.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
