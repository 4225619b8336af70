"""FlaxDDPMScheduler / FlaxDDIMScheduler against diffusers' PyTorch DDPMScheduler / DDIMScheduler.

Everything runs eagerly on tiny arrays (vmapped over spacings and timesteps), so the hundreds of configs
below cost no compilation; tests/test_pipeline.py runs both schedulers inside the compiled lax.scan
sampler. The reference is always the real diffusers code, never copied numbers.
"""

import json
import logging

import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

from jax_uncond import FlaxDDIMScheduler, FlaxDDPMScheduler

BETA_SCHEDULES = ["linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace"]
VARIANCE_TYPES = ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PREDICTION_TYPES = ["epsilon", "sample", "v_prediction"]
SPACINGS = ["leading", "linspace", "trailing"]
# (clip_sample, thresholding); sample_max_value > 1 so thresholding differs from plain clipping.
CLIP_MODES = {"none": (False, False), "clip": (True, False), "threshold": (False, True)}
SHAPE = (2, 3, 4, 4)


def _np(x) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _randn(seed: int, shape=SHAPE, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# --- noise schedule, add_noise, get_velocity -------------------------------------------------------


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("beta_schedule", BETA_SCHEDULES)
def test_schedule_add_noise_velocity_match_diffusers(beta_schedule, rescale):
    ours = FlaxDDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    ref = DDPMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=rescale)
    state = ours.create_state()
    betas, ref_betas = _np(state.common.betas), _np(ref.betas)
    assert betas.dtype == state.common.alphas_cumprod.dtype == np.float32
    if rescale:
        # The last rescaled betas are ratios of tiny alpha_bars; diffusers' float32 value there is a few
        # 1e-6 off the exact one. Ours is the float64 value rounded: closer to exact, and within 1e-6 of
        # diffusers wherever diffusers itself is within 1e-6 of exact.
        exact = _np(rescale_zero_terminal_snr(DDPMScheduler(beta_schedule=beta_schedule).betas.double()))
        assert np.abs(betas - exact).max() <= 1e-7
        np.testing.assert_array_less(np.abs(betas - ref_betas), np.maximum(1e-6, np.abs(ref_betas - exact) + 1e-7))
    else:
        np.testing.assert_allclose(betas, ref_betas, rtol=0, atol=1e-6)
    np.testing.assert_allclose(_np(state.common.alphas_cumprod), _np(ref.alphas_cumprod), rtol=0, atol=1e-6)

    x0, noise = _randn(0), _randn(1)
    timesteps = np.array([0, 999], dtype=np.int64)
    if rescale:
        # sqrt(1 - alpha_bar_0) magnifies alpha_bar_0's last-bit rounding ~50x (1e-5 here): check the
        # formulas with diffusers running on our alphas_cumprod (itself within 1e-6 of diffusers', above).
        ref.alphas_cumprod = torch.tensor(_np(state.common.alphas_cumprod))
    for method in ("add_noise", "get_velocity"):
        got = getattr(ours, method)(state, jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(timesteps))
        want = getattr(ref, method)(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(timesteps))
        np.testing.assert_allclose(_np(got), _np(want), rtol=0, atol=1e-6, err_msg=method)


def test_trained_betas_and_ddim_final_alpha_match_diffusers():
    betas = np.linspace(0.001, 0.2, 20).tolist()
    ours = FlaxDDPMScheduler(num_train_timesteps=20, trained_betas=betas).create_state()
    ref = DDPMScheduler(num_train_timesteps=20, trained_betas=betas)
    np.testing.assert_array_equal(_np(ours.common.alphas_cumprod), _np(ref.alphas_cumprod))
    for set_alpha_to_one in (True, False):
        state = FlaxDDIMScheduler(set_alpha_to_one=set_alpha_to_one, beta_schedule="scaled_linear").create_state()
        ref = DDIMScheduler(set_alpha_to_one=set_alpha_to_one, beta_schedule="scaled_linear")
        np.testing.assert_array_equal(_np(state.final_alpha_cumprod), _np(ref.final_alpha_cumprod))


