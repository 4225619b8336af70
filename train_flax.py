"""Train an unconditional diffusion UNet in JAX: `python train_flax.py --help`."""

import sys

from jax_uncond import xla_flags
from jax_uncond.errors import UsageError
from jax_uncond.training.config import parse_args


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    xla_flags.apply()
    from jax_uncond.training.loop import run

    try:
        run(config)
    except UsageError as e:  # a bad invocation found at start-up: one line, exit code 2, like argparse
        print(f"train_flax.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
