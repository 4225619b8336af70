"""The Flax FID Inception against pytorch-fid's `InceptionV3([3])` on the same uint8 images and weights, and the
features of sampled images: quantised as PNG files are, the same on 1 and 8 devices with padding dropped.

One compiled network (1 device, 4 images per call) serves the comparisons; the resize compiles per size.
"""

import jax
import numpy as np
import pytest
import torch

from fid_parts import pytorch_features, pytorch_inception, structured_images, weights_files
from jax_uncond.evaluation.features import InceptionFeatures
from jax_uncond.evaluation.fid import _quantiser, sample_features
from jax_uncond.evaluation.inception import resize_bilinear
from jax_uncond.evaluation.inception_weights import load_inception_weights
from jax_uncond.models.unet_2d import FlaxUNet2DModel
from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline
from jax_uncond.schedulers import FlaxDDPMScheduler
from jax_uncond.schedulers.samplers import make_sampler
from jax_uncond.run.outputs import to_uint8
from jax_uncond.training.sharding import batch_sharding, make_mesh, replicated

BATCH = 4  # per comparison call
SAMPLE_BATCH = 8  # per sampling call: divisible by the 8 test devices
TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def params():
    return load_inception_weights(weights_files()["zip"]).params


@pytest.fixture(scope="module")
def one_device(params):
    return InceptionFeatures(params, make_mesh(jax.devices()[:1]), BATCH)


@pytest.fixture(scope="module")
def torch_model():
    return pytorch_inception(weights_files()["legacy"])


def features(extractor, images):
    return extractor.of_batches(iter([jax.device_put(images, batch_sharding(extractor.mesh))]), len(images))


@pytest.mark.parametrize("height,width", [(16, 16), (32, 32), (64, 64), (256, 256), (299, 299), (24, 40)])
def test_features_equal_pytorch_fid(one_device, torch_model, height, width):
    """Half RGB, half grey read as pytorch-fid reads a grey PNG (PIL's convert("RGB") repeats the channel)."""
    rgb = structured_images(BATCH // 2, max(height, width), 3, seed=height)[:, :height, :width]
    grey = structured_images(BATCH // 2, max(height, width), 1, seed=width + 1)[:, :height, :width]
    images = np.concatenate([rgb, np.repeat(grey, 3, axis=-1)])
    ours, theirs = features(one_device, images), pytorch_features(torch_model, images)
    scale = np.abs(theirs).max()
    assert 0.1 < scale < 100 and (theirs > 0).mean() > 0.5  # the random weights neither vanish nor explode
    assert np.abs(ours - theirs).max() <= 1e-4 * scale


def test_one_channel_images_are_grey_rgb(one_device):
    grey = structured_images(BATCH, 32, 1, seed=7)
    np.testing.assert_allclose(features(one_device, grey), features(one_device, np.repeat(grey, 3, axis=-1)),
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [5, 16, 299, 600])
def test_resize_equals_torch_interpolate(size):
    image = np.random.default_rng(size).uniform(0, 1, (2, size, size + 3, 3)).astype(np.float32)
    theirs = torch.nn.functional.interpolate(torch.from_numpy(image.transpose(0, 3, 1, 2)), size=(299, 299),
                                             mode="bilinear", align_corners=False).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(resize_bilinear(image)), theirs, rtol=0, atol=2.5e-7)


@pytest.fixture(scope="module")
def tiny_pipeline():
    unet = FlaxUNet2DModel.from_config(TINY_UNET)
    scheduler = FlaxDDPMScheduler(num_train_timesteps=100)
    return FlaxDDPMPipeline(unet, scheduler), unet.init_weights(jax.random.key(0))


def test_samples_are_quantised_as_png_files(tiny_pipeline):
    """What Inception sees is what `sample` writes to PNG: the pipeline's images rounded to uint8."""
    pipeline, unet_params = tiny_pipeline
    mesh = make_mesh()
    scheduler = make_sampler("ddim", pipeline.scheduler.config)
    rng = jax.random.key(3)
    on_mesh = _quantiser(mesh)(pipeline.sample_on_mesh({"unet": jax.device_put(unet_params, replicated(mesh))}, rng,
                                                         SAMPLE_BATCH, 2, scheduler, mesh))
    assert on_mesh.dtype == np.uint8 and on_mesh.sharding == batch_sharding(mesh)
    png = to_uint8(pipeline({"unet": unet_params}, rng, batch_size=SAMPLE_BATCH, num_inference_steps=2,
                            scheduler=scheduler, output_type="np").images)
    np.testing.assert_array_equal(np.asarray(on_mesh), png)


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_features(tiny_pipeline, params):
    """13 samples in calls of 8: the second call's 3 extra images are dropped, on 1 device as on 8."""
    pipeline, unet_params = tiny_pipeline
    scheduler = make_sampler("ddim", pipeline.scheduler.config)
    out = []
    for devices in (jax.devices()[:1], jax.devices()):  # 64-d features: the first block is enough here
        extractor = InceptionFeatures(params, make_mesh(devices), SAMPLE_BATCH, dims=64)
        placed = {"unet": jax.device_put(unet_params, replicated(extractor.mesh))}
        out.append(sample_features(pipeline, placed, scheduler, 2, 13, extractor, seed=0))
    assert out[0].shape == (13, 64)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=1e-5 * np.abs(out[0]).max())
    assert not np.allclose(out[0][:8], out[0][5:13])  # distinct samples, not one batch repeated