# --- set_timesteps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_train_timesteps", [1000, 37])
def test_set_timesteps_equals_diffusers(num_train_timesteps, spacing, steps_offset):
    num_train = num_train_timesteps
    config = dict(num_train_timesteps=num_train, timestep_spacing=spacing, steps_offset=steps_offset)
    for flax_cls, torch_cls in ((FlaxDDPMScheduler, DDPMScheduler), (FlaxDDIMScheduler, DDIMScheduler)):
        ours, ref = flax_cls(**config), torch_cls(**config)
        state = ours.create_state()
        for steps in sorted({1, 3, 10, 50, num_train - 1, num_train} & set(range(1, num_train + 1))):
            if spacing == "leading" and steps_offset and num_train // steps * (steps - 1) + 1 >= num_train:
                with pytest.raises(ValueError, match="steps_offset"):
                    ours.set_timesteps(state, steps)
                continue
            ref.set_timesteps(steps)
            got = ours.set_timesteps(state, steps)
            assert got.num_inference_steps == steps
            np.testing.assert_array_equal(_np(got.timesteps), _np(ref.timesteps), err_msg=f"{flax_cls} {steps}")


def test_ddpm_custom_timesteps_equal_diffusers():
    ours, ref = FlaxDDPMScheduler(), DDPMScheduler()
    ref.set_timesteps(timesteps=[900, 500, 20, 3])
    state = ours.set_timesteps(ours.create_state(), timesteps=[900, 500, 20, 3])
    np.testing.assert_array_equal(_np(state.timesteps), _np(ref.timesteps))
    for bad in ([3, 500], [1000, 3], []):
        with pytest.raises(ValueError, match="timesteps"):
            ours.set_timesteps(state, timesteps=bad)
    with pytest.raises(ValueError, match="exactly one"):
        ours.set_timesteps(state, 10, timesteps=[5, 1])
    with pytest.raises(ValueError, match="between 1 and"):
        ours.set_timesteps(state, 1001)


# --- DDPM step -------------------------------------------------------------------------------------


def _ddpm_inputs(variance_type: str) -> tuple[np.ndarray, np.ndarray]:
    sample, model_output = _randn(2, scale=1.5), _randn(3)
    if variance_type == "learned":  # a variance: positive
        model_output = np.concatenate([model_output, np.abs(_randn(4, scale=0.01)) + 1e-4], axis=1)
    elif variance_type == "learned_range":  # an interpolation weight in [-1, 1]
        model_output = np.concatenate([model_output, np.tanh(_randn(4))], axis=1)
    return sample, model_output


