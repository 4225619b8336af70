"""FlaxDDPMPipeline against diffusers: folders both ways, and full DDIM, DPM-Solver, UniPC and Euler chains from
the same noise and weights.

One tiny UNet (block_out_channels (32, 64), 8x8) serves every test; each sampler compiles once.
"""

import json
import sys
from unittest import mock

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    UNet2DModel,
    UniPCMultistepScheduler,
)

from jax_uncond import (
    FlaxDDIMScheduler,
    FlaxDDPMPipeline,
    FlaxDDPMScheduler,
    FlaxDPMSolverMultistepScheduler,
    FlaxEulerAncestralDiscreteScheduler,
    FlaxEulerDiscreteScheduler,
    FlaxUniPCMultistepScheduler,
)
from jax_uncond.pipelines.ddpm import _build_sampler
from jax_uncond.schedulers.samplers import make_sampler

UNET_CONFIG = dict(
    sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
    norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
)  # fmt: skip
BATCH = 8  # divisible by the 8 test devices: the batch is sharded


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def torch_pipeline_dir(tmp_path_factory):
    """A diffusers DDPMPipeline folder written by diffusers itself.

    An untrained UNet makes the DDIM ODE chaotic: with PyTorch's default init, JAX and PyTorch UNet calls
    agree to 2e-6 yet the 50-step chains drift 0.09 apart, doubling every few steps. A trained denoiser
    contracts; scaling the output conv by 0.1 gets a random model there while its output still matters.
    """
    torch.manual_seed(0)
    unet = UNet2DModel(**UNET_CONFIG)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    path = tmp_path_factory.mktemp("torch_pipeline")
    DDPMPipeline(unet=unet.eval(), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def loaded(torch_pipeline_dir):
    return FlaxDDPMPipeline.from_pretrained(torch_pipeline_dir)


def _diffusers_chain(path, latents: np.ndarray, steps: int, scheduler_cls=DDIMScheduler, noises=None, **config):
    """diffusers' scheduler + UNet2DModel loop as its pipelines run it (initial sigma, scale_model_input),
    from the folder's DDPM scheduler config; `noises[i]` is the noise of step i. Returns x_0 in [-1, 1]."""
    unet = UNet2DModel.from_pretrained(path, subfolder="unet").eval()
    scheduler = scheduler_cls.from_config(DDPMScheduler.from_pretrained(path, subfolder="scheduler").config, **config)
    scheduler.set_timesteps(steps)
    module = sys.modules[scheduler_cls.__module__]
    x = torch.from_numpy(latents) * scheduler.init_noise_sigma
    with torch.no_grad(), mock.patch.object(module, "randn_tensor", lambda *a, **k: noises[scheduler.step_index],
                                            create=True):  # fmt: skip
        for i, t in enumerate(scheduler.timesteps):
            out = unet(scheduler.scale_model_input(x, t), t).sample
            kwargs = {"eta": 0.0} if scheduler_cls is DDIMScheduler else {}
            if getattr(scheduler.config, "algorithm_type", "").startswith("sde"):
                kwargs["variance_noise"] = noises[i]
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).numpy() * 2 - 1


@pytest.mark.parametrize(
    "steps, prediction_type, batch",
    [
        (10, "epsilon", 3),  # 3 does not divide the 8 devices: one device samples
        (50, "epsilon", BATCH),
        pytest.param(50, "v_prediction", BATCH, marks=pytest.mark.slow),
    ],
)
def test_ddim_chain_matches_diffusers(torch_pipeline_dir, loaded, steps, prediction_type, batch):
    pipeline, params = loaded
    latents = np.random.default_rng(steps).standard_normal((batch, 3, 8, 8)).astype(np.float32)
    ddim = FlaxDDIMScheduler.from_config(pipeline.scheduler.config, prediction_type=prediction_type)
    rng = jax.random.key(0)
    with jax.transfer_guard("disallow"):  # no implicit host<->device copy anywhere in the call
        images = pipeline(params, rng, batch_size=batch, num_inference_steps=steps, scheduler=ddim,
                          latents=latents, output_type="np").images  # fmt: skip
    assert images.shape == (batch, 8, 8, 3) and images.dtype == np.float32
    want = _diffusers_chain(torch_pipeline_dir, latents, steps, prediction_type=prediction_type).transpose(0, 2, 3, 1)
    assert np.abs(images * 2 - 1 - want).max() <= 1e-3
    assert want.std() > 0.1  # the chain produced something, not a constant


