"""FlaxDPMSolverMultistepScheduler: diffusers' `DPMSolverMultistepScheduler` as a functional JAX scheduler.

DPM-Solver (arXiv:2206.00927) and DPM-Solver++ (arXiv:2211.01095), ODE and SDE variants, orders 1-3,
with every option of the PyTorch class that applies to DDPM-trained models. Each update is a linear
combination of the sample, the last `solver_order` converted model outputs and (SDE) a standard normal
draw, weighted by functions of the sigmas alone: `set_timesteps` computes those weights for every step
on the host in float64 (diffusers recomputes them in float32 at each step), so `step` is a handful of
multiply-adds picked by the step counter in the state. The multistep history lives in the state too.
"""

from __future__ import annotations

import math
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
    check_sigma_options,
)
from jax_uncond.schedulers.common import (
    CORE_BETA_SCHEDULES,
    VARIANCE_TYPES,
    CommonSchedulerState,
    FlaxSchedulerOutput,
    check_finite_weights,
    check_step,
    combine,
    convert_model_output,
    lu_lambdas,
    push_history,
    respace_sigmas,
    sigma_alphas_cumprod,
    sigma_to_t,
    solver_lambdas,
    solver_timesteps,
    training_sigmas,
)

ALGORITHM_TYPES = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")
DPM_VARIANCE_TYPES = (None,) + VARIANCE_TYPES
"""learned / learned_range: the model also predicts a variance (ignored by the solver). A DDPM config's
fixed_* types mean no predicted variance, as in diffusers, so `from_config` of a DDPM config works."""


@flax.struct.dataclass
class DPMSolverMultistepSchedulerState:
    """The schedule; after `set_timesteps`: timesteps (int32), sigmas (n + 1), the per-step update weights
    (n, solver_order + 2: sample, newest ... oldest model output, noise), the converted model outputs
    (solver_order, *shape; oldest first) and the step counter."""

    common: CommonSchedulerState
    init_noise_sigma: jax.Array
    timesteps: jax.Array
    sigmas: jax.Array | None = None
    coefficients: jax.Array | None = None
    model_outputs: jax.Array | None = None
    step_index: jax.Array | None = None
    num_inference_steps: int | None = flax.struct.field(pytree_node=False, default=None)