def _stack(states: list):
    """One state pytree whose leaves carry a leading axis over `states` (for vmap)."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)


def _diffusers_noise_scale(ref: DDPMScheduler, t: int, model_output: np.ndarray, channels: int) -> np.ndarray:
    """The std of the noise diffusers' step adds at t > 0, from its `_get_variance`.

    fixed_large_log: diffusers takes sqrt(log beta) (NaN); the documented JAX choice is exp(log beta / 2).
    """
    predicted = torch.from_numpy(model_output[:, channels:]) if model_output.shape[1] > channels else None
    variance = ref._get_variance(t, predicted_variance=predicted)
    kind = ref.config.variance_type
    if kind == "fixed_small_log":
        return _np(variance)
    if kind in ("learned_range", "fixed_large_log"):
        return _np(torch.exp(0.5 * variance))
    return _np(variance**0.5)


@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
def test_ddpm_step_matches_diffusers(variance_type, prediction_type, clip_mode, monkeypatch):
    """Posterior mean and noise scale at 4 timesteps of each spacing, with 1000 and 50 inference steps.

    diffusers' mean is its step with the noise patched to zero; for fixed_large_log (whose NaN noise
    would hide the mean) it comes from fixed_large: the mean does not depend on a fixed variance type.
    Ours is one vmapped call over spacings x timesteps x noise in {0, 1}: noise 1 minus noise 0 is the scale.
    """
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", lambda shape, **kw: torch.zeros(shape))
    clip_sample, thresholding = CLIP_MODES[clip_mode]
    config = dict(
        variance_type=variance_type, prediction_type=prediction_type, clip_sample=clip_sample,
        thresholding=thresholding, sample_max_value=1.5,
    )  # fmt: skip
    mean_config = {**config, "variance_type": "fixed_large"} if variance_type == "fixed_large_log" else config
    sample, model_output = _ddpm_inputs(variance_type)
    ours = FlaxDDPMScheduler(**config)  # step does not read timestep_spacing: one object steps every spacing

    def step(state, t, noise):
        return ours.step(state, jnp.asarray(model_output), t, jnp.asarray(sample), variance_noise=noise).prev_sample

    over_noise_spacing_t = jax.vmap(jax.vmap(jax.vmap(step, (None, 0, None)), (0, 0, None)), (None, None, 0))
    for steps in (1000, 50):
        states = [
            FlaxDDPMScheduler(**config, timestep_spacing=spacing).set_timesteps(ours.create_state(), steps)
            for spacing in SPACINGS
        ]
        timesteps = np.stack([_np(s.timesteps)[[0, steps // 2, steps - 2, steps - 1]] for s in states])
        noise = jnp.stack([jnp.zeros(SHAPE), jnp.ones(SHAPE)])
        means, noisy = _np(over_noise_spacing_t(_stack(states), jnp.asarray(timesteps), noise))
        for i, spacing in enumerate(SPACINGS):
            ref = DDPMScheduler(**config, timestep_spacing=spacing)
            ref_mean = DDPMScheduler(**mean_config, timestep_spacing=spacing)
            ref.set_timesteps(steps)
            ref_mean.set_timesteps(steps)
            for j, t in enumerate(timesteps[i].tolist()):
                where = f"{spacing}, {steps} steps, t={t}"
                want = ref_mean.step(torch.from_numpy(model_output), t, torch.from_numpy(sample)).prev_sample
                np.testing.assert_allclose(means[i, j], _np(want), rtol=1e-6, atol=1e-5, err_msg=f"mean, {where}")
                want_scale = _diffusers_noise_scale(ref, t, model_output, sample.shape[1]) if t > 0 else 0.0
                scale = noisy[i, j].astype(np.float64) - means[i, j]
                np.testing.assert_allclose(scale, np.broadcast_to(want_scale, scale.shape), rtol=1e-5, atol=1e-6,
                                           err_msg=f"noise scale, {where}")  # fmt: skip


def test_ddpm_step_full_sample_with_diffusers_noise():
    """Same noise in, same x_{t-1} out, for the default config: mean and noise put together."""
    ours, ref = FlaxDDPMScheduler(), DDPMScheduler()
    state = ours.set_timesteps(ours.create_state(), 25)
    ref.set_timesteps(25)
    sample, model_output = _randn(5), _randn(6)
    for t in (960, 400, 0):
        want = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample), generator=torch.manual_seed(t))
        noise = torch.randn(SHAPE, generator=torch.manual_seed(t))
        noise = jnp.asarray(_np(noise))
        got = ours.step(state, jnp.asarray(model_output), t, jnp.asarray(sample), variance_noise=noise)
        np.testing.assert_allclose(_np(got.prev_sample), _np(want.prev_sample), rtol=0, atol=1e-5)
        np.testing.assert_allclose(_np(got.pred_original_sample), _np(want.pred_original_sample), rtol=0, atol=1e-5)


def test_ddpm_step_previous_timestep_follows_inference_steps():
    """diffusers' old Flax scheduler used t - 1 as the previous step; with 10 steps from 1000 it is t - 100."""
    ours = FlaxDDPMScheduler(clip_sample=False)
    state = ours.set_timesteps(ours.create_state(), 10)
    sample, eps = jnp.asarray(_randn(7)), jnp.asarray(_randn(8))
    out = ours.step(state, eps, 900, sample, variance_noise=jnp.zeros(SHAPE))
    full = ours.step(ours.create_state(), eps, 900, sample, variance_noise=jnp.zeros(SHAPE))
    a_t, a_prev = state.common.alphas_cumprod[900], state.common.alphas_cumprod[800]
    x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    want = a_prev**0.5 * (1 - a_t / a_prev) / (1 - a_t) * x0 + (a_t / a_prev) ** 0.5 * (1 - a_prev) / (1 - a_t) * sample
    np.testing.assert_allclose(_np(out.prev_sample), _np(want), rtol=1e-5, atol=1e-5)
    assert np.abs(_np(out.prev_sample) - _np(full.prev_sample)).max() > 1e-2


