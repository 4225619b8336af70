"""The pure training step: flags (config), mesh and shardings, the train state, the optimizer, the EMA and the
jitted step. No files, no processes: the run that drives it is `jax_uncond.run`."""
