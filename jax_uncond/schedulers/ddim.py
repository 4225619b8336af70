"""FlaxDDIMScheduler: diffusers' `DDIMScheduler` as a functional, jit-friendly JAX scheduler.

DDIM (arXiv:2010.02502) samples a DDPM-trained model in far fewer steps; eta=0 is deterministic, eta=1
is DDPM-like. As in diffusers, the previous timestep is t - num_train_timesteps // num_inference_steps
whatever the timestep spacing.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_uncond.schedulers.base import FlaxSchedulerBase, check_bool
from jax_uncond.schedulers.common import (
    CORE_BETA_SCHEDULES,
    CommonSchedulerState,
    FlaxSchedulerOutput,
    alpha_prod_at,
    inference_timesteps,
    predict_original_and_epsilon,
)


@flax.struct.dataclass
class DDIMSchedulerState:
    """The schedule, alpha_bar before step 0 and the inference timesteps (descending)."""

    common: CommonSchedulerState
    final_alpha_cumprod: jax.Array
    init_noise_sigma: jax.Array
    timesteps: jax.Array
    num_inference_steps: int | None = flax.struct.field(pytree_node=False, default=None)


class FlaxDDIMScheduler(FlaxSchedulerBase):
    """Denoising diffusion implicit models: `step` takes `eta` (0 = deterministic DDIM, 1 = DDPM-like).

    Sample a model trained with `FlaxDDPMScheduler` via `FlaxDDIMScheduler.from_config(ddpm.config)`.
    """

    diffusers_class = "DDIMScheduler"
    beta_schedules = CORE_BETA_SCHEDULES

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
    ):
        self._register(locals())

    def _validate(self, c: dict) -> None:
        super()._validate(c)
        check_bool("set_alpha_to_one", c["set_alpha_to_one"])

    def create_state(self) -> DDIMSchedulerState:
        """The schedule for this config; call `set_timesteps` before `step`."""
        betas = self._betas()
        final = 1.0 if self._config["set_alpha_to_one"] else np.float32(1.0) - betas[0]  # alphas_cumprod[0]
        return DDIMSchedulerState(
            common=CommonSchedulerState.create(betas),
            **self._state_arrays(np.arange(len(self))[::-1], final_alpha_cumprod=final, init_noise_sigma=1.0),
        )

    def set_timesteps(
        self, state: DDIMSchedulerState, num_inference_steps: int, shape: tuple[int, ...] = ()
    ) -> DDIMSchedulerState:
        """A state that samples with `num_inference_steps` steps spaced per `timestep_spacing`.
        Host-side (the count fixes array shapes); `shape` is unused."""
        c = self._config
        steps = inference_timesteps(len(self), num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        return state.replace(**self._state_arrays(steps), num_inference_steps=num_inference_steps)

    def step(
        self,
        state: DDIMSchedulerState,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        eta: float | jax.Array = 0.0,
        use_clipped_model_output: bool = False,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """x_{t-1} from the model output at `timestep` (formula (12) of arXiv:2010.02502).

        With eta != 0 the step adds noise: from `key`, or given as `variance_noise` (standard normal).
        """
        if state.num_inference_steps is None:
            raise ValueError("num_inference_steps is not set: call set_timesteps(state, n) before step")
        if key is not None and variance_noise is not None:
            raise ValueError("pass key or variance_noise, not both")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model output shape {model_output.shape} != sample shape {sample.shape}; DDIM cannot sample a "
                f"model with learned variance (use FlaxDDPMScheduler)"
            )
        deterministic = isinstance(eta, (int, float)) and eta == 0
        if not deterministic and key is None and variance_noise is None:
            raise ValueError(f"eta={eta} adds noise: pass a key (or variance_noise)")
        t = jnp.asarray(timestep)
        prev_timestep = t - len(self) // state.num_inference_steps

        alpha_prod_t = state.common.alphas_cumprod[t]
        alpha_prod_t_prev = alpha_prod_at(state.common.alphas_cumprod, prev_timestep, state.final_alpha_cumprod)
        beta_prod_t = 1 - alpha_prod_t
        beta_prod_t_prev = 1 - alpha_prod_t_prev

        pred_original_sample, pred_epsilon = predict_original_and_epsilon(
            self._config, model_output, sample, alpha_prod_t
        )
        variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
        std_dev_t = eta * variance**0.5
        if use_clipped_model_output:
            pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
        pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_prod_t_prev**0.5 * pred_original_sample + pred_sample_direction

        if not deterministic:
            if variance_noise is None:
                variance_noise = jax.random.normal(key, model_output.shape, dtype=model_output.dtype)
            prev_sample = prev_sample + std_dev_t * variance_noise
        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(sample.dtype),
            pred_original_sample=pred_original_sample.astype(sample.dtype),
            state=state,
        )
