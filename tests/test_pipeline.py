"""FlaxDDPMPipeline against diffusers: folders both ways, and full DDIM chains from the same noise and weights.

One tiny UNet (block_out_channels (32, 64), 8x8) serves every test; each sampler compiles once.
"""

import json

import diffusers
import jax
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from jax_uncond import FlaxDDIMScheduler, FlaxDDPMPipeline, FlaxDDPMScheduler
from jax_uncond.pipelines.ddpm import _build_sampler

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


def _diffusers_ddim_chain(path, latents: np.ndarray, steps: int, prediction_type: str) -> np.ndarray:
    """diffusers' DDIMScheduler + UNet2DModel loop (what DDIMPipeline does), returning x_0 in [-1, 1]."""
    unet = UNet2DModel.from_pretrained(path, subfolder="unet").eval()
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", prediction_type=prediction_type)
    scheduler.set_timesteps(steps)
    x = torch.from_numpy(latents)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
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
    want = _diffusers_ddim_chain(torch_pipeline_dir, latents, steps, prediction_type).transpose(0, 2, 3, 1)
    assert np.abs(images * 2 - 1 - want).max() <= 1e-3
    assert want.std() > 0.1  # the chain produced something, not a constant


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


@pytest.mark.parametrize("scheduler_cls", [FlaxDDPMScheduler, FlaxDDIMScheduler])
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
