"""Engine pieces without a model: checkpoint resolution and failures, cluster detection, throughput
figures, loss targets and weights against the PyTorch script's formulas."""

import os
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from jax_uncond.run import checkpoint as ckpt
from jax_uncond.run import distributed, metrics
from jax_uncond.training import sharding
from jax_uncond.training.sharding import make_mesh
from jax_uncond.training.step import StepConfig, diffusion_loss


def small_state(mesh, value=1.0):
    return {"w": jax.device_put(jnp.full((4, 3), value), sharding.replicated(mesh)),
            "step": jax.device_put(jnp.asarray(7), sharding.replicated(mesh))}


def save(output_dir, steps, mesh, keep=None):
    checkpoints = ckpt.Checkpoints(ckpt.checkpoints_dir(output_dir), 1, keep)
    for s in steps:
        checkpoints.save(s, small_state(mesh, float(s)), {"position": s}, {"seed": 0})
    checkpoints.close()


def test_latest_without_checkpoints_starts_fresh(tmp_path):
    assert ckpt.resolve_resume("latest", str(tmp_path)) is None
    assert ckpt.resolve_resume(None, str(tmp_path)) is None


def test_resume_latest_skips_a_partial_save_and_keeps_the_limit(tmp_path):
    mesh = make_mesh(jax.devices()[:2])
    save(tmp_path, [1, 2, 3], mesh, keep=2)
    directory = ckpt.checkpoints_dir(tmp_path)
    assert ckpt.Checkpoints(directory, 1, read_only=True).all_steps() == [2, 3]
    # a save killed half-way leaves only Orbax's temporary folder: it must not count
    shutil.copytree(os.path.join(directory, "checkpoint_3"),
                    os.path.join(directory, "checkpoint_4.orbax-checkpoint-tmp-1"))
    assert ckpt.resolve_resume("latest", str(tmp_path)) == (directory, 3)
    one = make_mesh(jax.devices()[:1])
    state, loader, config = ckpt.Checkpoints(directory, 1, read_only=True).restore(
        3, sharding.abstract_state(jax.eval_shape(lambda: small_state(one)), one))
    assert loader == {"position": 3} and config == {"seed": 0}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 3.0))
    assert state["w"].sharding.mesh.devices.size == 1


def test_resume_by_path_or_name(tmp_path):
    mesh = make_mesh(jax.devices()[:1])
    save(tmp_path, [5], mesh)
    directory = ckpt.checkpoints_dir(tmp_path)
    assert ckpt.resolve_resume(os.path.join(directory, "checkpoint_5"), "elsewhere") == (directory, 5)
    assert ckpt.resolve_resume("checkpoint_5", str(tmp_path)) == (directory, 5)


@pytest.mark.parametrize("bad", ["nowhere", "checkpoint_9"])
def test_resume_from_a_non_checkpoint_is_an_error(tmp_path, bad):
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint"):
        ckpt.resolve_resume(bad, str(tmp_path))


def test_restore_failure_is_an_error_not_a_fresh_start(tmp_path):
    mesh = make_mesh(jax.devices()[:1])
    save(tmp_path, [1], mesh)
    wrong = {"w": jax.ShapeDtypeStruct((5, 3), jnp.float32, sharding=sharding.replicated(mesh)),
             "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(mesh))}
    with pytest.raises(ckpt.CheckpointError, match="could not restore"):
        ckpt.Checkpoints(ckpt.checkpoints_dir(tmp_path), 1, read_only=True).restore(1, wrong)


def config(**kw):
    values = dict(coordinator_address=None, num_processes=None, process_id=None)
    values.update(kw)
    return SimpleNamespace(**values)


@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1"}, None),
    ({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "openmpi"),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, "tpu"),
])
def test_cluster_detection(environ, expected):
    assert distributed.detect_cluster(environ) == expected


def test_single_process_is_not_initialised():
    assert distributed.initialize(config(), environ={}) == "single process"


