"""jax_uncond: unconditional diffusion training in JAX/Flax, exported to diffusers."""

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