class FlaxDPMSolverMultistepScheduler(FlaxSchedulerBase):
    """DPM-Solver++ (the default), DPM-Solver and their SDE variants: 10-25 steps for a DDPM-trained model.

    Build one from a training config as diffusers users do, `FlaxDPMSolverMultistepScheduler.from_config(
    pipeline.scheduler.config)`, or with `samplers.make_sampler("dpmsolver++", config)`, which also starts
    at the last timestep and keeps DDPM's x_0 clipping (docs/sampling.md).
    """

    diffusers_class = "DPMSolverMultistepScheduler"
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
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -math.inf,
        variance_type: str | None = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
    ):
        config = dict(locals())
        # diffusers' own renames, for configs written for DEIS or UniPC.
        if config["algorithm_type"] == "deis":
            config["algorithm_type"] = "dpmsolver++"
        if config["solver_type"] in ("logrho", "bh1", "bh2"):
            config["solver_type"] = "midpoint"
        self._register(config)

    def _validate(self, c: dict) -> None:
        super()._validate(c)
        check_choice("algorithm_type", c["algorithm_type"], ALGORITHM_TYPES)
        check_choice("solver_type", c["solver_type"], SOLVER_TYPES)
        check_int("solver_order", c["solver_order"], 1, 3)
        if c["algorithm_type"] == "sde-dpmsolver" and c["solver_order"] == 3:
            raise ValueError("solver_order must be 1 or 2 for algorithm_type 'sde-dpmsolver' (it has no third-order "
                             "update; diffusers fails at the third step); got 3")  # fmt: skip
        for name in ("lower_order_final", "euler_at_final", "use_lu_lambdas"):
            check_bool(name, c[name])
        check_sigma_options(c)
        if c["final_sigmas_type"] == "zero" and not c["algorithm_type"].endswith("++"):
            raise ValueError(
                f"final_sigmas_type 'zero' needs algorithm_type 'dpmsolver++' or 'sde-dpmsolver++'; with "
                f"{c['algorithm_type']!r} choose final_sigmas_type 'sigma_min'"
            )
        clip = c["lambda_min_clipped"]
        if isinstance(clip, bool) or not isinstance(clip, (int, float)) or math.isnan(clip) or clip == math.inf:
            raise ValueError(f"lambda_min_clipped must be a number (-inf: no clipping); got {clip!r}")
        check_choice("variance_type", c["variance_type"], DPM_VARIANCE_TYPES)

    def create_state(self) -> DPMSolverMultistepSchedulerState:
        """The schedule for this config; call `set_timesteps` before `step`."""
        return DPMSolverMultistepSchedulerState(
            common=CommonSchedulerState.create(self._betas()),
            **self._state_arrays(np.arange(len(self))[::-1], init_noise_sigma=1.0),
        )

    def set_timesteps(
        self, state: DPMSolverMultistepSchedulerState, num_inference_steps: int, shape: tuple[int, ...] = ()
    ) -> DPMSolverMultistepSchedulerState:
        """A state that samples `shape`-d samples (the history's shape) with `num_inference_steps` steps.
        Host-side: the count fixes array shapes, and the update weights are computed here."""
        timesteps, sigmas = self._timesteps_and_sigmas(num_inference_steps)
        arrays = self._state_arrays(
            timesteps, sigmas=sigmas, coefficients=self._coefficients(sigmas), step_index=0,
            model_outputs=np.zeros((self._config["solver_order"], *shape), np.float32),
        )  # fmt: skip
        return state.replace(**arrays, num_inference_steps=len(timesteps))

    def _timesteps_and_sigmas(self, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
        """diffusers' `set_timesteps`: int64 timesteps and float32 sigmas (one more: the final sigma)."""
        c = self._config
        num_train = len(self)
        alphas_cumprod = sigma_alphas_cumprod(self._betas(), c["rescale_betas_zero_snr"])
        lambda_t = np.log(np.sqrt(alphas_cumprod)) - np.log(np.sqrt(np.float32(1) - alphas_cumprod))
        clipped_idx = int(np.searchsorted(lambda_t[::-1], c["lambda_min_clipped"]))
        timesteps = solver_timesteps(
            num_train, num_inference_steps, c["timestep_spacing"], c["steps_offset"], num_train - clipped_idx
        )
        sigmas = train_sigmas = training_sigmas(alphas_cumprod)
        log_sigmas = np.log(sigmas)
        if c["use_karras_sigmas"] or c["use_lu_lambdas"]:
            if c["use_karras_sigmas"]:
                sigmas = respace_sigmas(c, sigmas[::-1], num_inference_steps)
            else:
                sigmas = np.exp(lu_lambdas(float(log_sigmas[0]), float(log_sigmas[-1]), num_inference_steps))
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if c["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        elif c["use_exponential_sigmas"] or c["use_beta_sigmas"]:  # fractional timesteps, truncated below
            sigmas = respace_sigmas(c, sigmas[::-1], num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
        else:
            sigmas = np.interp(timesteps, np.arange(len(sigmas)), sigmas)
        sigma_last = train_sigmas[0] if c["final_sigmas_type"] == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [sigma_last]]).astype(np.float32)
        return timesteps.astype(np.int64), sigmas

    def _order(self, index: int, num_steps: int) -> int:
        """The order of the update at step `index` of `num_steps` (diffusers' warm-up and lower_order_final)."""
        c = self._config
        few_steps = c["lower_order_final"] and num_steps < 15
        final = index == num_steps - 1 and (c["euler_at_final"] or few_steps or c["final_sigmas_type"] == "zero")
        second_last = index == num_steps - 2 and few_steps
        history = min(index, c["solver_order"])  # model outputs already seen (diffusers' lower_order_nums)
        if c["solver_order"] == 1 or history < 1 or final:
            return 1
        if c["solver_order"] == 2 or history < 2 or second_last:
            return 2
        return 3

    def _coefficients(self, sigmas: np.ndarray) -> np.ndarray:
        """Per step: the weights of (sample, newest ... oldest converted model output, noise), float64."""
        c = self._config
        order_max, num_steps = c["solver_order"], len(sigmas) - 1
        alpha, sigma, lam = solver_lambdas(sigmas)  # lambda = +inf at a final sigma 0: an order-1 step, finite
        basis = np.eye(order_max + 2)
        x, m, noise = basis[0], basis[1 : order_max + 1], basis[-1]
        rows = np.zeros((num_steps, order_max + 2))
        for i in range(num_steps):
            order = self._order(i, num_steps)
            h = lam[i + 1] - lam[i]
            if h == 0:  # equal sigmas (e.g. Karras with final sigma_min): the update is the identity
                rows[i] = x
                continue
            w_x, w_d, w_noise = _update_weights(
                c["algorithm_type"], c["solver_type"], order, h, alpha[i + 1], sigma[i + 1], alpha[i], sigma[i]
            )
            # The divided differences D0, D1, D2 of diffusers' updates, as weights of the model outputs.
            d = [m[0]]
            if order == 2:
                d.append((m[0] - m[1]) / ((lam[i] - lam[i - 1]) / h))
            elif order == 3:
                r0, r1 = (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h
                d1_0, d1_1 = (m[0] - m[1]) / r0, (m[1] - m[2]) / r1
                d += [d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)]
            rows[i] = w_x * x + sum(w * dk for w, dk in zip(w_d, d)) + w_noise * noise
        check_finite_weights("DPM-Solver update", rows, sigmas)
        return rows

    def step(
        self,
        state: DPMSolverMultistepSchedulerState,
        model_output: jax.Array,
        timestep: int | jax.Array,
        sample: jax.Array,
        key: jax.Array | None = None,
        variance_noise: jax.Array | None = None,
    ) -> FlaxSchedulerOutput:
        """One multistep update from the model output at `timestep` (the next of state.timesteps).

        The SDE variants add noise: drawn from `key`, or given as `variance_noise` (standard normal); the
        ODE variants ignore both. The returned state holds the new history and step counter.
        """
        c = self._config
        sde = c["algorithm_type"].startswith("sde")
        if sde and (key is None) == (variance_noise is None):
            raise ValueError(f"algorithm_type {c['algorithm_type']!r} adds noise: pass exactly one of key or "
                             f"variance_noise")  # fmt: skip
        model_output = check_step(state, model_output, timestep, sample, c["variance_type"])
        i = state.step_index
        converted, x0_pred = convert_model_output(
            c, model_output, sample, state.sigmas[i], predict_x0=c["algorithm_type"].endswith("++"),
            threshold_noise=c["thresholding"],
        )  # fmt: skip
        history = push_history(state.model_outputs, converted)
        terms = [sample.astype(jnp.float32)] + [history[-1 - k] for k in range(c["solver_order"])]
        if sde:
            if variance_noise is None:
                variance_noise = jax.random.normal(key, sample.shape, jnp.float32)
            terms.append(variance_noise.astype(jnp.float32))
        prev_sample = combine(state.coefficients[i], terms)
        return FlaxSchedulerOutput(
            prev_sample=prev_sample.astype(sample.dtype),
            pred_original_sample=x0_pred.astype(sample.dtype),
            state=state.replace(model_outputs=history, step_index=i + 1),
        )


def _update_weights(
    algorithm_type: str, solver_type: str, order: int, h: float, alpha_t: float, sigma_t: float, alpha_s0: float,
    sigma_s0: float,
) -> tuple[float, list[float], float]:
    """The weights of diffusers' first/second/third-order updates: (sample, [D0, D1, D2][:order], noise)."""
    if algorithm_type == "dpmsolver++":
        w_x, w_noise = sigma_t / sigma_s0, 0.0
        d0 = -alpha_t * (np.exp(-h) - 1.0)
        d1_heun = lambda: alpha_t * ((np.exp(-h) - 1.0) / h + 1.0)  # noqa: E731
        d2 = lambda: -alpha_t * ((np.exp(-h) - 1.0 + h) / h**2 - 0.5)  # noqa: E731
    elif algorithm_type == "sde-dpmsolver++":
        w_x, w_noise = sigma_t / sigma_s0 * np.exp(-h), sigma_t * np.sqrt(1.0 - np.exp(-2.0 * h))
        d0 = alpha_t * (1 - np.exp(-2.0 * h))
        d1_heun = lambda: alpha_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)  # noqa: E731
        d2 = lambda: alpha_t * ((1.0 - np.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)  # noqa: E731
    elif algorithm_type == "dpmsolver":
        w_x, w_noise = alpha_t / alpha_s0, 0.0
        d0 = -sigma_t * (np.exp(h) - 1.0)
        d1_heun = lambda: -sigma_t * ((np.exp(h) - 1.0) / h - 1.0)  # noqa: E731
        d2 = lambda: -sigma_t * ((np.exp(h) - 1.0 - h) / h**2 - 0.5)  # noqa: E731
    else:  # sde-dpmsolver: orders 1 and 2 (validated at construction)
        w_x, w_noise = alpha_t / alpha_s0, sigma_t * np.sqrt(np.exp(2 * h) - 1.0)
        d0 = -2.0 * (sigma_t * (np.exp(h) - 1.0))
        d1_heun = lambda: -2.0 * (sigma_t * ((np.exp(h) - 1.0) / h - 1.0))  # noqa: E731
        d2 = None
    weights = [d0]
    if order == 2:  # midpoint: D1 gets half of D0's weight, in all four algorithms
        weights.append(0.5 * d0 if solver_type == "midpoint" else d1_heun())
    elif order == 3:
        weights += [d1_heun(), d2()]
    return w_x, weights, w_noise
