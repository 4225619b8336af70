"""DPM-Solver multistep, UniPC multistep, Euler and Euler-ancestral against the installed diffusers classes.

Step by step: diffusers runs each config's chain over a deterministic pseudo model (a function of the
scaled sample and t, no UNet) at 1, 2, 3, 7, 10, 25 and 50 steps; ours replays the same chain (same
sample, model output and noise at every step; the history is its own) as one jitted lax.scan per config,
vmapped over the seven step counts (their per-step state arrays padded to one length), so each config
compiles once. Every step must equal diffusers' to 1e-5 of the largest value the step reads or writes
(1e-4 for the noise-prediction variants, whose float32 steps cancel terms up to ~150x larger); where
diffusers is not finite (UniPC bh1 at a final sigma of 0), ours is finite and the documented limit.
"""

import json
import logging

import diffusers.schedulers.scheduling_dpmsolver_multistep as torch_dpm
import diffusers.schedulers.scheduling_euler_ancestral_discrete as torch_euler_a
import diffusers.schedulers.scheduling_euler_discrete as torch_euler
import diffusers.schedulers.scheduling_unipc_multistep as torch_unipc
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from jax_uncond import (
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerAncestralDiscreteScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxUniPCMultistepScheduler,
)
from jax_uncond.schedulers.common import rescale_zero_terminal_snr

