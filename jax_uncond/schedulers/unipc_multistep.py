"""FlaxUniPCMultistepScheduler: diffusers' `UniPCMultistepScheduler` as a functional JAX scheduler.

UniPC (arXiv:2302.04867): a multistep predictor (UniP) followed at the next step by a corrector (UniC)
that reuses the model evaluation the predictor's result needed anyway, so order p + 1 costs no extra
model call. Both updates are linear combinations of samples and converted model outputs whose weights
depend only on the sigmas; `set_timesteps` computes them per step on the host in float64 (diffusers
solves the same small linear systems in float32 at every step), and `step` applies them.
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jax_uncond.schedulers.base import (
    FlaxSchedulerBase,
    check_bool,
    check_choice,
    check_int,
    check_optional_sigma,
    check_sigma_options,
)
from jax_uncond.schedulers.common import (
    CORE_BETA_SCHEDULES,
    CommonSchedulerState,
    FlaxSchedulerOutput,
    check_finite_weights,
    check_step,
    combine,
    convert_model_output,
    push_history,
    respace_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
    solver_lambdas,
    solver_timesteps,
    training_sigmas,
)

SOLVER_TYPES = ("bh1", "bh2")


@flax.struct.dataclass
class UniPCMultistepSchedulerState:
    """The schedule; after `set_timesteps`: timesteps (int32), sigmas (n + 1), per-step weights of the
    corrector (sample, last sample, newest ... oldest model output, this step's model output) and of the
    predictor (corrected sample, newest ... oldest model output), the history and the step counter."""

    common: CommonSchedulerState
    init_noise_sigma: jax.Array
    timesteps: jax.Array
    sigmas: jax.Array | None = None
    corrector: jax.Array | None = None
    predictor: jax.Array | None = None
    model_outputs: jax.Array | None = None
    last_sample: jax.Array | None = None
    step_index: jax.Array | None = None
    num_inference_steps: int | None = flax.struct.field(pytree_node=False, default=None)


class FlaxUniPCMultistepScheduler(FlaxSchedulerBase):
    """UniPC with the bh1/bh2 variants, any solver_order, data or noise prediction: 10-20 steps.

    `FlaxUniPCMultistepScheduler.from_config(pipeline.scheduler.config)` samples a DDPM-trained model;
    `samplers.make_sampler("unipc", config)` also starts at the last timestep and keeps DDPM's clipping.
    """

    diffusers_class = "UniPCMultistepScheduler"
    beta_schedules = CORE_BETA_SCHEDULES

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Sequence[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: Sequence[int] = (),
        solver_p: None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        shift_terminal: float | None = None,
    ):
        config = dict(locals())
        if config["solver_type"] in ("midpoint", "heun", "logrho"):  # diffusers' rename, for DPM-Solver configs
            config["solver_type"] = "bh2"
        self._register(config)

    def _validate(self, c: dict) -> None:
        super()._validate(c)
        check_int("solver_order", c["solver_order"], 1)
        check_choice("solver_type", c["solver_type"], SOLVER_TYPES)
        for name in ("predict_x0", "lower_order_final"):
            check_bool(name, c[name])
        corrector = c["disable_corrector"]
        if not isinstance(corrector, tuple) or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in corrector
        ):
            raise ValueError(f"disable_corrector must be a list of step indices (ints >= 0); got {corrector!r}")
        if c["solver_p"] is not None:
            raise ValueError(f"solver_p must be None (an external predictor scheduler is not supported); got "
                             f"{c['solver_p']!r}")  # fmt: skip
        check_optional_sigma("sigma_min", c["sigma_min"])
        check_optional_sigma("sigma_max", c["sigma_max"])
        check_sigma_options(c)
        if c["final_sigmas_type"] == "zero" and not c["lower_order_final"] and c["solver_order"] > 1:
            raise ValueError(
                "final_sigmas_type 'zero' with lower_order_final false and solver_order > 1 makes the last step a "
                "multistep update to sigma 0, whose weights are infinite (diffusers returns NaN or fails): set "
                "lower_order_final true or final_sigmas_type 'sigma_min'"
            )

    def create_state(self) -> UniPCMultistepSchedulerState:
        """The schedule for this config; call `set_timesteps` before `step`."""
        return UniPCMultistepSchedulerState(
            common=CommonSchedulerState.create(self._betas()),
            **self._state_arrays(np.arange(len(self))[::-1], init_noise_sigma=1.0),
        )

    def set_timesteps(
        self, state: UniPCMultistepSchedulerState, num_inference_steps: int, shape: tuple[int, ...] = ()
    ) -> UniPCMultistepSchedulerState:
        """A state that samples `shape`-d samples (the history's shape) with `num_inference_steps` steps.
        Host-side: the count fixes array shapes, and the update weights are computed here."""
        timesteps, sigmas = self._timesteps_and_sigmas(num_inference_steps)
        corrector, predictor = self._coefficients(sigmas)
        arrays = self._state_arrays(
            timesteps, sigmas=sigmas, corrector=corrector, predictor=predictor, step_index=0,
            model_outputs=np.zeros((self._config["solver_order"], *shape), np.float32),
            last_sample=np.zeros(shape, np.float32),
        )  # fmt: skip
        return state.replace(**arrays, num_inference_steps=len(timesteps))

    def _timesteps_and_sigmas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' `set_timesteps`: int64 timesteps and float32 sigmas (one more: the final sigma)."""
        c = self._config
        timesteps = solver_timesteps(len(self), num_inference_steps, c["timestep_spacing"], c["steps_offset"])
        alphas_cumprod = sigma_alphas_cumprod(self._betas(), c["rescale_betas_zero_snr"])
        sigmas = training_sigmas(alphas_cumprod)
        respaced = respace_sigmas(c, sigmas[::-1], num_inference_steps, c["sigma_min"], c["sigma_max"])
        if respaced is not None:
            timesteps = sigma_to_t(respaced, np.log(sigmas))
            if c["use_karras_sigmas"]:
                timesteps = timesteps.round()
            sigmas, sigma_min = respaced, respaced[-1]
        else:
            sigmas, sigma_min = np.interp(timesteps, np.arange(len(sigmas)), sigmas), sigmas[0]
        sigma_last = sigma_min if c["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return timesteps.astype(np.int64), sigmas

    def _order(self, index: int, num_steps: int) -> int:
        """The predictor's order at step `index` of `num_steps` (warm-up and lower_order_final)."""
        order = self._config["solver_order"]
        if self._config["lower_order_final"]:
            order = min(order, num_steps - index)
        return min(order, min(index, self._config["solver_order"]) + 1)

    def _coefficients(self, sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per step, the corrector's and the predictor's weights (float64; see the state's docstring)."""
        c = self._config
        order_max, num_steps = c["solver_order"], len(sigmas) - 1
        alpha, sigma, lam = solver_lambdas(sigmas)  # lambda = +inf at a final sigma of 0: _uni_bh_update
        corrector = np.zeros((num_steps, order_max + 3))
        corrector[:, 0] = 1.0  # no correction: the sample as it is
        predictor = np.zeros((num_steps, order_max + 1))
        for i in range(num_steps):
            order = self._order(i, num_steps)
            predictor[i] = self._uni_bh_update(lam, alpha, sigma, i, order, corrector=False)
            if i > 0 and i - 1 not in c["disable_corrector"]:
                weights = self._uni_bh_update(lam, alpha, sigma, i - 1, self._order(i - 1, num_steps), corrector=True)
                corrector[i] = np.concatenate([[0.0], weights])
        check_finite_weights("UniPC corrector", corrector, sigmas)
        check_finite_weights("UniPC predictor", predictor, sigmas)
        return corrector, predictor

    def _uni_bh_update(
        self, lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, index: int, order: int, corrector: bool
    ) -> np.ndarray:
        """diffusers' `multistep_uni_p_bh_update` (from step `index` to `index` + 1) or, with `corrector`,
        `multistep_uni_c_bh_update` (the same interval, revisited once the model output at `index` + 1 is
        known), as weights of (x, newest ... oldest model output[, the model output at `index` + 1])."""
        c = self._config
        order_max = c["solver_order"]
        basis = np.eye(order_max + 2)
        x, m, m_t = basis[0], basis[1 : order_max + 1], basis[-1]
        t, s0 = index + 1, index
        alpha_t, sigma_t, alpha_s0, sigma_s0 = alpha[t], sigma[t], alpha[s0], sigma[s0]
        h = lam[t] - lam[s0]
        if h == 0:  # equal sigmas (Karras with final sigma_min): the step is the identity (diffusers: too)
            return x if corrector else x[:-1]
        hh = -h if c["predict_x0"] else h
        h_phi_1 = np.expm1(hh)
        rks = [(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [1.0]
        d1s = [(m[k] - m[0]) / rks[k - 1] for k in range(1, order)]
        if np.isinf(h):  # to sigma_t = 0 (only ever at order 1): the limit of the first-order update
            if c["predict_x0"]:
                update = alpha_t * m[0]  # x0
            else:
                update = alpha_t / alpha_s0 * x - alpha_t * sigma_s0 / alpha_s0 * m[0]
            return update if corrector else update[:-1]
        b_h = hh if c["solver_type"] == "bh1" else np.expm1(hh)
        rows, b, h_phi_k, factorial = [], [], h_phi_1 / hh - 1, 1
        for i in range(1, order + 1):
            rows.append(np.power(rks, i - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        r, b = np.array(rows), np.array(b)
        if c["predict_x0"]:
            update = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m[0]
            scale = -alpha_t * b_h
        else:
            update = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m[0]
            scale = -sigma_t * b_h
        if corrector:
            rhos_c = np.array([0.5]) if order == 1 else np.linalg.solve(r, b)
            update = update + scale * (sum(rho * d for rho, d in zip(rhos_c[:-1], d1s)) + rhos_c[-1] * (m_t - m[0]))
            return update
        if order >= 2:
            rhos_p = np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], b[:-1])
            update = update + scale * sum(rho * d for rho, d in zip(rhos_p, d1s))
        return update[:-1]

    def step(
        self,
        state: UniPCMultistepSchedulerState,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """Correct the sample with this model output (UniC), then predict the next one (UniP).

        `key` is accepted for interchangeability and unused (UniPC is deterministic).
        """
        c = self._config
        model_output = check_step(state, model_output, timestep, sample)
        i = state.step_index
        converted, x0_pred = convert_model_output(
            c, model_output, sample, state.sigmas[i], predict_x0=c["predict_x0"], threshold_noise=False
        )
        history = [state.model_outputs[-1 - k] for k in range(c["solver_order"])]
        corrected = combine(state.corrector[i], [sample.astype(jnp.float32), state.last_sample, *history, converted])
        new_history = push_history(state.model_outputs, converted)
        terms = [corrected] + [new_history[-1 - k] for k in range(c["solver_order"])]
        prev_sample = combine(state.predictor[i], terms)
        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(sample.dtype),
            pred_original_sample=x0_pred.astype(sample.dtype),
            state=state.replace(model_outputs=new_history, last_sample=corrected, step_index=i + 1),
        )
