"""FlaxEulerDiscreteScheduler: diffusers' `EulerDiscreteScheduler` as a functional JAX scheduler.

Euler's method on the probability-flow ODE in the variance-exploding parametrisation of Karras et al.
(arXiv:2206.00364, Algorithm 2, with optional "churn" noise): the sample is x_t / alpha_t, so it starts
at `init_noise_sigma` and the model sees it rescaled by `scale_model_input`, which the caller (the
pipeline) must apply before every model call. The step index is a counter in the state.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_uncond.schedulers.base import FlaxSchedulerBase, check_choice, check_optional_sigma, check_sigma_options
from jax_uncond.schedulers.common import (
    CORE_BETA_SCHEDULES,
    CommonSchedulerState,
    FlaxSchedulerOutput,
    check_step,
    euler_timesteps,
    initial_sigma,
    respace_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
    torch_linspace,
    training_sigmas,
)

INTERPOLATION_TYPES = ("linear", "log_linear")
TIMESTEP_TYPES = ("discrete", "continuous")


@flax.struct.dataclass
class EulerDiscreteSchedulerState:
    """The schedule, the inference timesteps (float32: they may be fractional), their sigmas (one more:
    the final sigma), the first sample's scale and the step counter."""

    common: CommonSchedulerState
    init_noise_sigma: jax.Array
    timesteps: jax.Array
    sigmas: jax.Array
    step_index: jax.Array
    num_inference_steps: int | None = flax.struct.field(pytree_node=False, default=None)


