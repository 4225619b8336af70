"""FlaxEulerAncestralDiscreteScheduler: diffusers' `EulerAncestralDiscreteScheduler` as a functional JAX
scheduler.

Euler steps down to sigma_down, then fresh noise back up to sigma_{i+1} (ancestral sampling in the
k-diffusion sense): stochastic, forgiving of a coarse step count. Like Euler, the sample starts at
`init_noise_sigma` and the pipeline must call `scale_model_input` before every model call.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax_uncond.schedulers.common import (
    check_step,
    FlaxSchedulerOutput,
    euler_timesteps,
    sigma_alphas_cumprod,
    training_sigmas,
)
from jax_uncond.schedulers.euler_discrete import (
    EulerDiscreteSchedulerState,
    FlaxEulerSchedulerBase,
    predicted_original_sample,
)


class FlaxEulerAncestralDiscreteScheduler(FlaxEulerSchedulerBase):
    """Euler-ancestral: every step adds noise (from `key`, or `variance_noise`); 30-50 steps for a DDPM model.

    prediction_type "sample" works here (x_0 is the model output); diffusers raises NotImplementedError.
    """

    diffusers_class = "EulerAncestralDiscreteScheduler"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._register(locals())

    def set_timesteps(
        self, state: EulerDiscreteSchedulerState, num_inference_steps: int, shape: tuple[int, ...] = ()
    ) -> EulerDiscreteSchedulerState:
        """A state that samples with `num_inference_steps` steps, ending at sigma 0. Host-side; `shape` is
        unused (no history)."""
        c = self._config
        timesteps = euler_timesteps(len(self), num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        train_sigmas = training_sigmas(sigma_alphas_cumprod(self._betas(), c["rescale_betas_zero_snr"]))
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        return self._state(state, timesteps, sigmas, num_inference_steps)

    def step(
        self,
        state: EulerDiscreteSchedulerState,
        model_output: jax.Array,
        timestep: float | jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """An Euler step to sigma_down, then noise (standard normal from `key`, or `variance_noise`) up to
        sigma_{i+1}, with sigma_up**2 + sigma_down**2 = sigma_{i+1}**2."""
        if (key is None) == (variance_noise is None):
            raise ValueError("Euler-ancestral adds noise at every step: pass exactly one of key or variance_noise")
        check_step(state, model_output, timestep, sample)
        i = state.step_index
        sample32 = sample.astype(jnp.float32)
        sigma_from, sigma_to = state.sigmas[i], state.sigmas[i + 1]
        x0_pred = predicted_original_sample(self._config["prediction_type"], model_output, sample32, sigma_from,
                                            sigma_from)  # fmt: skip
        sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        # sqrt(sigma_to**2 - sigma_up**2) as diffusers writes it, in closed form: the difference cancels
        # catastrophically where sigma_to << sigma_from (NaN under XLA's fused multiply-add).
        sigma_down = sigma_to**2 / sigma_from
        derivative = (sample32 - x0_pred) / sigma_from
        prev_sample = sample32 + derivative * (sigma_down - sigma_from)
        if variance_noise is None:
            variance_noise = jax.random.normal(key, sample.shape, jnp.float32)
        prev_sample = prev_sample + variance_noise * sigma_up
        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(sample.dtype),
            pred_original_sample=x0_pred.astype(sample.dtype),
            state=state.replace(step_index=i + 1),
        )
