"""jax_uncond: unconditional diffusion training in JAX/Flax, exported to diffusers."""

__version__ = "0.1.0"
"""The package version: pyproject.toml reads it from here, and every command's `--version` prints it."""

from jax_uncond.models import FlaxUNet2DModel
from jax_uncond.schedulers import (
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerAncestralDiscreteScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxUniPCMultistepScheduler,
)
from jax_uncond.pipelines import FlaxDDPMPipeline