def test_explicit_flags_go_together():
    with pytest.raises(ValueError, match="go together"):
        distributed.initialize(config(coordinator_address="localhost:1234"), environ={})


def test_mfu_from_cost_analysis_and_peak():
    gpu = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
    assert metrics.device_peak_flops(gpu) == 989e12
    assert metrics.device_peak_flops(jax.devices()[0]) is None
    report = metrics.Throughput(64, 989e12 / 4, gpu).report(steps=10, seconds=5.0)
    assert report["steps_per_s"] == 2.0 and report["images_per_s"] == 128.0 and report["mfu"] == pytest.approx(0.5)
    lowered = jax.jit(lambda a, b: a @ b).lower(jnp.ones((8, 16)), jnp.ones((16, 4)))
    assert metrics.step_flops(lowered, devices=2) == pytest.approx(8 * 16 * 4, rel=0.1)


class EchoModel:
    """A 'UNet' whose prediction is a fixed array, to check the loss against the script's formulas."""

    def __init__(self, pred):
        self.pred = pred

    def apply(self, variables, sample, timesteps, train, rngs):
        return SimpleNamespace(sample=self.pred)


class Schedule:
    def __init__(self, alphas_cumprod):
        self.alphas_cumprod = alphas_cumprod

    def add_noise(self, state, x, noise, t):
        a = state.common.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(a) * x + jnp.sqrt(1 - a) * noise

    def get_velocity(self, state, x, noise, t):
        a = state.common.alphas_cumprod[t][:, None, None, None]
        return jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("snr_gamma", [None, 5.0])
def test_loss_matches_the_pytorch_formulas(prediction_type, snr_gamma):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    rng = np.random.default_rng(0)
    x0, noise, pred = (rng.standard_normal((6, 3, 4, 4)).astype(np.float32) for _ in range(3))
    t = np.asarray([0, 10, 100, 500, 900, 999])
    torch_scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
    ac = torch_scheduler.alphas_cumprod.numpy()
    state = SimpleNamespace(common=SimpleNamespace(alphas_cumprod=jnp.asarray(ac)))
    got = diffusion_loss(EchoModel(jnp.asarray(pred)), None, Schedule(ac), state, jnp.asarray(x0), jnp.asarray(noise),
                         jnp.asarray(t), None, StepConfig(prediction_type=prediction_type, snr_gamma=snr_gamma))

    tx0, tnoise, tpred, tt = map(torch.from_numpy, (x0, noise, pred, t))
    target = {"epsilon": tnoise, "sample": tx0,
              "v_prediction": torch_scheduler.get_velocity(tx0, tnoise, tt)}[prediction_type]
    per_example = F.mse_loss(tpred, target, reduction="none").mean(dim=(1, 2, 3))
    snr = compute_snr(torch_scheduler, tt)
    if snr_gamma is None:  # train_unconditional.py: plain MSE, SNR-weighted for `sample`
        weights = snr if prediction_type == "sample" else torch.ones_like(snr)
    else:  # train_text_to_image.py's min-SNR weighting
        weights = torch.stack([snr, snr_gamma * torch.ones_like(snr)], dim=1).min(dim=1)[0]
        if prediction_type == "epsilon":
            weights = weights / snr
        elif prediction_type == "v_prediction":
            weights = weights / (snr + 1)
    expected = (per_example * weights).mean().item()
    np.testing.assert_allclose(float(got), expected, rtol=2e-5)