class FlaxEulerSchedulerBase(FlaxSchedulerBase):
    """What the Euler and Euler-ancestral schedulers share: the sigma state and the input scaling."""

    beta_schedules = CORE_BETA_SCHEDULES

    def create_state(self) -> EulerDiscreteSchedulerState:
        """All training timesteps and their sigmas; call `set_timesteps` before `step`."""
        betas = self._betas()
        sigmas = training_sigmas(sigma_alphas_cumprod(betas, self._config["rescale_betas_zero_snr"]))[::-1]
        sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        arrays = self._state_arrays(
            np.arange(len(self), dtype=np.float32)[::-1], sigmas=sigmas, step_index=0,
            init_noise_sigma=initial_sigma(sigmas, self._config["timestep_spacing"]),
        )  # fmt: skip
        return EulerDiscreteSchedulerState(common=CommonSchedulerState.create(betas), **arrays)

    def _state(
        self, state: EulerDiscreteSchedulerState, timesteps: np.ndarray, sigmas: np.ndarray, num_inference_steps: int
    ) -> EulerDiscreteSchedulerState:
        arrays = self._state_arrays(
            timesteps.astype(np.float32), sigmas=sigmas, step_index=0,
            init_noise_sigma=initial_sigma(sigmas, self._config["timestep_spacing"]),
        )  # fmt: skip
        return state.replace(**arrays, num_inference_steps=num_inference_steps)

    def scale_model_input(
        self, state: EulerDiscreteSchedulerState, sample: jax.Array, timestep: float | jax.Array | None = None
    ) -> jax.Array:
        """The model's input at this step: sample / sqrt(sigma**2 + 1), i.e. back to the VP scale it was trained on."""
        sigma = state.sigmas[state.step_index]
        return (sample / (sigma**2 + 1) ** 0.5).astype(sample.dtype)

    def add_noise(self, state, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
        """x_0 + sigma_t noise (the variance-exploding forward process these samplers integrate), sigma_t
        interpolated at the (possibly fractional) training `timesteps`."""
        c = self._config
        sigmas = training_sigmas(sigma_alphas_cumprod(self._betas(), c["rescale_betas_zero_snr"]))
        sigma = jnp.interp(jnp.asarray(timesteps, jnp.float32), jnp.arange(len(self), dtype=jnp.float32), sigmas)
        return original_samples + noise * sigma.reshape(sigma.shape + (1,) * (original_samples.ndim - 1))



def predicted_original_sample(
    prediction_type: str, model_output: jax.Array, sample: jax.Array, sigma: jax.Array, sigma_hat: jax.Array
) -> jax.Array:
    """x_0 from the model output in the variance-exploding parametrisation (sample = x_t / alpha_t)."""
    if prediction_type == "epsilon":
        return sample - sigma_hat * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
    return model_output  # sample


class FlaxEulerDiscreteScheduler(FlaxEulerSchedulerBase):
    """Euler (Karras et al. Algorithm 2): deterministic unless `s_churn` > 0; 30-50 steps for a DDPM model."""

    diffusers_class = "EulerDiscreteScheduler"

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        prediction_type: str = "epsilon",
        interpolation_type: str = "linear",
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        timestep_spacing: str = "linspace",
        timestep_type: str = "discrete",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        final_sigmas_type: str = "zero",
    ):
        self._register(locals())

    def _validate(self, c: dict) -> None:
        super()._validate(c)
        check_choice("interpolation_type", c["interpolation_type"], INTERPOLATION_TYPES)
        check_choice("timestep_type", c["timestep_type"], TIMESTEP_TYPES)
        check_optional_sigma("sigma_min", c["sigma_min"])
        check_optional_sigma("sigma_max", c["sigma_max"])
        check_sigma_options(c)

    def set_timesteps(
        self, state: EulerDiscreteSchedulerState, num_inference_steps: int, shape: tuple[int, ...] = ()
    ) -> EulerDiscreteSchedulerState:
        """A state that samples with `num_inference_steps` steps (diffusers' `set_timesteps`). Host-side;
        `shape` is unused (no history)."""
        c = self._config
        timesteps = euler_timesteps(len(self), num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        alphas_cumprod = sigma_alphas_cumprod(self._betas(), c["rescale_betas_zero_snr"])
        train_sigmas = training_sigmas(alphas_cumprod)
        log_sigmas = np.log(train_sigmas)
        if c["interpolation_type"] == "linear":
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        else:  # log_linear: num_inference_steps + 1 sigmas, as diffusers (the last step ends at the smallest)
            sigmas = np.exp(torch_linspace(float(log_sigmas[-1]), float(log_sigmas[0]), num_inference_steps + 1))
        respaced = respace_sigmas(c, sigmas, num_inference_steps, c["sigma_min"], c["sigma_max"])
        if respaced is not None:
            sigmas, timesteps = respaced, sigma_to_t(respaced, log_sigmas)
        sigma_last = train_sigmas[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        if c["timestep_type"] == "continuous" and c["prediction_type"] == "v_prediction":
            # 0.25 log sigma; rounded from float64 (PyTorch's float32 log is not correctly rounded: its
            # timesteps here can be a float32 ulp away).
            timesteps = (0.25 * np.log(sigmas[:-1].astype(np.float64))).astype(np.float32)
        return self._state(state, timesteps, sigmas, num_inference_steps)

    def step(
        self,
        state: EulerDiscreteSchedulerState,
        model_output: jax.Array,
        timestep: float | jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = math.inf,
        s_noise: float = 1.0,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """One Euler step from sigma_i to sigma_{i+1} with the model output at `timestep` (on the scaled input).

        With `s_churn` > 0, noise raises sigma to sigma_hat = sigma (1 + gamma) first wherever s_tmin <=
        sigma <= s_tmax: drawn from `key`, or given as `variance_noise` (standard normal).
        """
        check_step(state, model_output, timestep, sample)
        i = state.step_index
        sample32 = sample.astype(jnp.float32)
        sigma = state.sigmas[i]
        gamma = min(s_churn / (state.sigmas.shape[0] - 1), 2**0.5 - 1)
        gamma = jnp.where((s_tmin <= sigma) & (sigma <= s_tmax), gamma, 0.0)
        sigma_hat = sigma * (gamma + 1)
        if s_churn > 0:
            if (key is None) == (variance_noise is None):
                raise ValueError(f"s_churn={s_churn} adds noise: pass exactly one of key or variance_noise")
            if variance_noise is None:
                variance_noise = jax.random.normal(key, sample.shape, jnp.float32)
            # sqrt(sigma_hat**2 - sigma**2), written so that gamma = 0 gives exactly 0 (XLA's fused multiply-add
            # leaves an ulp of sigma**2 in the difference: 0.04 of noise at sigma = 157).
            sample32 = sample32 + variance_noise * s_noise * sigma * (gamma * (gamma + 2)) ** 0.5
        x0_pred = predicted_original_sample(self._config["prediction_type"], model_output, sample32, sigma, sigma_hat)
        derivative = (sample32 - x0_pred) / sigma_hat
        prev_sample = sample32 + derivative * (state.sigmas[i + 1] - sigma_hat)
        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(sample.dtype),
            pred_original_sample=x0_pred.astype(sample.dtype),
            state=state.replace(step_index=i + 1),
        )


