"""The sampler names every command line accepts (`sample --scheduler`, and the training and evaluation
flags that pick how sample grids and FID samples are drawn): one table, name -> scheduler class.

Each sampler is built from the training scheduler's config, as diffusers users write
`DDIMScheduler.from_config(pipe.scheduler.config)`: the noise schedule stays the one the model was
trained with; keys the class does not take are dropped. Two choices differ from that plain conversion,
both measured (docs/sampling.md): the sigma samplers start at the last training timestep (linspace), and
the multistep solvers keep DDPM's x_0 clipping as their thresholding.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jax_uncond.schedulers.base import FlaxSchedulerBase
from jax_uncond.schedulers.ddim import FlaxDDIMScheduler
from jax_uncond.schedulers.ddpm import FlaxDDPMScheduler
from jax_uncond.schedulers.dpmsolver_multistep import FlaxDPMSolverMultistepScheduler
from jax_uncond.schedulers.euler_ancestral_discrete import FlaxEulerAncestralDiscreteScheduler
from jax_uncond.schedulers.euler_discrete import FlaxEulerDiscreteScheduler
from jax_uncond.schedulers.unipc_multistep import FlaxUniPCMultistepScheduler


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A scheduler class, the config keys a name sets on it, its usual step count (None: all training
    timesteps), and whether the training config's x_0 clipping becomes the class's thresholding."""

    cls: type[FlaxSchedulerBase]
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    default_steps: int | None = None
    clip_as_thresholding: bool = False


FROM_T = {"timestep_spacing": "linspace"}
"""The sigma samplers start at the last training timestep, as their diffusers classes do by default: a DDPM
config says "leading", which starts 20 steps at t = 940 and gives 5x the error there (docs/sampling.md)."""

SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(FlaxDDPMScheduler),
    "ddim": Sampler(FlaxDDIMScheduler, default_steps=50),
    "dpmsolver++": Sampler(FlaxDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", **FROM_T},
                           default_steps=20, clip_as_thresholding=True),
    "sde-dpmsolver++": Sampler(FlaxDPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", **FROM_T},
                               default_steps=25, clip_as_thresholding=True),
    "unipc": Sampler(FlaxUniPCMultistepScheduler, FROM_T, default_steps=15, clip_as_thresholding=True),
    "euler": Sampler(FlaxEulerDiscreteScheduler, FROM_T, default_steps=50),
    "euler_ancestral": Sampler(FlaxEulerAncestralDiscreteScheduler, FROM_T, default_steps=50),
}  # fmt: skip
"""Sampler name -> how to build it (docs/sampling.md: the step counts, measured on the quickstart model)."""


def make_sampler(name: str, train_config: Mapping[str, Any]) -> FlaxSchedulerBase:
    """The sampler `name`, configured from the training scheduler's config dict."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    config = {**train_config, **sampler.overrides}
    clips = config.get("clip_sample") and config.get("clip_sample_range", 1.0) == 1.0
    if sampler.clip_as_thresholding and clips and not config.get("thresholding"):
        # DDPM's default clip_sample (x_0 into [-1, 1]) has no key in these classes: their thresholding with
        # sample_max_value 1 is the same clipping. Without it, the ODE of a briefly trained pixel model
        # (the quickstart's) ends in saturated noise (docs/sampling.md).
        config.update(thresholding=True, sample_max_value=1.0)
    return sampler.cls.from_config(config)


def checked_sampler(name: str, train_scheduler: FlaxSchedulerBase, steps: int) -> FlaxSchedulerBase:
    """The sampler `name` for a model trained with `train_scheduler` (that one itself for ddpm), its
    schedule built once for `steps` steps so that a bad option or step count fails (ValueError) before
    anything compiles."""
    sampler = train_scheduler if name == "ddpm" else make_sampler(name, train_scheduler.config)
    sampler.set_timesteps(sampler.create_state(), steps)
    return sampler


def default_steps(name: str, num_train_timesteps: int) -> int:
    """The step count a sampler uses when none is given."""
    return SAMPLERS[name].default_steps or num_train_timesteps
