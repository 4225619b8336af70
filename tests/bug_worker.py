"""`train_flax.py` with a bug at one step: `python bug_worker.py STEP FLAGS...` raises a RuntimeError in the
training loop once step STEP's metrics are read, for the tests of a process that fails alone."""

import sys

from jax_uncond.run import loop
from jax_uncond.train import main

BUGGY_STEP = int(sys.argv.pop(1))
check_finite = loop._check_finite


def buggy_check_finite(values: dict, step: int, limit: int) -> None:
    if step == BUGGY_STEP:
        raise RuntimeError(f"a bug at step {step}")
    check_finite(values, step, limit)


loop._check_finite = buggy_check_finite
sys.exit(main(prog="train_flax.py"))
