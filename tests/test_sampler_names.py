"""The sampler table (schedulers/samplers.py) and where its names are used: train_flax.py --eval_scheduler
(the sample grids) and `python -m jax_uncond.sample --scheduler`. Sampling itself is in test_pipeline.py."""

import numpy as np
import pytest

from jax_uncond import (
    FlaxDDIMScheduler,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerAncestralDiscreteScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxUniPCMultistepScheduler,
    sample,
)
from jax_uncond.errors import UsageError
from jax_uncond.schedulers.samplers import SAMPLERS, default_steps, make_sampler
from jax_uncond.run import outputs as out
from jax_uncond.training.config import parse_args

EXPECTED = {
    "ddpm": (FlaxDDPMScheduler, 1000),
    "ddim": (FlaxDDIMScheduler, 50),
    "dpmsolver++": (FlaxDPMSolverMultistepScheduler, 20),
    "sde-dpmsolver++": (FlaxDPMSolverMultistepScheduler, 25),
    "unipc": (FlaxUniPCMultistepScheduler, 15),
    "euler": (FlaxEulerDiscreteScheduler, 50),
    "euler_ancestral": (FlaxEulerAncestralDiscreteScheduler, 50),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_builds_from_the_training_scheduler(name):
    train = FlaxDDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    sampler = make_sampler(name, train.config)
    cls, steps = EXPECTED[name]
    assert type(sampler) is cls and default_steps(name, len(train)) == steps
    assert (sampler.config["beta_schedule"], sampler.config["prediction_type"]) == ("squaredcos_cap_v2", "v_prediction")
    state = sampler.set_timesteps(sampler.create_state(), steps, (1, 3, 8, 8))
    want = train.create_state().common.alphas_cumprod
    np.testing.assert_array_equal(np.asarray(state.common.alphas_cumprod), np.asarray(want))
    if name == "sde-dpmsolver++":
        assert sampler.config["algorithm_type"] == "sde-dpmsolver++"


def test_samplers_start_at_the_last_timestep_and_keep_ddpms_clipping():
    """A DDPM config says leading spacing and clip_sample: the sigma samplers get linspace, and the
    multistep solvers the same x_0 clipping as their thresholding (sample_max_value 1)."""
    ddpm = FlaxDDPMScheduler().config
    assert (ddpm["timestep_spacing"], ddpm["clip_sample"], ddpm["thresholding"]) == ("leading", True, False)
    for name in ("dpmsolver++", "sde-dpmsolver++", "unipc", "euler", "euler_ancestral"):
        config = make_sampler(name, ddpm).config
        assert config["timestep_spacing"] == "linspace"
        assert config.get("thresholding", False) == (name not in ("euler", "euler_ancestral"))
        assert config.get("sample_max_value", 1.0) == 1.0
    for no_clip in ({"clip_sample": False}, {"clip_sample_range": 2.0}):  # nothing, or no exact counterpart
        assert not make_sampler("unipc", {**ddpm, **no_clip}).config["thresholding"]
    assert make_sampler("ddim", ddpm).config["clip_sample"]  # DDIM clips as DDPM does


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="unknown sampler 'plms'; choose one of ddpm, ddim, dpmsolver\\+\\+"):
        make_sampler("plms", FlaxDDPMScheduler().config)


def test_eval_scheduler_flag(tmp_path, capsys):
    config = parse_args(["--output_dir", str(tmp_path), "--eval_scheduler", "dpmsolver++",
                         "--ddpm_num_inference_steps", "20"])  # fmt: skip
    assert config.eval_scheduler == "dpmsolver++"
    assert parse_args(["--output_dir", str(tmp_path)]).eval_scheduler == "ddpm"  # as the PyTorch script samples
    with pytest.raises(SystemExit) as info:
        parse_args(["--output_dir", str(tmp_path), "--eval_scheduler", "plms"])
    assert info.value.code == 2 and "invalid choice: 'plms'" in capsys.readouterr().err


def test_sample_grids_use_the_eval_scheduler(tmp_path):
    config = parse_args(["--output_dir", str(tmp_path / "run"), "--eval_scheduler", "unipc",
                         "--ddpm_num_inference_steps", "10", "--ddpm_beta_schedule", "scaled_linear"])  # fmt: skip
    training = FlaxDDPMScheduler(beta_schedule="scaled_linear")
    outputs = out.RunOutputs(config, model=None, scheduler=training, mesh=None)
    assert outputs.eval_scheduler == make_sampler("unipc", training.config)
    assert outputs.pipeline().scheduler is training  # the exported folder keeps the training DDPMScheduler
    ddpm = parse_args(["--output_dir", str(tmp_path / "run")])
    assert out.RunOutputs(ddpm, model=None, scheduler=training, mesh=None).eval_scheduler is training


def test_eval_scheduler_that_cannot_sample_the_schedule_is_a_usage_error(tmp_path):
    config = parse_args(["--output_dir", str(tmp_path / "run"), "--eval_scheduler", "dpmsolver++",
                         "--ddpm_beta_schedule", "sigmoid"])  # fmt: skip
    with pytest.raises(UsageError, match="--eval_scheduler dpmsolver\\+\\+: beta_schedule must be one of 'linear'"):
        out.RunOutputs(config, model=None, scheduler=FlaxDDPMScheduler(beta_schedule="sigmoid"), mesh=None)
    config = parse_args(["--output_dir", str(tmp_path / "run"), "--eval_scheduler", "unipc", "--ddpm_num_steps", "100"])
    with pytest.raises(UsageError, match="--eval_scheduler unipc: num_inference_steps must be between 1 and"):
        out.RunOutputs(config, model=None, scheduler=FlaxDDPMScheduler(num_train_timesteps=100), mesh=None)


def test_sample_cli_checks_the_steps_before_compiling(tmp_path, capsys):
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pipe")
    for scheduler in ("ddpm", "unipc"):
        with pytest.raises(SystemExit) as info:
            sample.main([str(tmp_path / "pipe"), "--out", str(tmp_path / "out"), "--scheduler", scheduler,
                         "--steps", "101"])  # fmt: skip
        assert info.value.code == 2
        assert "num_inference_steps must be between 1 and num_train_timesteps=100" in capsys.readouterr().err
