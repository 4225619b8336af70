"""The sampler names every command line accepts (`sample --scheduler`, and the training and evaluation
flags that pick how sample grids and FID samples are drawn): one table, name -> scheduler class.

Each sampler is built from the training scheduler's config, as diffusers users write
`DDIMScheduler.from_config(pipe.scheduler.config)`: the noise schedule stays the one the model was
trained with; keys the class does not take are dropped.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jax_uncond.schedulers.base import FlaxSchedulerBase
from jax_uncond.schedulers.ddim import FlaxDDIMScheduler
from jax_uncond.schedulers.ddpm import FlaxDDPMScheduler


@dataclasses.dataclass(frozen=True)
class Sampler:
    """A scheduler class, the config keys a name sets on it, and its usual step count (None: all
    training timesteps)."""

    cls: type[FlaxSchedulerBase]
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    default_steps: int | None = None


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(FlaxDDPMScheduler),
    "ddim": Sampler(FlaxDDIMScheduler, default_steps=50),
}
"""Sampler name -> how to build it."""


def make_sampler(name: str, train_config: Mapping[str, Any]) -> FlaxSchedulerBase:
    """The sampler `name`, configured from the training scheduler's config dict."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    return sampler.cls.from_config({**train_config, **sampler.overrides})


def default_steps(name: str, num_train_timesteps: int) -> int:
    """The step count a sampler uses when none is given."""
    return SAMPLERS[name].default_steps or num_train_timesteps