def test_frozen_fourier_weights_are_never_updated():
    """diffusers freezes GaussianFourierProjection's weight (requires_grad=False): no step and no weight
    decay may move it, while every other tensor is updated."""
    from jax_uncond.models.unet_2d import FlaxUNet2DModel
    from jax_uncond.training.config import parse_args
    from jax_uncond.training.optim import make_optimizer

    model = FlaxUNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8,
                            time_embedding_type="fourier", flip_sin_to_cos=False,
                            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    shapes = jax.eval_shape(model.init_weights, jax.random.key(0))
    params = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)
    optimizer, _ = make_optimizer(parse_args(["--adam_weight_decay", "0.1", "--lr_warmup_steps", "0"]), 10, model)
    updates, _ = optimizer.update(jax.tree.map(jnp.ones_like, params), optimizer.init(params), params)
    assert not np.any(np.asarray(updates["time_proj"]["weight"]))
    moved = [k for k, v in jax.tree_util.tree_leaves_with_path(updates) if np.any(np.asarray(v))]
    assert len(moved) == len(jax.tree.leaves(params)) - 1

def test_resolution_must_divide_by_the_unet_downsampling():
    from jax_uncond.errors import UsageError
    from jax_uncond.run.loop import check_resolution

    model = SimpleNamespace(config={"block_out_channels": (32, 64, 64)})
    check_resolution(SimpleNamespace(resolution=16), model)
    with pytest.raises(UsageError, match="--resolution 18 .* multiple of 4"):
        check_resolution(SimpleNamespace(resolution=18), model)


def test_default_unet_is_the_seed_example_at_the_resolution():
    from jax_uncond.run.loop import unet_config

    config = SimpleNamespace(unet=None, model_config_name_or_path=None, resolution=32)
    unet = unet_config(config)
    assert unet["block_out_channels"] == (128, 128, 256, 256, 512, 512) and unet["sample_size"] == 32
    assert unet["down_block_types"][4] == "AttnDownBlock2D" and unet["up_block_types"][1] == "AttnUpBlock2D"
    assert unet["layers_per_block"] == 2


@pytest.mark.parametrize("use_ema,fp16", [(False, False), (True, True)])
def test_train_state_round_trips_through_a_checkpoint(tmp_path, use_ema, fp16):
    import optax

    from jax_uncond.training.state import create_train_state

    mesh = make_mesh(jax.devices()[:2])
    params = {"dense": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    state = jax.jit(lambda: create_train_state(params, optax.adamw(1e-3), use_ema, fp16),
                    out_shardings=sharding.replicated(mesh))()
    checkpoints = ckpt.Checkpoints(str(tmp_path), 1)
    checkpoints.save(1, state, {"position": 1}, {"use_ema": use_ema})
    checkpoints.close()
    restored, _, _ = ckpt.Checkpoints(str(tmp_path), 1, read_only=True).restore(
        1, sharding.abstract_state(jax.eval_shape(lambda: state), mesh))
    assert (restored.ema_params is None) == (not use_ema)
    assert float(restored.loss_scale) == (65536.0 if fp16 else 1.0)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_xformers_flag_means_cudnn_flash_attention_only_where_it_runs(monkeypatch):
    from jax_uncond.run import loop

    def config(flag, precision):
        return SimpleNamespace(enable_xformers_memory_efficient_attention=flag, mixed_precision=precision)

    mesh = make_mesh()
    assert loop.attention_implementation(config(True, "bf16"), mesh) is None  # these CPUs: their usual attention
    monkeypatch.setattr(sharding, "platform", lambda mesh: "gpu")
    assert loop.attention_implementation(config(True, "bf16"), mesh) == "cudnn"
    assert loop.attention_implementation(config(True, "fp16"), mesh) is None  # fp16 attends in float32
    assert loop.attention_implementation(config(False, "bf16"), mesh) is None


def test_the_attention_follows_the_mesh_devices_not_the_default_backend(monkeypatch):
    mesh = make_mesh()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")  # never consulted
    assert sharding.attention_on(mesh) == sharding.attention_on(mesh, "cudnn") == "blocked"
    assert sharding.attention_on(mesh, "xla") == "xla"
    monkeypatch.setattr(sharding, "platform", lambda mesh: "gpu")
    assert sharding.attention_on(mesh) == "xla" and sharding.attention_on(mesh, "cudnn") == "cudnn"