SHAPE = (2, 3, 4, 4)
STEP_COUNTS = (1, 2, 3, 7, 10, 25, 50)
PAD = 52  # longer than any schedule's per-step arrays (Euler log_linear: 50 + 2 sigmas)
PER_STEP_FIELDS = ("timesteps", "sigmas", "coefficients", "corrector", "predictor")
CLASSES = {
    FlaxDPMSolverMultistepScheduler: (DPMSolverMultistepScheduler, torch_dpm),
    FlaxUniPCMultistepScheduler: (UniPCMultistepScheduler, torch_unipc),
    FlaxEulerDiscreteScheduler: (EulerDiscreteScheduler, torch_euler),
    FlaxEulerAncestralDiscreteScheduler: (EulerAncestralDiscreteScheduler, torch_euler_a),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _np(x) -> np.ndarray:
    return x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _randn(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _pseudo_model(scaled: torch.Tensor, t, channels_out: int) -> torch.Tensor:
    """A deterministic stand-in for a UNet: bounded, smooth in the sample and in t."""
    pattern = torch.from_numpy(_randn(99, (1, channels_out) + SHAPE[2:]))
    out = 0.6 * torch.tanh(scaled.repeat(1, channels_out // SHAPE[1], 1, 1))
    return out + 0.3 * torch.sin(pattern + float(t) / 150.0)


def _torch_scheduler(flax_cls, config: dict, monkeypatch):
    torch_cls, module = CLASSES[flax_cls]
    if config.get("rescale_betas_zero_snr"):
        # Ours rescales in float64 (docs/sampling.md: the DDPM scheduler's documented choice); give
        # diffusers the same betas so that the samplers' own arithmetic is what is compared.
        monkeypatch.setattr(module, "rescale_zero_terminal_snr",
                            lambda betas: torch.from_numpy(rescale_zero_terminal_snr(betas.numpy())))  # fmt: skip
    return torch_cls(**config)


def _diffusers_chain(ref, steps: int, noises: np.ndarray, step_kwargs: dict, monkeypatch, module, channels_out: int):
    """diffusers' sampling loop (as its pipelines run it) over the pseudo model, with noises[i] as the noise
    of step i. Returns the samples before and after every step, the model outputs and the scaled model
    inputs, and the samples after UniPC's corrector (arrays), and the sigmas."""
    ref.set_timesteps(steps)
    # Count steps from 0 as ours does; diffusers would otherwise search the first timestep, and where it
    # repeats (Karras on the cosine schedule) start at the second one and step past the end.
    ref.set_begin_index(0)
    monkeypatch.setattr(module, "randn_tensor", lambda *args, **kwargs: torch.from_numpy(noises[ref.step_index]),
                        raising=False)  # fmt: skip
    x = torch.from_numpy(_randn(0)) * ref.init_noise_sigma
    samples, outputs, scaled_inputs, corrected = [x], [], [], []
    for i, t in enumerate(ref.timesteps):
        scaled = ref.scale_model_input(x, t)
        out = _pseudo_model(scaled, t, channels_out)
        kwargs = dict(step_kwargs)
        if isinstance(ref, DPMSolverMultistepScheduler) and ref.config.algorithm_type.startswith("sde"):
            kwargs["variance_noise"] = torch.from_numpy(noises[i])
        before = x
        x = ref.step(out, t, x, **kwargs).prev_sample
        samples.append(x), outputs.append(out), scaled_inputs.append(scaled)
        corrected.append(getattr(ref, "last_sample", before))
    arrays = tuple(np.stack([_np(a) for a in arrays]) for arrays in (samples, outputs, scaled_inputs, corrected))
    return arrays + (_np(ref.sigmas),)


def _padded(state, length: int = PAD):
    """The state with its per-step arrays zero-padded to `length` rows, so that states of different step
    counts stack (the padded rows are never reached within the real step count)."""
    pad = {}
    for name in PER_STEP_FIELDS:
        value = getattr(state, name, None)
        if value is not None:
            pad[name] = jnp.pad(value, [(0, length - value.shape[0])] + [(0, 0)] * (value.ndim - 1))
    return state.replace(**pad, num_inference_steps=length)


def _pad_steps(array: np.ndarray, length: int = PAD) -> np.ndarray:
    return np.concatenate([array, np.zeros((length - len(array),) + array.shape[1:], array.dtype)])


def _replay(scheduler, states, samples, outputs, noises, step_kwargs: dict, uses_noise: bool):
    """Our step over diffusers' (sample, model output, noise) of every step; vmapped over the step counts."""

    @jax.jit
    def replay(states, samples, outputs, noises):
        def one_chain(state, samples, outputs, noises):
            def body(state, inputs):
                sample, output, noise = inputs
                scaled = scheduler.scale_model_input(state, sample)
                kwargs = dict(step_kwargs, variance_noise=noise) if uses_noise else step_kwargs
                result = scheduler.step(state, output, state.timesteps[state.step_index], sample, **kwargs)
                return result.state, (result.prev_sample, scaled)

            return jax.lax.scan(body, state, (samples, outputs, noises))[1]

        return jax.vmap(one_chain)(states, samples, outputs, noises)

    return replay(states, samples, outputs, noises)


def _close(got: np.ndarray, want: np.ndarray, what: str, tolerance: float = 1e-5, read: np.ndarray | None = None):
    """|got - want| <= tolerance x the largest of `want` and what the step `read` (its sample: an Euler
    step from sigma 157 lands near 1 by cancelling values near 400, so it rounds at 400's ulp)."""
    scale = max(float(np.abs(want).max()), float(np.abs(read).max()) if read is not None else 0.0, 1e-6)
    err = float(np.abs(got - want).max())
    assert err <= tolerance * scale, f"{what}: max error {err:.3g} > {tolerance:g} x {scale:.3g}"


def _uses_noise(flax_cls, config: dict, step_kwargs: dict) -> bool:
    if flax_cls is FlaxDPMSolverMultistepScheduler:
        return config.get("algorithm_type", "dpmsolver++").startswith("sde")
    return flax_cls is FlaxEulerAncestralDiscreteScheduler or step_kwargs.get("s_churn", 0) > 0


def _check_against_diffusers(flax_cls, config: dict, monkeypatch, step_counts=STEP_COUNTS, step_kwargs=None,
                             limit_at_nan=None):  # fmt: skip
    """set_timesteps and every step of every chain, ours against diffusers (see the module docstring)."""
    step_kwargs = step_kwargs or {}
    ours = flax_cls(**config)
    ref = _torch_scheduler(flax_cls, config, monkeypatch)
    module = CLASSES[flax_cls][1]
    channels_out = 2 * SHAPE[1] if config.get("variance_type") in ("learned", "learned_range") else SHAPE[1]
    uses_noise = _uses_noise(flax_cls, config, step_kwargs)
    noise_prediction = config.get("algorithm_type") in ("dpmsolver", "sde-dpmsolver") or not config.get(
        "predict_x0", True
    )
    base = ours.create_state()
    states, chains = [], []
    for steps in step_counts:
        noises = np.stack([_randn(1000 + i) for i in range(steps)])
        chain = _diffusers_chain(ref, steps, noises, step_kwargs, monkeypatch, module, channels_out)
        state = ours.set_timesteps(base, steps, SHAPE)
        what = f"{flax_cls.__name__}({config}) {steps} steps"
        if ref.timesteps.is_floating_point():
            # Fractional timesteps interpolate log sigma between training timesteps, and PyTorch's float32
            # sqrt and log are not correctly rounded (NumPy's are): they agree to 3e-5 of a timestep or 2 ulp.
            np.testing.assert_allclose(_np(state.timesteps), _np(ref.timesteps), rtol=2.4e-7, atol=3e-5, err_msg=what)
        else:
            np.testing.assert_array_equal(_np(state.timesteps), _np(ref.timesteps), err_msg=f"{what}: timesteps")
        assert state.timesteps.dtype == (jnp.float32 if ref.timesteps.is_floating_point() else jnp.int32)
        np.testing.assert_allclose(_np(state.sigmas), _np(ref.sigmas), rtol=1e-6, atol=1e-7, err_msg=what)
        np.testing.assert_allclose(float(state.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
        assert state.num_inference_steps == ref.num_inference_steps
        states.append(state if len(step_counts) == 1 else _padded(state))
        chains.append((chain, noises))
    length = max(step_counts) if len(step_counts) == 1 else PAD
    samples = np.stack([_pad_steps(chain[0][:-1], length) for chain, _ in chains])
    outputs = np.stack([_pad_steps(chain[1], length) for chain, _ in chains])
    noises = np.stack([_pad_steps(noise, length) for _, noise in chains])
    states = jax.tree.map(lambda *leaves: jnp.stack(leaves), *states)
    got, scaled = _replay(ours, states, samples, outputs, noises, step_kwargs, uses_noise)
    got, scaled = np.asarray(got), np.asarray(scaled)
    for j, (steps, ((want, model_outputs, want_scaled, corrected, sigmas), _)) in enumerate(zip(step_counts, chains)):
        what = f"{flax_cls.__name__}({config}) {steps} steps"
        _close(scaled[j, :steps], want_scaled, f"{what}: scale_model_input")
        finite = np.isfinite(want[1:]).reshape(steps, -1).all(axis=1)
        assert np.isfinite(got[j, :steps]).all(), f"{what}: not finite"
        for i in range(steps):
            # The noise-prediction variants cancel large terms (the sample and the noise, weighted by up to
            # alpha_{i+1} / alpha_i ~ 150): diffusers' own float32 steps are up to 6e-5 from its float64 ones.
            tolerance = 1e-4 if noise_prediction else 1e-5
            if finite[i]:
                _close(got[j, i], want[1 + i], f"{what}, step {i}", tolerance, read=want[i])
            else:
                assert limit_at_nan is not None, f"{what}: diffusers is not finite at step {i}"
                limit = limit_at_nan(config, sigmas[i], want[i], corrected[i], model_outputs[i])
                _close(got[j, i], limit, f"{what}, limit at step {i}")


DPM_CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 3, "lower_order_final": False},
    {"solver_type": "heun"},
    {"solver_order": 3, "solver_type": "heun", "euler_at_final": True},
    {"algorithm_type": "sde-dpmsolver++"},
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 3},
    {"algorithm_type": "sde-dpmsolver++", "solver_type": "heun", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "sde-dpmsolver++", "solver_order": 1, "use_karras_sigmas": True},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_order": 3, "solver_type": "heun"},
    {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun", "thresholding": True,
     "sample_max_value": 1.5},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min"},
    {"algorithm_type": "sde-dpmsolver", "final_sigmas_type": "sigma_min", "solver_type": "heun",
     "prediction_type": "v_prediction"},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3, "lower_order_final": False},
    {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"},
    {"use_exponential_sigmas": True, "solver_order": 3},
    {"use_beta_sigmas": True},
    {"use_lu_lambdas": True, "solver_order": 3},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "solver_order": 3},
    {"beta_schedule": "squaredcos_cap_v2", "lambda_min_clipped": -5.1, "timestep_spacing": "trailing"},
    {"beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "algorithm_type": "sde-dpmsolver++",
     "prediction_type": "v_prediction"},
    {"prediction_type": "sample", "solver_order": 3},
    {"prediction_type": "v_prediction", "thresholding": True, "dynamic_thresholding_ratio": 0.9,
     "sample_max_value": 1.5},
    {"variance_type": "learned_range"},
    {"variance_type": "learned", "algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    {"num_train_timesteps": 500, "trained_betas": np.linspace(1e-4, 0.03, 500).tolist()},
]  # fmt: skip


@pytest.mark.parametrize("config", DPM_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:80])
def test_dpmsolver_matches_diffusers_step_by_step(config, monkeypatch):
    # Third order over two equal sigmas (Karras ends at sigma_min, then final_sigmas_type sigma_min repeats
    # it): diffusers divides 0 by 0 (NaN); ours is the limit, the identity.
    _check_against_diffusers(FlaxDPMSolverMultistepScheduler, config, monkeypatch,
                             limit_at_nan=lambda config, sigma, sample, corrected, model_output: sample)  # fmt: skip


def _x0_limit(config: dict, sigma: float, sample: np.ndarray, corrected: np.ndarray, model_output: np.ndarray):
    """A last step to sigma 0 lands on x_0 predicted from the model's epsilon: from the sample the model saw
    (predict_x0), or from the corrected sample (the noise-prediction update, which moves the sample)."""
    alpha_t = 1 / (float(sigma) ** 2 + 1) ** 0.5
    x = sample if config.get("predict_x0", True) else corrected
    return (x - float(sigma) * alpha_t * model_output) / alpha_t


UNIPC_CONFIGS = [
    {},
    {"solver_order": 1},
    {"solver_order": 3},
    {"solver_order": 4},
    {"solver_type": "bh1"},
    {"solver_type": "bh1", "solver_order": 3},
    {"solver_type": "bh1", "final_sigmas_type": "sigma_min", "lower_order_final": False, "solver_order": 3},
    {"predict_x0": False},
    {"predict_x0": False, "solver_type": "bh1", "solver_order": 3},
    {"predict_x0": False, "final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
    {"disable_corrector": [0, 2, 5]},
    {"final_sigmas_type": "sigma_min", "lower_order_final": False},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "solver_order": 3},
    {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 40.0},
    {"use_exponential_sigmas": True, "solver_type": "bh1", "final_sigmas_type": "sigma_min"},
    {"use_beta_sigmas": True},
    {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "leading", "steps_offset": 1},
    {"beta_schedule": "scaled_linear", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
    {"prediction_type": "sample"},
    {"prediction_type": "v_prediction", "thresholding": True, "sample_max_value": 1.5},
]  # fmt: skip


@pytest.mark.parametrize("config", UNIPC_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:80])
def test_unipc_matches_diffusers_step_by_step(config, monkeypatch):
    # bh1 with a final sigma of 0, and the noise-prediction variant there: diffusers returns NaN (h is
    # infinite); ours is the limit, the model's x_0 prediction.
    _check_against_diffusers(FlaxUniPCMultistepScheduler, config, monkeypatch, limit_at_nan=_x0_limit)


EULER_CONFIGS = [
    {},
    {"prediction_type": "sample"},
    {"prediction_type": "v_prediction"},
    {"prediction_type": "v_prediction", "timestep_type": "continuous", "use_karras_sigmas": True},
    {"interpolation_type": "log_linear"},
    {"use_karras_sigmas": True},
    {"use_karras_sigmas": True, "sigma_min": 0.05, "sigma_max": 40.0, "final_sigmas_type": "sigma_min"},
    {"use_exponential_sigmas": True},
    {"use_beta_sigmas": True, "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1, "beta_schedule": "squaredcos_cap_v2"},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
]  # fmt: skip


@pytest.mark.parametrize("config", EULER_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items())[:80])
def test_euler_matches_diffusers_step_by_step(config, monkeypatch):
    _check_against_diffusers(FlaxEulerDiscreteScheduler, config, monkeypatch)


@pytest.mark.parametrize("steps", [3, 25])
def test_euler_churn_matches_diffusers(steps, monkeypatch):
    # gamma depends on the number of sigmas: one unpadded chain per step count.
    churn = {"s_churn": 0.8 * steps, "s_tmin": 0.5, "s_tmax": 20.0, "s_noise": 1.003}
    _check_against_diffusers(FlaxEulerDiscreteScheduler, {}, monkeypatch, step_counts=(steps,), step_kwargs=churn)


ANCESTRAL_CONFIGS = [
    {},
    {"prediction_type": "v_prediction", "beta_schedule": "scaled_linear"},
    {"timestep_spacing": "leading", "steps_offset": 1},
    {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True, "beta_schedule": "squaredcos_cap_v2"},
]  # fmt: skip


@pytest.mark.parametrize("config", ANCESTRAL_CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_euler_ancestral_matches_diffusers_step_by_step(config, monkeypatch):
    _check_against_diffusers(FlaxEulerAncestralDiscreteScheduler, config, monkeypatch)


# --- configs: scheduler_config.json both ways, from a DDPM config, bad values -----------------------

NON_DEFAULT = {
    FlaxDPMSolverMultistepScheduler: dict(
        num_train_timesteps=500, beta_schedule="squaredcos_cap_v2", solver_order=3, prediction_type="v_prediction",
        thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=2.0, algorithm_type="sde-dpmsolver++",
        solver_type="heun", lower_order_final=False, euler_at_final=True, use_karras_sigmas=True,
        use_lu_lambdas=True, final_sigmas_type="sigma_min", lambda_min_clipped=-5.1, variance_type="learned_range",
        timestep_spacing="trailing", steps_offset=1, rescale_betas_zero_snr=True,
    ),
    FlaxUniPCMultistepScheduler: dict(
        beta_schedule="scaled_linear", solver_order=3, prediction_type="sample", predict_x0=False,
        solver_type="bh1", disable_corrector=[1, 3], use_exponential_sigmas=True, timestep_spacing="leading",
        final_sigmas_type="sigma_min", sigma_min=0.02, sigma_max=50.0,
    ),
    FlaxEulerDiscreteScheduler: dict(
        prediction_type="v_prediction", interpolation_type="log_linear", use_beta_sigmas=True, sigma_min=0.02,
        timestep_spacing="trailing", timestep_type="continuous", steps_offset=1, final_sigmas_type="sigma_min",
    ),
    FlaxEulerAncestralDiscreteScheduler: dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction",
        timestep_spacing="leading", steps_offset=1, rescale_betas_zero_snr=True,
    ),
}  # fmt: skip


@pytest.mark.parametrize("flax_cls", list(CLASSES), ids=lambda c: c.__name__)
def test_scheduler_config_json_round_trips_with_diffusers(flax_cls, tmp_path, diffusers_warnings):
    torch_cls = CLASSES[flax_cls][0]
    config = NON_DEFAULT[flax_cls]
    flax_cls(**config).save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == torch_cls.__name__
    loaded = torch_cls.from_pretrained(tmp_path / "ours")
    assert {k: loaded.config[k] for k in config} == config
    private = {"_class_name", "_diffusers_version", "_use_default_values"}
    assert set(saved) - private == set(loaded.config) - private  # every key of the class, no other
    # ... and back: a diffusers-written file loads into the JAX class with the same config.
    torch_cls(**config).save_pretrained(tmp_path / "theirs")
    ours, state = flax_cls.from_pretrained(tmp_path, subfolder="theirs")
    assert ours.config == flax_cls(**config).config
    assert hash(ours) == hash(flax_cls.from_config(ours.config)) and ours != flax_cls()
    # All but the last: under zero SNR diffusers sets alpha_bar_T = 2**-24 (ours does so in the sigmas).
    np.testing.assert_allclose(_np(state.common.alphas_cumprod)[:-1], _np(loaded.alphas_cumprod)[:-1], atol=1e-6)
    assert not [r for r in diffusers_warnings.records if r.levelno >= logging.WARNING], diffusers_warnings.text


@pytest.mark.parametrize("flax_cls", list(CLASSES), ids=lambda c: c.__name__)
def test_from_config_of_a_ddpm_config_works_as_in_diffusers(flax_cls, tmp_path, diffusers_warnings):
    # What train_unconditional.py saves, and diffusers users convert with `X.from_config(pipe.scheduler.config)`.
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                  variance_type="fixed_small_log").save_pretrained(tmp_path)  # fmt: skip
    torch_cls = CLASSES[flax_cls][0]
    want = torch_cls.from_config(DDPMScheduler.from_pretrained(tmp_path).config).config
    ddpm, _ = FlaxDDPMScheduler.from_pretrained(tmp_path)
    for source in (ddpm.config, json.loads((tmp_path / "scheduler_config.json").read_text())):
        got = flax_cls.from_config(source).config
        assert got == {k: want[k] for k in got}, flax_cls
    assert not [r for r in diffusers_warnings.records if r.levelno >= logging.WARNING], diffusers_warnings.text
    steps = 20
    state = flax_cls.from_config(ddpm.config).set_timesteps(flax_cls.from_config(ddpm.config).create_state(), steps)
    ref = torch_cls.from_config(want)
    ref.set_timesteps(steps)
    np.testing.assert_allclose(_np(state.timesteps), _np(ref.timesteps))


@pytest.mark.parametrize(
    "flax_cls, kwargs, match",
    [
        (FlaxDPMSolverMultistepScheduler, {"solver_order": 4}, "solver_order must be an int 1..3"),
        (FlaxDPMSolverMultistepScheduler, {"algorithm_type": "dpm"}, "algorithm_type must be one of 'dpmsolver"),
        (FlaxDPMSolverMultistepScheduler, {"solver_type": "rk4"}, "solver_type must be one of 'midpoint'"),
        (FlaxDPMSolverMultistepScheduler, {"final_sigmas_type": "one"}, "final_sigmas_type must be one of 'zero'"),
        (FlaxDPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver"}, "final_sigmas_type 'zero' needs"),
        (FlaxDPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver", "solver_order": 3,
                                           "final_sigmas_type": "sigma_min"}, "solver_order must be 1 or 2"),
        (FlaxDPMSolverMultistepScheduler, {"use_flow_sigmas": True}, "use_flow_sigmas must be False: flow-matching"),
        (FlaxDPMSolverMultistepScheduler, {"flow_shift": 3.0}, "flow_shift must be 1.0"),
        (FlaxDPMSolverMultistepScheduler, {"use_dynamic_shifting": True}, "use_dynamic_shifting must be False"),
        (FlaxDPMSolverMultistepScheduler, {"prediction_type": "flow_prediction"}, "prediction_type must be one of"),
        (FlaxDPMSolverMultistepScheduler, {"use_karras_sigmas": True, "use_beta_sigmas": True}, "at most one of"),
        (FlaxDPMSolverMultistepScheduler, {"lambda_min_clipped": float("nan")}, "lambda_min_clipped"),
        (FlaxDPMSolverMultistepScheduler, {"variance_type": "small"}, "variance_type must be one of None"),
        (FlaxDPMSolverMultistepScheduler, {"beta_schedule": "sigmoid"}, "beta_schedule must be one of 'linear'"),
        (FlaxDPMSolverMultistepScheduler, {"lower_order_final": 1}, "lower_order_final must be true or false"),
        (FlaxUniPCMultistepScheduler, {"solver_type": "bh3"}, "solver_type must be one of 'bh1', 'bh2'"),
        (FlaxUniPCMultistepScheduler, {"solver_order": 0}, "solver_order must be an int >= 1"),
        (FlaxUniPCMultistepScheduler, {"disable_corrector": [-1]}, "disable_corrector"),
        (FlaxUniPCMultistepScheduler, {"solver_p": FlaxDDPMScheduler()}, "solver_p must be None"),
        (FlaxUniPCMultistepScheduler, {"shift_terminal": 0.1}, "shift_terminal must be None"),
        (FlaxUniPCMultistepScheduler, {"sigma_min": -1.0}, "sigma_min must be a number"),
        (FlaxUniPCMultistepScheduler, {"lower_order_final": False}, "lower_order_final true or final_sigmas_type"),
        (FlaxEulerDiscreteScheduler, {"interpolation_type": "cubic"}, "interpolation_type must be one of 'linear'"),
        (FlaxEulerDiscreteScheduler, {"timestep_type": "float"}, "timestep_type must be one of 'discrete'"),
        (FlaxEulerDiscreteScheduler, {"use_exponential_sigmas": "yes"}, "use_exponential_sigmas must be true or"),
        (FlaxEulerAncestralDiscreteScheduler, {"timestep_spacing": "even"}, "timestep_spacing must be one of"),
        (FlaxEulerAncestralDiscreteScheduler, {"prediction_type": "eps"}, "prediction_type must be one of"),
    ],
)  # fmt: skip
def test_invalid_config_values_raise(flax_cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        flax_cls(**kwargs)


@pytest.mark.parametrize("flax_cls", list(CLASSES), ids=lambda c: c.__name__)
def test_set_timesteps_errors(flax_cls):
    scheduler = flax_cls(num_train_timesteps=100)
    state = scheduler.create_state()
    for steps in (0, 101, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps must be"):
            scheduler.set_timesteps(state, steps, SHAPE)
    with pytest.raises(ValueError, match="steps_offset=3 pushes the first timestep"):
        offset = flax_cls(num_train_timesteps=100, timestep_spacing="leading", steps_offset=3)
        offset.set_timesteps(offset.create_state(), 99, SHAPE)


def test_eager_steps_check_their_inputs():
    dpm = FlaxDPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")
    sample = jnp.asarray(_randn(0))
    with pytest.raises(ValueError, match="call set_timesteps"):
        dpm.step(dpm.create_state(), sample, 999, sample, key=jax.random.key(0))
    state = dpm.set_timesteps(dpm.create_state(), 10, SHAPE)
    with pytest.raises(ValueError, match="exactly one of key or variance_noise"):
        dpm.step(state, sample, 999, sample)
    with pytest.raises(ValueError, match="timestep 899 is not the next one"):
        dpm.step(state, sample, 899, sample, key=jax.random.key(0))
    with pytest.raises(ValueError, match="set up for samples of shape"):
        dpm.step(state, sample[:1], 999, sample[:1], key=jax.random.key(0))
    with pytest.raises(ValueError, match="model output shape"):
        dpm.step(state, jnp.concatenate([sample, sample], axis=1), 999, sample, key=jax.random.key(0))
    for _ in range(10):
        state = dpm.step(state, sample, state.timesteps[state.step_index], sample, key=jax.random.key(0)).state
    with pytest.raises(ValueError, match="all 10 steps are done"):
        dpm.step(state, sample, 0, sample, key=jax.random.key(0))
    ancestral = FlaxEulerAncestralDiscreteScheduler()
    with pytest.raises(ValueError, match="exactly one of key or variance_noise"):
        ancestral.step(ancestral.set_timesteps(ancestral.create_state(), 5), sample, 999.0, sample)


@pytest.mark.parametrize("flax_cls, config, kwargs", [
    (FlaxDPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, {}),
    (FlaxEulerAncestralDiscreteScheduler, {}, {}),
    (FlaxEulerDiscreteScheduler, {}, {"s_churn": 100.0}),
])  # fmt: skip
def test_key_draws_the_standard_normal_noise_it_names(flax_cls, config, kwargs):
    scheduler = flax_cls(**config)
    state = scheduler.set_timesteps(scheduler.create_state(), 4, SHAPE)
    sample, output, key = jnp.asarray(_randn(0)), jnp.asarray(_randn(1)), jax.random.key(3)
    t = state.timesteps[0]
    drawn = scheduler.step(state, output, t, sample, key=key, **kwargs).prev_sample
    given = scheduler.step(state, output, t, sample, variance_noise=jax.random.normal(key, SHAPE), **kwargs)
    np.testing.assert_array_equal(np.asarray(drawn), np.asarray(given.prev_sample))
    other = scheduler.step(state, output, t, sample, key=jax.random.key(4), **kwargs).prev_sample
    assert np.abs(np.asarray(other) - np.asarray(drawn)).max() > 1e-3


def test_euler_add_noise_matches_diffusers_on_its_timesteps():
    for flax_cls in (FlaxEulerDiscreteScheduler, FlaxEulerAncestralDiscreteScheduler):
        ours, ref = flax_cls(timestep_spacing="leading"), CLASSES[flax_cls][0](timestep_spacing="leading")
        ref.set_timesteps(10)
        timesteps = ref.timesteps[[0, 4, 9]]
        x0, noise = _randn(0)[:1].repeat(3, 0), _randn(1)[:1].repeat(3, 0)
        want = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), timesteps)
        got = ours.add_noise(ours.create_state(), jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(_np(timesteps)))
        np.testing.assert_allclose(np.asarray(got), _np(want), rtol=1e-6, atol=1e-5)


def test_euler_ancestral_sample_prediction_is_euler_on_the_models_x0():
    # diffusers raises NotImplementedError for prediction_type="sample"; x_0 is the model output itself.
    scheduler = FlaxEulerAncestralDiscreteScheduler(prediction_type="sample")
    state = scheduler.set_timesteps(scheduler.create_state(), 10)
    sample, x0, noise = (jnp.asarray(_randn(i)) for i in range(3))
    got = scheduler.step(state, x0, state.timesteps[0], sample, variance_noise=noise).prev_sample
    sigma_from, sigma_to = (float(s) for s in state.sigmas[:2])
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    want = sample + (sample - x0) / sigma_from * (sigma_down - sigma_from) + noise * sigma_up
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
