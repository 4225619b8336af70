"""Train an unconditional diffusion UNet in JAX: `python train_flax.py --help`."""

import sys

from jax_uncond.training.config import parse_args


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from jax_uncond.training.loop import run

    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
