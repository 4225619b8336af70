"""jax_uncond: unconditional diffusion training in JAX/Flax, exported to diffusers."""
