"""Train an unconditional diffusion UNet in JAX: `python train_flax.py --help`.

The drop-in for diffusers' `train_unconditional.py` (same flags); the installed command is
`jax-uncond-train`. Both run `jax_uncond.train.main`.
"""

import sys

from jax_uncond.train import main

if __name__ == "__main__":
    sys.exit(main())
