"""The run of `train_flax.py` and its side effects: the loop, checkpoints, the output folder, uploads, the lock,
processes joining, metrics. The pure step it drives is in `jax_uncond.training`."""