def test_ddpm_step_errors():
    ours = FlaxDDPMScheduler(variance_type="learned_range")
    state = ours.create_state()
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="2 x 3 channels"):
        ours.step(state, x, 10, x, key=jax.random.key(0))
    with pytest.raises(ValueError, match="exactly one of key or variance_noise"):
        ours.step(state, jnp.zeros((2, 6, 4, 4)), 10, x)
    with pytest.raises(ValueError, match="learned"):
        FlaxDDPMScheduler().step(state, jnp.zeros((2, 6, 4, 4)), 10, x, key=jax.random.key(0))
    ten = ours.set_timesteps(state, 10)
    with pytest.raises(ValueError, match="not one of state.timesteps"):
        ours.step(ten, jnp.zeros((2, 6, 4, 4)), 11, x, key=jax.random.key(0))


# --- DDIM step -------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_step_matches_diffusers(prediction_type, clip_mode):
    """x_{t-1} and x_0 at 3 timesteps of each spacing, 50 and 10 steps, eta 0 / 0.5 / 1 (+ clipped output)."""
    clip_sample, thresholding = CLIP_MODES[clip_mode]
    sample, model_output, noise = _randn(9, scale=1.5), _randn(10), _randn(11)
    for set_alpha_to_one in (True, False):
        config = dict(
            prediction_type=prediction_type, clip_sample=clip_sample, thresholding=thresholding,
            sample_max_value=1.5, set_alpha_to_one=set_alpha_to_one,
        )  # fmt: skip
        ours = FlaxDDIMScheduler(**config)  # step does not read timestep_spacing: one object steps every spacing
        for steps in (50, 10):
            states = [
                FlaxDDIMScheduler(**config, timestep_spacing=spacing).set_timesteps(ours.create_state(), steps)
                for spacing in SPACINGS
            ]
            timesteps = np.stack([_np(s.timesteps)[[0, steps // 2, steps - 1]] for s in states])
            for eta, clipped in ((0.0, False), (0.5, False), (1.0, True)):

                def step(state, t):
                    return ours.step(state, jnp.asarray(model_output), t, jnp.asarray(sample), eta=eta,
                                     use_clipped_model_output=clipped, variance_noise=jnp.asarray(noise))  # fmt: skip

                got = jax.vmap(jax.vmap(step, (None, 0)))(_stack(states), jnp.asarray(timesteps))
                for i, spacing in enumerate(SPACINGS):
                    ref = DDIMScheduler(**config, timestep_spacing=spacing)
                    ref.set_timesteps(steps)
                    for j, t in enumerate(timesteps[i].tolist()):
                        want = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample), eta=eta,
                                        use_clipped_model_output=clipped,
                                        variance_noise=torch.from_numpy(noise))  # fmt: skip
                        where = f"set_alpha_to_one={set_alpha_to_one} {spacing} steps={steps} eta={eta} t={t}"
                        for name in ("prev_sample", "pred_original_sample"):
                            np.testing.assert_allclose(_np(getattr(got, name)[i, j]), _np(getattr(want, name)),
                                                       rtol=1e-6, atol=1e-5, err_msg=f"{name}, {where}")  # fmt: skip


def test_ddim_step_errors():
    ours = FlaxDDIMScheduler()
    state = ours.create_state()
    x = jnp.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        ours.step(state, x, 10, x)
    state = ours.set_timesteps(state, 10)
    with pytest.raises(ValueError, match="pass a key"):
        ours.step(state, x, 900, x, eta=0.5)
    with pytest.raises(ValueError, match="learned variance"):
        ours.step(state, jnp.zeros((2, 6, 4, 4)), 900, x)


def test_step_key_draws_standard_normal_noise():
    """`key` is shorthand for variance_noise=jax.random.normal(key, shape), in both schedulers."""
    sample, model_output, key = jnp.asarray(_randn(14)), jnp.asarray(_randn(15)), jax.random.key(7)
    noise = jax.random.normal(key, SHAPE)
    for ours, kwargs in ((FlaxDDPMScheduler(), {}), (FlaxDDIMScheduler(), {"eta": 0.5})):
        state = ours.set_timesteps(ours.create_state(), 10)
        with_key = ours.step(state, model_output, 500, sample, key=key, **kwargs).prev_sample
        with_noise = ours.step(state, model_output, 500, sample, variance_noise=noise, **kwargs).prev_sample
        np.testing.assert_array_equal(_np(with_key), _np(with_noise))
        assert np.abs(_np(with_key) - _np(ours.step(state, model_output, 500, sample, key=jax.random.key(8),
                                                      **kwargs).prev_sample)).max() > 1e-3  # fmt: skip


# --- configs: validation and scheduler_config.json both ways ---------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"beta_schedule": "cosine"}, "beta_schedule"),
        ({"variance_type": "small"}, "variance_type"),
        ({"prediction_type": "eps"}, "prediction_type"),
        ({"timestep_spacing": "even"}, "timestep_spacing"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"clip_sample": "yes"}, "clip_sample"),
        ({"clip_sample_range": 0.0}, "clip_sample_range"),
        ({"dynamic_thresholding_ratio": 1.5}, "dynamic_thresholding_ratio"),
        ({"steps_offset": -1}, "steps_offset"),
        ({"beta_end": float("nan")}, "beta_end"),
    ],
)
def test_invalid_config_values_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlaxDDPMScheduler(**kwargs)


