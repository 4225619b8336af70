"""JAX noise schedulers numerically equal to diffusers' DDPM, DDIM, DPM-Solver multistep, UniPC multistep,
Euler and Euler-ancestral schedulers."""

from jax_uncond.schedulers.common import CommonSchedulerState, FlaxSchedulerOutput
from jax_uncond.schedulers.ddim import DDIMSchedulerState, FlaxDDIMScheduler
from jax_uncond.schedulers.ddpm import DDPMSchedulerState, FlaxDDPMScheduler
from jax_uncond.schedulers.dpmsolver_multistep import DPMSolverMultistepSchedulerState, FlaxDPMSolverMultistepScheduler
from jax_uncond.schedulers.euler_ancestral_discrete import FlaxEulerAncestralDiscreteScheduler
from jax_uncond.schedulers.euler_discrete import EulerDiscreteSchedulerState, FlaxEulerDiscreteScheduler
from jax_uncond.schedulers.unipc_multistep import FlaxUniPCMultistepScheduler, UniPCMultistepSchedulerState

__all__ = [
    "CommonSchedulerState",
    "DDIMSchedulerState",
    "DDPMSchedulerState",
    "DPMSolverMultistepSchedulerState",
    "EulerDiscreteSchedulerState",
    "FlaxDDIMScheduler",
    "FlaxDDPMScheduler",
    "FlaxDPMSolverMultistepScheduler",
    "FlaxEulerAncestralDiscreteScheduler",
    "FlaxEulerDiscreteScheduler",
    "FlaxSchedulerOutput",
    "FlaxUniPCMultistepScheduler",
    "UniPCMultistepSchedulerState",
]
