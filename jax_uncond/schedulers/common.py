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
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "linspace", "trailing")


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


def _torch_linspace(start: float, end: float, steps: int) -> np.ndarray:
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
        betas = _torch_linspace(beta_start, beta_end, num_train_timesteps)
    elif beta_schedule == "scaled_linear":
        betas = _torch_linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        betas = betas_for_alpha_bar(num_train_timesteps)
    elif beta_schedule == "laplace":
        betas = betas_for_alpha_bar(num_train_timesteps, alpha_transform_type="laplace")
    elif beta_schedule == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-_torch_linspace(-6, 6, num_train_timesteps).astype(np.float64)))
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


def alpha_prod_at(alphas_cumprod: jax.Array, timestep: jax.Array, fallback: jax.Array | float) -> jax.Array:
    """alphas_cumprod[timestep], or `fallback` where timestep < 0 (before the first training step)."""
    return jnp.where(timestep >= 0, alphas_cumprod[jnp.maximum(timestep, 0)], jnp.asarray(fallback, jnp.float32))


def inference_timesteps(
    num_train_timesteps: int, num_inference_steps: int, timestep_spacing: str, steps_offset: int
) -> np.ndarray:
    """The descending int timesteps diffusers' `set_timesteps` picks (Table 2 of arXiv:2305.08891)."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be between 1 and num_train_timesteps={num_train_timesteps} (the model "
            f"was trained on that many timesteps), got {num_inference_steps}"
        )
    if timestep_spacing == "linspace":
        timesteps = np.linspace(0, num_train_timesteps - 1, num_inference_steps).round()[::-1].astype(np.int64)
    elif timestep_spacing == "leading":
        step_ratio = num_train_timesteps // num_inference_steps
        timesteps = (np.arange(0, num_inference_steps) * step_ratio).round()[::-1].astype(np.int64)
        timesteps += steps_offset
    else:  # trailing (validated at construction)
        step_ratio = num_train_timesteps / num_inference_steps
        timesteps = np.round(np.arange(num_train_timesteps, 0, -step_ratio)).astype(np.int64) - 1
    if timesteps.max() >= num_train_timesteps:
        raise ValueError(
            f"steps_offset={steps_offset} pushes the first timestep to {timesteps.max()}, past the last training "
            f"timestep {num_train_timesteps - 1}: lower steps_offset or num_inference_steps"
        )
    return timesteps
