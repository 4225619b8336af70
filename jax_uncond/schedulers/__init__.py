"""JAX noise schedulers numerically identical to diffusers' DDPMScheduler and DDIMScheduler."""

from jax_uncond.schedulers.common import CommonSchedulerState, FlaxSchedulerOutput
from jax_uncond.schedulers.ddim import DDIMSchedulerState, FlaxDDIMScheduler
from jax_uncond.schedulers.ddpm import DDPMSchedulerState, FlaxDDPMScheduler

__all__ = [
    "CommonSchedulerState",
    "DDIMSchedulerState",
    "DDPMSchedulerState",
    "FlaxDDIMScheduler",
    "FlaxDDPMScheduler",
    "FlaxSchedulerOutput",
]
