"""What DDPM and DDIM share: beta schedules, the alphas state, noising, x0 prediction, inference timesteps.

Schedules are built host-side in NumPy float32, mirroring diffusers' float32 PyTorch arithmetic, so the
state agrees with `DDPMScheduler`/`DDIMScheduler` to float32 rounding. The per-step math is pure `jnp`
and jit-friendly; every config choice is a Python branch resolved at trace time.
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
CORE_BETA_SCHEDULES = BETA_SCHEDULES[:3]
"""What diffusers' schedulers other than DDPM implement (they raise NotImplementedError for the others)."""
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")


def betas_for_alpha_bar(
    num_diffusion_timesteps: int, max_beta: float = 0.999, alpha_transform_type: str = "cosine"
) -> np.ndarray:
    """Betas discretising a cumulative-alpha curve alpha_bar(t), t in [0, 1] (cosine: GLIDE; laplace)."""
    if alpha_transform_type == "cosine":

        def alpha_bar_fn(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif alpha_transform_type == "laplace":

        def alpha_bar_fn(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    else:
        raise ValueError(f"alpha_transform_type must be 'cosine' or 'laplace', got {alpha_transform_type!r}")
    betas = []
    for i in range(num_diffusion_timesteps):
        t1 = i / num_diffusion_timesteps
        t2 = (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar_fn(t2) / alpha_bar_fn(t1), max_beta))
    return np.asarray(betas, dtype=np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last timestep has zero SNR (arXiv:2305.08891, Algorithm 1).

    Computed in float64, then rounded to float32: the last betas are ratios of tiny alpha_bars, where
    float32 arithmetic (diffusers') is off from the exact value by a few 1e-6.
    """
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas.astype(np.float64)))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar = ((alphas_bar_sqrt - last) * (first / (first - last))) ** 2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
    """float32 linspace bit-identical to PyTorch's CPU kernel: a float32 step, the first half fused
    multiply-added from `start`, the second half from `end` (float64 holds the exact products)."""
    if steps == 1:
        return np.asarray([start], dtype=np.float32)
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    values = np.where(idx < steps // 2, np.float64(start32) + step * idx, np.float64(end32) - step * (steps - 1 - idx))
    return values.astype(np.float32)


def _cumprod(values: np.ndarray) -> np.ndarray:
    """float32 cumulative product accumulated in float64, as PyTorch's CPU kernel does."""
    return np.cumprod(values, dtype=np.float64).astype(np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | None,
    rescale_betas_zero_snr: bool,
) -> np.ndarray:
    """The float32 betas of a diffusers scheduler config (trained_betas win over beta_schedule)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
    elif beta_schedule == "linear":
        betas = torch_linspace(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = torch_linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    elif beta_schedule == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-torch_linspace(-6, 6, num_train_timesteps).astype(np.float64)))
        betas = sig.astype(np.float32) * np.float32(beta_end - beta_start) + np.float32(beta_start)
    else:
        raise ValueError(f"beta_schedule must be one of {BETA_SCHEDULES}, got {beta_schedule!r}")
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas.astype(np.float32)


@flax.struct.dataclass
class CommonSchedulerState:
    """The noise schedule: betas, alphas = 1 - betas and their cumulative product, float32 (T,)."""

    alphas: jax.Array
    betas: jax.Array
    alphas_cumprod: jax.Array

    @classmethod
    def create(cls, betas: np.ndarray) -> CommonSchedulerState:
        alphas = np.float32(1.0) - betas
        return cls(**jax.device_put({"alphas": alphas, "betas": betas, "alphas_cumprod": _cumprod(alphas)}))


@flax.struct.dataclass
class FlaxSchedulerOutput:
    """What `step` returns: x_{t-1}, the predicted x_0 and the (unchanged) scheduler state."""

    prev_sample: jax.Array
    pred_original_sample: jax.Array
    state: object


def _sqrt_alphas(common: CommonSchedulerState, like: jax.Array, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) in `like`'s dtype, shaped (B, 1, ..., 1) to broadcast."""
    alphas_cumprod = common.alphas_cumprod.astype(like.dtype)[jnp.asarray(timesteps)].ravel()
    shape = alphas_cumprod.shape + (1,) * (like.ndim - 1)
    return jnp.sqrt(alphas_cumprod).reshape(shape), jnp.sqrt(1 - alphas_cumprod).reshape(shape)


def add_noise_common(
    common: CommonSchedulerState, original_samples: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """The forward process q(x_t | x_0): sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) noise."""
    sqrt_alpha_prod, sqrt_one_minus_alpha_prod = _sqrt_alphas(common, original_samples, timesteps)
    return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * noise


def get_velocity_common(
    common: CommonSchedulerState, sample: jax.Array, noise: jax.Array, timesteps: jax.Array
) -> jax.Array:
    """The v-prediction target: sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x_0."""
    sqrt_alpha_prod, sqrt_one_minus_alpha_prod = _sqrt_alphas(common, sample, timesteps)
    return sqrt_alpha_prod * noise - sqrt_one_minus_alpha_prod * sample


def threshold_sample(sample: jax.Array, ratio: float, max_value: float) -> jax.Array:
    """Dynamic thresholding (Imagen): per image, clip to the `ratio` quantile s of |x| and divide by s."""
    dtype = sample.dtype
    flat = sample.reshape(sample.shape[0], -1)
    if dtype not in (jnp.float32, jnp.float64):
        flat = flat.astype(jnp.float32)
    s = jnp.quantile(jnp.abs(flat), ratio, axis=1)
    s = jnp.minimum(jnp.maximum(s, 1), max_value)[:, None]
    return (jnp.clip(flat, -s, s) / s).reshape(sample.shape).astype(dtype)


def predict_original_and_epsilon(
    config: dict, model_output: jax.Array, sample: jax.Array, alpha_prod_t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """x_0 and epsilon from the model output (per `prediction_type`), x_0 then clipped or thresholded."""
    beta_prod_t = 1 - alpha_prod_t
    prediction_type = config["prediction_type"]
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t**0.5 * model_output) / alpha_prod_t**0.5
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t**0.5 * pred_original_sample) / beta_prod_t**0.5
    else:  # v_prediction (validated at construction)
        pred_original_sample = alpha_prod_t**0.5 * sample - beta_prod_t**0.5 * model_output
        pred_epsilon = alpha_prod_t**0.5 * model_output + beta_prod_t**0.5 * sample
    if config["thresholding"]:
        pred_original_sample = threshold_sample(
            pred_original_sample, config["dynamic_thresholding_ratio"], config["sample_max_value"]
        )
    elif config["clip_sample"]:
        limit = config["clip_sample_range"]
        pred_original_sample = jnp.clip(pred_original_sample, -limit, limit)
    return pred_original_sample, pred_epsilon


def split_variance(
    variance_type: str | None, model_output: jax.Array, sample: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """(prediction, predicted variance or None), checking the channel count against `variance_type`."""
    channels = sample.shape[1]
    if variance_type in LEARNED_VARIANCE_TYPES:
        if model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"variance_type={variance_type!r} needs a model output with 2 x {channels} "
                f"channels (prediction, variance); got shape {model_output.shape}"
            )
        return model_output[:, :channels], model_output[:, channels:]
    if model_output.shape != sample.shape:
        raise ValueError(
            f"model output shape {model_output.shape} != sample shape {sample.shape} (a model with learned "
            f"variance needs variance_type 'learned' or 'learned_range')"
        )
    return model_output, None


def alpha_prod_at(alphas_cumprod: jax.Array, timestep: jax.Array, fallback: jax.Array | float) -> jax.Array:
    """alphas_cumprod[timestep], or `fallback` where timestep < 0 (before the first training step)."""
    return jnp.where(timestep >= 0, alphas_cumprod[jnp.maximum(timestep, 0)], jnp.asarray(fallback, jnp.float32))


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int
) -> np.ndarray:
    """The descending int timesteps diffusers' `set_timesteps` picks (Table 2 of arXiv:2305.08891)."""
    check_inference_steps(num_train_timesteps, num_inference_steps)
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        timesteps += steps_offset
    else:  # trailing (validated at construction)
        step_ratio = num_train_timesteps / num_inference_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    check_first_timestep(timesteps, num_train_timesteps, steps_offset)
    return timesteps


# --- sigma schedules: DPM-Solver, UniPC, Euler ----------------------------------------------------
# These samplers run in sigma = sqrt((1 - alpha_bar) / alpha_bar), the noise-to-signal ratio. Their
# inference schedules are built host-side in NumPy, mirroring diffusers' arithmetic (float32 training
# sigmas, float64 spacings, float32 result) so that timesteps are identical and sigmas agree to rounding.

SIGMA_SPACINGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
"""Config flags that respace the inference sigmas; at most one may be set."""
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
ZERO_SNR_ALPHA_BAR = 2.0**-24
"""With rescale_betas_zero_snr, diffusers' sigma schedulers replace alpha_bar_T = 0 (sigma = inf) by this."""


def sigma_alphas_cumprod(betas: np.ndarray, rescale_betas_zero_snr: bool) -> np.ndarray:
    """alpha_bar (float32) as diffusers' sigma schedulers use it: alpha_bar_T = 2**-24 under zero SNR.
    From the host-side betas, as `CommonSchedulerState.create` computes it: no copy back from the device."""
    alphas_cumprod = _cumprod(np.float32(1.0) - betas)
    if rescale_betas_zero_snr:
        alphas_cumprod[-1] = ZERO_SNR_ALPHA_BAR
    return alphas_cumprod


def training_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """sqrt((1 - alpha_bar) / alpha_bar) for every training timestep (ascending), in float32 as diffusers."""
    one = np.float32(1.0)
    return np.sqrt((one - alphas_cumprod) / alphas_cumprod).astype(np.float32)


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timesteps of `sigmas`: log-sigma interpolation in the training schedule.
    One sigma at a time, as diffusers calls it: NumPy's vectorised log can differ from its scalar log in
    the last bit, which moves the timesteps by a float32 ulp."""
    return np.array([_sigma_to_t(sigma, log_sigmas) for sigma in np.asarray(sigmas, dtype=np.float64)])


def _sigma_to_t(sigma: np.float64, log_sigmas: np.ndarray) -> np.ndarray:
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (arXiv:2206.00364): sigma_max -> sigma_min evenly spaced in sigma**(1/rho)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int) -> np.ndarray:
    """sigma_max -> sigma_min evenly spaced in log sigma."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), num_inference_steps))


def beta_sigmas(
    sigma_min: float, sigma_max: float, num_inference_steps: int, alpha: float = 0.6, beta: float = 0.6
) -> np.ndarray:
    """"Beta Sampling is All You Need" (arXiv:2407.12173): sigmas at Beta(0.6, 0.6) quantiles (needs scipy)."""
    import scipy.stats  # checked at construction: see check_sigma_spacing

    ppf = [scipy.stats.beta.ppf(q, alpha, beta) for q in 1 - np.linspace(0, 1, num_inference_steps)]
    return np.array([sigma_min + p * (sigma_max - sigma_min) for p in ppf])


def lu_lambdas(lambda_min: float, lambda_max: float, num_inference_steps: int) -> np.ndarray:
    """Lu et al.'s DPM-Solver schedule (arXiv:2206.00927): evenly spaced in log sigma (rho = 1 in diffusers)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    return lambda_max + ramp * (lambda_min - lambda_max)


def respace_sigmas(
    config: dict, sigmas: np.ndarray, num_inference_steps: int, sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> np.ndarray | None:
    """The Karras / exponential / beta spacing the config selects between the ends of the descending
    `sigmas` (or the config's sigma_min/sigma_max), or None when none is selected."""
    sigma_min = float(sigmas[-1]) if sigma_min is None else sigma_min
    sigma_max = float(sigmas[0]) if sigma_max is None else sigma_max
    if config.get("use_karras_sigmas"):
        return karras_sigmas(sigma_min, sigma_max, num_inference_steps)
    if config.get("use_exponential_sigmas"):
        return exponential_sigmas(sigma_min, sigma_max, num_inference_steps)
    if config.get("use_beta_sigmas"):
        return beta_sigmas(sigma_min, sigma_max, num_inference_steps)
    return None


def solver_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int,
    last_timestep: int | None = None,
) -> np.ndarray:
    """The int64 timesteps of diffusers' multistep solvers (DPM-Solver, UniPC): num_inference_steps + 1
    points from `last_timestep` (default num_train_timesteps; lower when lambda_min_clipped cuts the end)
    down to 0, the 0 dropped."""
    check_inference_steps(num_train_timesteps, num_inference_steps)
    last = num_train_timesteps if last_timestep is None else last_timestep
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, last - 1, num_inference_steps + 1).round()[::-1][:-1].astype(np.int64)
    elif timestep_spacing == "leading":
        step_ratio = last // (num_inference_steps + 1)
        timesteps = (np.arange(0, num_inference_steps + 1) * step_ratio).round()[::-1][:-1].astype(np.int64)
        timesteps += steps_offset
    else:  # trailing (validated at construction); the step is num_train_timesteps-based, as in diffusers
        step_ratio = num_train_timesteps / num_inference_steps
        timesteps = np.arange(last, 0, -step_ratio).round().astype(np.int64) - 1
    check_first_timestep(timesteps, num_train_timesteps, steps_offset)
    return timesteps


def check_inference_steps(num_train_timesteps: int, num_inference_steps: int) -> None:
    """num_inference_steps must be an int in [1, num_train_timesteps]."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps} (the model "
            f"was trained on that many timesteps), got {num_inference_steps}"
        )


def check_first_timestep(timesteps: np.ndarray, num_train_timesteps: int, steps_offset: int) -> None:
    """A steps_offset must not push the first timestep past the last training timestep."""
    if timesteps.max() > num_train_timesteps - 1:
        raise ValueError(
            f"steps_offset={steps_offset} pushes the first timestep to {timesteps.max()}, past the last training "
            f"timestep {num_train_timesteps - 1}: lower steps_offset or num_inference_steps"
        )


def sigma_to_alpha_sigma_t(sigma):
    """(alpha_t, sigma_t) of the VP process at noise-to-signal ratio `sigma` (NumPy or jnp)."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def solver_lambdas(sigmas: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float64 (alpha_t, sigma_t, lambda_t = log(alpha_t / sigma_t)) of the inference sigmas, the
    multistep solvers' time variable; a final sigma of 0 has lambda = +inf."""
    alpha, sigma = sigma_to_alpha_sigma_t(sigmas.astype(np.float64))
    with np.errstate(divide="ignore"):
        return alpha, sigma, np.log(alpha) - np.log(sigma)


def data_prediction(
    config: dict, model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array, sigma_t: jax.Array
) -> jax.Array:
    """x_0 from the model output at (alpha_t, sigma_t), thresholded when the config says so (diffusers'
    `convert_model_output` of the data-prediction solvers)."""
    prediction_type = config["prediction_type"]
    if prediction_type == "epsilon":
        x0_pred = (sample - sigma_t * model_output) / alpha_t
    elif prediction_type == "sample":
        x0_pred = model_output
    else:  # v_prediction (validated at construction)
        x0_pred = alpha_t * sample - sigma_t * model_output
    if config["thresholding"]:
        x0_pred = threshold_sample(x0_pred, config["dynamic_thresholding_ratio"], config["sample_max_value"])
    return x0_pred


def noise_prediction(
    config: dict, model_output: jax.Array, sample: jax.Array, alpha_t: jax.Array, sigma_t: jax.Array,
    thresholding: bool,
) -> jax.Array:
    """epsilon from the model output at (alpha_t, sigma_t) (the noise-prediction solvers); with
    `thresholding`, through a thresholded x_0 as DPM-Solver does."""
    prediction_type = config["prediction_type"]
    if prediction_type == "epsilon":
        epsilon = model_output
    elif prediction_type == "sample":
        epsilon = (sample - alpha_t * model_output) / sigma_t
    else:  # v_prediction
        epsilon = alpha_t * model_output + sigma_t * sample
    if thresholding:
        x0_pred = threshold_sample(
            (sample - sigma_t * epsilon) / alpha_t, config["dynamic_thresholding_ratio"], config["sample_max_value"]
        )
        epsilon = (sample - alpha_t * x0_pred) / sigma_t
    return epsilon


def push_history(history: jax.Array, value: jax.Array) -> jax.Array:
    """The multistep history (oldest first) with its oldest entry dropped and `value` appended."""
    return jnp.concatenate([history[1:], value[None].astype(history.dtype)])


def combine(coefficients: jax.Array, terms: Sequence[jax.Array]) -> jax.Array:
    """sum_k coefficients[k] * terms[k]: a solver update, its coefficients precomputed per step."""
    total = coefficients[0] * terms[0]
    for k in range(1, len(terms)):
        total = total + coefficients[k] * terms[k]
    return total


def convert_model_output(
    config: dict, model_output: jax.Array, sample: jax.Array, sigma: jax.Array, predict_x0: bool,
    threshold_noise: bool,
) -> tuple[jax.Array, jax.Array]:
    """(what a multistep solver keeps in its history, the x_0 prediction) from the model output at the
    noise-to-signal ratio `sigma`: x_0 for the data-prediction solvers, epsilon (thresholded through x_0
    if `threshold_noise`) for the noise-prediction ones."""
    alpha_t, sigma_t = sigma_to_alpha_sigma_t(sigma)
    if predict_x0:
        x0_pred = data_prediction(config, model_output, sample, alpha_t, sigma_t)
        return x0_pred, x0_pred
    epsilon = noise_prediction(config, model_output, sample, alpha_t, sigma_t, threshold_noise)
    return epsilon, (sample - sigma_t * epsilon) / alpha_t


def check_finite_weights(what: str, rows: np.ndarray, sigmas: np.ndarray) -> None:
    """Per-step update weights must be finite (repeated sigmas mid-chain divide by a zero step)."""
    if not np.all(np.isfinite(rows)):
        bad = int(np.argwhere(~np.isfinite(rows))[0, 0])
        raise ValueError(
            f"the {what} of step {bad} is not finite for the sigmas {sigmas[max(bad - 2, 0):bad + 2]} (repeated "
            f"timesteps?): use fewer num_inference_steps or another timestep_spacing"
        )


def check_step(
    state, model_output: jax.Array, timestep: int | float | jax.Array, sample: jax.Array,
    variance_type: str | None = None,
) -> jax.Array:
    """What a sigma scheduler's `step` checks first; returns the model output without predicted variance."""
    if state.num_inference_steps is None:
        raise ValueError("num_inference_steps is not set: call set_timesteps(state, n, shape) before step")
    model_output, _ = split_variance(variance_type, model_output, sample)
    history = getattr(state, "model_outputs", None)
    if history is not None and history.shape[1:] != sample.shape:
        raise ValueError(f"the state was set up for samples of shape {history.shape[1:]}, got {sample.shape}: "
                         f"call set_timesteps(state, n, shape=sample.shape)")  # fmt: skip
    check_next_timestep(state, timestep)
    return model_output


def check_next_timestep(state, timestep: int | float | jax.Array) -> None:
    """Outside jit: `timestep` must be the one the state's step counter points at (the solvers count
    steps instead of searching the timestep, so a skipped or repeated call would silently misalign)."""
    if isinstance(timestep, jax.core.Tracer) or isinstance(state.step_index, jax.core.Tracer):
        return
    index, count = int(state.step_index), state.timesteps.shape[0]
    if index >= count:
        raise ValueError(f"all {count} steps are done: call set_timesteps again to sample anew")
    if float(timestep) != float(state.timesteps[index]):
        raise ValueError(
            f"timestep {float(timestep):g} is not the next one, state.timesteps[{index}] = "
            f"{float(state.timesteps[index]):g}: call step once per timestep, in order"
        )


def euler_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int
) -> np.ndarray:
    """The float32 timesteps of diffusers' Euler schedulers: DDPM's, except that linspace is not rounded."""
    if timestep_spacing == "linspace":
        check_inference_steps(num_train_timesteps, num_inference_steps)
        return np.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=np.float32)[::-1].copy()
    return inference_timesteps(num_train_timesteps, num_inference_steps, timestep_spacing, steps_offset).astype(
        np.float32
    )


def initial_sigma(sigmas: np.ndarray, timestep_spacing: str) -> np.float32:
    """The Euler schedulers' `init_noise_sigma`: the largest sigma, or sqrt(sigma**2 + 1) for leading spacing
    (whose first timestep is below the last training timestep), in float32 as diffusers."""
    sigma_max = np.float32(np.max(sigmas))
    if timestep_spacing in ("linspace", "trailing"):
        return sigma_max
    return np.sqrt(sigma_max**2 + np.float32(1.0))
