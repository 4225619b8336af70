"""FlaxDDPMScheduler: diffusers' `DDPMScheduler` as a functional, jit-friendly JAX scheduler.

Same config keys, same numbers (tests compare with diffusers' PyTorch code). Unlike diffusers' former
Flax DDPM scheduler, the previous timestep comes from the inference timesteps (not t - 1), so sampling
with fewer steps than training steps is right, and learned variances are split channel-wise.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_uncond.schedulers.base import FlaxSchedulerBase, check_choice
from jax_uncond.schedulers.common import (
    VARIANCE_TYPES,
    CommonSchedulerState,
    FlaxSchedulerOutput,
    alpha_prod_at,
    inference_timesteps,
    predict_original_and_epsilon,
    split_variance,
)



@flax.struct.dataclass
class DDPMSchedulerState:
    """The schedule and the inference timesteps (descending); `num_inference_steps` None = all of them."""

    common: CommonSchedulerState
    init_noise_sigma: jax.Array
    timesteps: jax.Array
    num_inference_steps: int | None = flax.struct.field(pytree_node=False, default=None)


def previous_timestep(timesteps: jax.Array, timestep: jax.Array) -> jax.Array:
    """The timestep after `timestep` in the descending `timesteps`, or -1 after the last one."""
    index = jnp.argmax(timesteps == timestep)
    last = timesteps.shape[0] - 1
    return jnp.where(index == last, -1, timesteps[jnp.minimum(index + 1, last)])


class FlaxDDPMScheduler(FlaxSchedulerBase):
    """Denoising diffusion probabilistic models (arXiv:2006.11239): ancestral sampling with x_0 prediction.

    The object holds only the config; `create_state()` returns the arrays, `set_timesteps` and `step`
    are pure functions of that state, so they can run inside `jax.jit`/`lax.scan`.
    """

    diffusers_class = "DDPMScheduler"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
    ):
        self._register(locals())

    def _validate(self, c: dict) -> None:
        super()._validate(c)
        check_choice("variance_type", c["variance_type"], VARIANCE_TYPES)

    def create_state(self) -> DDPMSchedulerState:
        """The schedule for this config, with all training timesteps as the inference timesteps."""
        return DDPMSchedulerState(
            common=CommonSchedulerState.create(self._betas()),
            **self._state_arrays(np.arange(len(self))[::-1], init_noise_sigma=1.0),
        )

    def set_timesteps(
        self,
        state: DDPMSchedulerState,
        num_inference_steps: int | None = None,
        shape: tuple[int, ...] = (),
        timesteps: Sequence[int] | None = None,
    ) -> DDPMSchedulerState:
        """A state that samples with `num_inference_steps` steps spaced per `timestep_spacing`, or with
        custom descending `timesteps`. Host-side (the count fixes array shapes); `shape` is unused."""
        num_train = self._config["num_train_timesteps"]
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of num_inference_steps or timesteps")
        if timesteps is not None:
            custom = np.asarray(timesteps, dtype=np.int64)
            if custom.ndim != 1 or custom.size == 0 or np.any(np.diff(custom) >= 0):
                raise ValueError(f"timesteps must be a non-empty, strictly descending list; got {list(timesteps)}")
            if custom[0] >= num_train or custom[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, num_train_timesteps={num_train}); got {list(timesteps)}")
            return state.replace(**self._state_arrays(custom), num_inference_steps=None)
        steps = inference_timesteps(
            num_train, num_inference_steps, self._config["timestep_spacing"], self._config["steps_offset"]
        )
        return state.replace(**self._state_arrays(steps), num_inference_steps=num_inference_steps)

    def _variance(
        self, alpha_prod_t: jax.Array, alpha_prod_t_prev: jax.Array, predicted_variance: jax.Array | None
    ) -> jax.Array:
        """diffusers' `_get_variance`: the posterior variance in the form `variance_type` names."""
        current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
        variance = jnp.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
        variance_type = self._config["variance_type"]
        if variance_type == "fixed_small_log":
            return jnp.exp(0.5 * jnp.log(variance))
        if variance_type == "fixed_large":
            return current_beta_t
        if variance_type == "fixed_large_log":
            return jnp.log(current_beta_t)
        if variance_type == "learned":
            return predicted_variance
        if variance_type == "learned_range":
            frac = (predicted_variance + 1) / 2
            return frac * jnp.log(current_beta_t) + (1 - frac) * jnp.log(variance)
        return variance

    def _noise_scale(self, variance: jax.Array) -> jax.Array:
        """The standard deviation of the noise added to the posterior mean, from `_variance`'s value.

        fixed_large_log is a log variance like learned_range (GLIDE's max_log), so its scale is
        exp(variance / 2); diffusers takes sqrt(log beta) there, which is NaN for every t > 0.
        """
        variance_type = self._config["variance_type"]
        if variance_type == "fixed_small_log":
            return variance
        if variance_type in ("learned_range", "fixed_large_log"):
            return jnp.exp(0.5 * variance)
        return variance**0.5

    def step(
        self,
        state: DDPMSchedulerState,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """x_{t-1} ~ N(posterior mean, variance) from the model output at `timestep` (one of state.timesteps).

        The noise is drawn from `key`, or given as `variance_noise` (standard normal, shaped like `sample`).
        For learned variances the model output has 2x the channels of `sample`: [prediction, variance].
        """
        if (key is None) == (variance_noise is None):
            raise ValueError("DDPM step adds noise: pass exactly one of key or variance_noise")
        model_output, predicted_variance = split_variance(self._config["variance_type"], model_output, sample)
        t = jnp.asarray(timestep)
        if not isinstance(t, jax.core.Tracer) and not bool(jnp.any(state.timesteps == t)):
            raise ValueError(f"timestep {timestep} is not one of state.timesteps; call set_timesteps first")
        prev_t = previous_timestep(state.timesteps, t)

        alpha_prod_t = state.common.alphas_cumprod[t]
        alpha_prod_t_prev = alpha_prod_at(state.common.alphas_cumprod, prev_t, 1.0)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = 1 - current_alpha_t

        pred_original_sample, _ = predict_original_and_epsilon(self._config, model_output, sample, alpha_prod_t)
        # Posterior mean, formula (7) of arXiv:2006.11239.
        pred_original_sample_coeff = (alpha_prod_t_prev**0.5 * current_beta_t) / beta_prod_t
        current_sample_coeff = current_alpha_t**0.5 * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        if variance_noise is None:
            variance_noise = jax.random.normal(key, model_output.shape, dtype=model_output.dtype)
        scale = self._noise_scale(self._variance(alpha_prod_t, alpha_prod_t_prev, predicted_variance))
        prev_sample = jnp.where(t > 0, pred_prev_sample + scale * variance_noise, pred_prev_sample)
        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(sample.dtype),
            pred_original_sample=pred_original_sample.astype(sample.dtype),
            state=state,
        )