@pytest.mark.parametrize(
    "flax_cls, torch_cls, config, steps",
    [
        (FlaxDPMSolverMultistepScheduler, DPMSolverMultistepScheduler, {}, 20),
        (FlaxUniPCMultistepScheduler, UniPCMultistepScheduler, {}, 10),
        (FlaxEulerAncestralDiscreteScheduler, EulerAncestralDiscreteScheduler, {}, 10),
        pytest.param(FlaxDPMSolverMultistepScheduler, DPMSolverMultistepScheduler,
                     {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, 15, marks=pytest.mark.slow),
        pytest.param(FlaxEulerDiscreteScheduler, EulerDiscreteScheduler, {"timestep_spacing": "trailing"}, 20,
                     marks=pytest.mark.slow),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else None,
)  # fmt: skip
def test_solver_chains_match_diffusers(torch_pipeline_dir, loaded, flax_cls, torch_cls, config, steps):
    """The whole chain as one compiled scan (scheduler state carried, model input scaled, noise from the
    step keys) against diffusers' loop over the same UNet, latents and noise."""
    pipeline, params = loaded
    latents = np.random.default_rng(steps).standard_normal((BATCH, 3, 8, 8)).astype(np.float32)
    scheduler = flax_cls.from_config(pipeline.scheduler.config, **config)
    rng = jax.random.key(5)
    with jax.transfer_guard("disallow"):
        images = pipeline(params, rng, batch_size=BATCH, num_inference_steps=steps, scheduler=scheduler,
                          latents=latents, output_type="np").images  # fmt: skip
    step_keys = jax.random.split(jax.random.split(rng)[1], steps)  # the pipeline's per-step keys
    noises = [torch.from_numpy(np.asarray(jax.random.normal(k, latents.shape, jnp.float32))) for k in step_keys]
    want = _diffusers_chain(torch_pipeline_dir, latents, steps, torch_cls, noises, **config).transpose(0, 2, 3, 1)
    assert np.abs(images * 2 - 1 - want).max() <= 1e-3
    assert want.std() > 0.1


def test_ddpm_sampling_is_cached_reproducible_and_pil(loaded):
    pipeline, params = loaded
    rng = jax.random.key(1)
    first = pipeline(params, rng, batch_size=BATCH, num_inference_steps=4, output_type="np").images
    built = _build_sampler.cache_info().misses
    sampler, _ = _build_sampler(pipeline.unet, pipeline.scheduler, (BATCH, 3, 8, 8), 0.0, False, tuple(jax.devices()))
    traced = sampler._cache_size()
    fresh = FlaxDDPMPipeline(pipeline.unet, pipeline.scheduler)  # training builds a new pipeline per epoch
    with jax.transfer_guard("disallow"):
        pil = fresh(params, rng, batch_size=BATCH, num_inference_steps=4).images
    assert _build_sampler.cache_info().misses == built and sampler._cache_size() == traced == 1  # no recompile
    assert len(pil) == BATCH and pil[0].size == (8, 8) and pil[0].mode == "RGB"
    np.testing.assert_array_equal(np.asarray(pil[3]), (first[3] * 255).round().astype(np.uint8))
    (other,) = pipeline(params, jax.random.key(2), batch_size=BATCH, num_inference_steps=4, output_type="np",
                        return_dict=False)  # fmt: skip
    assert np.abs(other - first).max() > 0.05


def test_call_errors(loaded):
    pipeline, params = loaded
    rng = jax.random.key(0)
    with pytest.raises(ValueError, match="batch_size"):
        pipeline(params, rng, batch_size=0, num_inference_steps=2)
    with pytest.raises(ValueError, match="output_type"):
        pipeline(params, rng, num_inference_steps=2, output_type="pt")
    with pytest.raises(ValueError, match="eta"):
        pipeline(params, rng, num_inference_steps=2, eta=0.5)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipeline(params, rng, batch_size=2, num_inference_steps=2, latents=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipeline(params, rng, num_inference_steps=1001)
    with pytest.raises(ValueError, match="scheduler must be one of .*FlaxUniPCMultistepScheduler.*; got DDIMScheduler"):
        pipeline(params, rng, num_inference_steps=2, scheduler=DDIMScheduler())  # diffusers' own, not ours
    with pytest.raises(ValueError, match="eta=0.5 applies to DDIM only"):
        pipeline(params, rng, num_inference_steps=2, scheduler=FlaxUniPCMultistepScheduler(), eta=0.5)


@pytest.mark.parametrize("scheduler_cls", [FlaxDDPMScheduler, FlaxDDIMScheduler, FlaxUniPCMultistepScheduler,
                                           FlaxEulerAncestralDiscreteScheduler])
def test_saved_folder_loads_in_diffusers(tmp_path, loaded, scheduler_cls, caplog):
    pipeline, params = loaded
    scheduler = scheduler_cls.from_config(pipeline.scheduler.config)
    FlaxDDPMPipeline(pipeline.unet, scheduler).save_pretrained(tmp_path, params)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    diffusers.utils.logging.enable_propagation()
    try:
        theirs = diffusers.DiffusionPipeline.from_pretrained(tmp_path, low_cpu_mem_usage=False)
    finally:
        diffusers.utils.logging.disable_propagation()
    assert not [r for r in caplog.records if r.levelno >= 30 and r.name.startswith("diffusers")], caplog.text
    assert isinstance(theirs, DDPMPipeline)
    assert type(theirs.scheduler).__name__ == scheduler.diffusers_class
    reloaded, reloaded_params = FlaxDDPMPipeline.from_pretrained(tmp_path)
    assert reloaded.scheduler == scheduler and reloaded.unet.config == pipeline.unet.config
    jax.tree.map(np.testing.assert_array_equal, reloaded_params, params)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        FlaxDDPMPipeline.from_pretrained(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionPipeline"):
        FlaxDDPMPipeline.from_pretrained(tmp_path)


@pytest.mark.slow
def test_images_do_not_depend_on_the_device_count(loaded):
    """The noise is drawn at the global shape with partitionable threefry: 1 or 8 devices, same images."""
    pipeline, params = loaded
    rng = jax.random.key(4)
    sharded = pipeline(params, rng, batch_size=BATCH, num_inference_steps=3, output_type="np").images
    one_device = tuple(jax.devices()[:1])
    sampler, _ = _build_sampler(pipeline.unet, pipeline.scheduler, (BATCH, 3, 8, 8), 0.0, False, one_device)
    state = pipeline.scheduler.set_timesteps(pipeline.scheduler.create_state(), 3)
    single = np.asarray(sampler(*jax.device_put((params["unet"], state, rng), jax.devices()[0])))
    np.testing.assert_allclose(single, sharded, atol=1e-6)


def _trained_tiny_unet(steps: int = 150) -> tuple[FlaxDDPMPipeline, dict]:
    """A UNet (16, 32) trained `steps` Adam steps on 8x8 images (a flat colour, a centred square of another):
    enough of a denoiser that its probability-flow ODE is smooth, as a trained model's is."""
    import optax

    from jax_uncond import FlaxUNet2DModel

    palette = np.random.default_rng(0).uniform(-1, 1, (6, 3)).astype(np.float32)
    pairs = np.random.default_rng(1).integers(0, 6, (256, 2))
    images = np.repeat(np.repeat(palette[pairs[:, 0]][:, :, None, None], 8, 2), 8, 3)
    images[:, :, 2:6, 2:6] = palette[pairs[:, 1]][:, :, None, None]
    unet = FlaxUNet2DModel(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    scheduler = FlaxDDPMScheduler()
    common = scheduler.create_state()
    optimizer = optax.adam(3e-3)

    @jax.jit
    def train(params, key):
        def step(carry, key):
            params, opt_state = carry
            keys = jax.random.split(key, 3)
            x0 = jnp.asarray(images)[jax.random.randint(keys[0], (16,), 0, len(images))]
            t = jax.random.randint(keys[1], (16,), 0, len(scheduler))
            noise = jax.random.normal(keys[2], x0.shape)
            loss = lambda p: jnp.mean((unet.apply({"params": p}, scheduler.add_noise(common, x0, noise, t), t).sample
                                       - noise) ** 2)  # noqa: E731
            grads = jax.grad(loss)(params)
            updates, opt_state = optimizer.update(grads, opt_state)
            return (optax.apply_updates(params, updates), opt_state), None

        (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, steps))
        return params

    params = train(unet.init_weights(jax.random.key(0)), jax.random.key(1))
    return FlaxDDPMPipeline(unet, scheduler), {"unet": params}


@pytest.mark.slow
def test_fast_solvers_are_closer_to_the_ode_than_ddim():
    """20 steps of DPM-Solver++ and of UniPC land closer to a 1000-step DDIM chain (the probability-flow
    ODE, eta 0) than 20 DDIM steps do. DDIM without clip_sample: clipping x_0 changes the dynamics,
    and the fast solvers have no such clipping (thresholding is their counterpart, off by default)."""
    pipeline, params = _trained_tiny_unet()
    config = {**pipeline.scheduler.config, "clip_sample": False}
    batch = 6  # not a multiple of the 8 test devices: one device, faster for 1000 tiny steps
    latents = np.random.default_rng(2).standard_normal((batch, 3, 8, 8)).astype(np.float32)

    def chain(name, steps):  # the samplers as the command lines build them
        return pipeline(params, jax.random.key(0), batch_size=batch, num_inference_steps=steps,
                        scheduler=make_sampler(name, config), latents=latents, output_type="np").images  # fmt: skip

    reference = chain("ddim", 1000)
    errors = {name: float(np.sqrt(np.mean((chain(name, 20) - reference) ** 2))) for name in ("ddim", "dpmsolver++",
                                                                                                "unipc")}  # fmt: skip
    print("RMSE to 1000-step DDIM, 20 steps:", errors)
    assert errors["dpmsolver++"] < errors["ddim"] and errors["unipc"] < errors["ddim"], errors
    assert reference.std() > 0.1