def test_ddim_rejects_what_diffusers_ddim_does_not_implement():
    with pytest.raises(ValueError, match="beta_schedule"):
        FlaxDDIMScheduler(beta_schedule="sigmoid")
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        FlaxDDIMScheduler(set_alpha_to_one=1)
    with pytest.raises(TypeError):
        FlaxDDPMScheduler(set_alpha_to_one=True)  # a DDIM key: not a DDPM constructor argument


NON_DEFAULT = dict(
    num_train_timesteps=500, beta_start=0.0002, beta_end=0.03, beta_schedule="squaredcos_cap_v2",
    clip_sample=False, prediction_type="v_prediction", thresholding=True, dynamic_thresholding_ratio=0.9,
    clip_sample_range=2.0, sample_max_value=3.0, timestep_spacing="trailing", steps_offset=1,
    rescale_betas_zero_snr=True,
)  # fmt: skip


@pytest.mark.parametrize(
    "flax_cls, torch_cls, extra",
    [
        (FlaxDDPMScheduler, DDPMScheduler, {"variance_type": "learned_range"}),
        (FlaxDDIMScheduler, DDIMScheduler, {"set_alpha_to_one": False}),
    ],
)
def test_scheduler_config_json_round_trips_with_diffusers(tmp_path, diffusers_warnings, flax_cls, torch_cls, extra):
    config = {**NON_DEFAULT, **extra}
    flax_cls(**config).save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == torch_cls.__name__
    loaded = torch_cls.from_pretrained(tmp_path / "ours")
    assert {k: loaded.config[k] for k in config} == config
    # ... and back: a diffusers-written file loads into the JAX class with the same config and state.
    torch_cls(**config).save_pretrained(tmp_path / "theirs")
    ours, state = flax_cls.from_pretrained(tmp_path, subfolder="theirs")
    assert {k: ours.config[k] for k in config} == config
    assert ours == flax_cls.from_config(torch_cls(**config).config)  # hashable by config: a static jit argument
    assert hash(ours) == hash(flax_cls.from_config(ours.config)) and ours != flax_cls()
    np.testing.assert_allclose(_np(state.common.alphas_cumprod), _np(loaded.alphas_cumprod), atol=1e-6)
    # DDPM <-> DDIM: each ignores the other's keys without a warning, as diffusers does.
    other = FlaxDDIMScheduler if flax_cls is FlaxDDPMScheduler else FlaxDDPMScheduler
    other.from_config({**ours.config, "beta_schedule": "linear"})
    assert not [r for r in diffusers_warnings.records if r.levelno >= logging.WARNING], diffusers_warnings.text


def test_unknown_config_key_warns(caplog):
    with caplog.at_level(logging.WARNING):
        scheduler = FlaxDDPMScheduler.from_config({"_class_name": "DDPMScheduler", "not_a_key": 1, "beta_end": 0.01})
    assert scheduler.config["beta_end"] == 0.01
    assert "not_a_key" in caplog.text
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        FlaxDDPMScheduler.from_pretrained("/nonexistent")
