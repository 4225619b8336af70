"""FlaxDDPMPipeline: diffusers' DDPMPipeline in JAX, the whole denoising loop one compiled program.

Reads and writes diffusers `DDPMPipeline` folders (model_index.json, unet/, scheduler/). Sampling runs
`lax.scan` over the scheduler's timesteps inside one `jax.jit`, the batch split over the local devices;
any of the package's schedulers samples (DDPM, DDIM, DPM-Solver, UniPC, Euler, Euler-ancestral), its
state (multistep history, step counter) carried through the scan. The compiled sampler is cached per
(UNet config, scheduler, shape, steps, eta) across pipeline objects, so sampling every few epochs during
training compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from PIL import Image

from jax_uncond.diffusers_format import DIFFUSERS_VERSION
from jax_uncond.models.unet_2d import FlaxUNet2DModel
from jax_uncond.schedulers import FlaxDDIMScheduler
from jax_uncond.schedulers.base import FlaxSchedulerBase, scheduler_classes
from jax_uncond.training.sharding import batch_sharding, make_mesh, on_mesh, replicated

MODEL_INDEX_NAME = "model_index.json"
PIPELINE_CLASSES = ("DDPMPipeline", "DDIMPipeline")
SCHEDULER_CLASSES = {cls.diffusers_class: cls for cls in scheduler_classes()}
"""diffusers scheduler class name -> ours: every scheduler of jax_uncond.schedulers."""
OUTPUT_TYPES = ("pil", "np")

Scheduler = FlaxSchedulerBase


@dataclasses.dataclass
class FlaxImagePipelineOutput:
    """Like diffusers' ImagePipelineOutput: a list of PIL images, or an NHWC float array in [0, 1]."""

    images: list[Image.Image] | np.ndarray


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """NHWC floats in [0, 1] to PIL images, rounded as diffusers does (1 channel: mode "L")."""
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(image.squeeze(-1), mode="L") for image in images]
    return [Image.fromarray(image) for image in images]


def _on_local_devices(tree: Any, sharding: NamedSharding) -> Any:
    """Place `tree` on `sharding` (local devices); a multi-host replicated array contributes its local copy."""

    def local(x: Any) -> Any:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.sharding.is_fully_replicated:
                raise ValueError("sampling needs replicated parameters; got an array sharded across hosts")
            x = x.addressable_data(0)
        return x

    return jax.device_put(jax.tree.map(local, tree), sharding)


class FlaxDDPMPipeline:
    """Unconditional image generation: a FlaxUNet2DModel and a scheduler (DDPM when trained here)."""

    def __init__(self, unet: FlaxUNet2DModel, scheduler: Scheduler):
        self.unet = unet
        self.scheduler = scheduler

    # ---- folders ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, dtype: Any = jnp.float32
    ) -> tuple[FlaxDDPMPipeline, dict]:
        """Load a local diffusers DDPMPipeline (or DDIMPipeline) folder: returns (pipeline, {"unet": params})."""
        path = os.fspath(pretrained_model_name_or_path)
        index_path = os.path.join(path, MODEL_INDEX_NAME)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(f"no {MODEL_INDEX_NAME} in {path!r}: pass a diffusers DDPMPipeline folder")
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        if index.get("_class_name") not in PIPELINE_CLASSES:
            raise ValueError(f"{index_path} describes a {index.get('_class_name')}, not one of {PIPELINE_CLASSES}")
        scheduler_name = (index.get("scheduler") or [None, None])[1]
        if scheduler_name not in SCHEDULER_CLASSES:
            raise ValueError(
                f"{index_path} names scheduler {scheduler_name!r}; supported: {', '.join(SCHEDULER_CLASSES)}"
            )
        scheduler, _ = SCHEDULER_CLASSES[scheduler_name].from_pretrained(path, subfolder="scheduler")
        unet, unet_params = FlaxUNet2DModel.from_pretrained(path, subfolder="unet", dtype=dtype)
        return cls(unet=unet, scheduler=scheduler), {"unet": unet_params}

    def save_pretrained(self, save_directory: str | os.PathLike, params: dict, is_main_process: bool = True) -> None:
        """Write a folder that `diffusers.DiffusionPipeline.from_pretrained` loads as a DDPMPipeline."""
        save_directory = os.fspath(save_directory)
        self.unet.save_pretrained(os.path.join(save_directory, "unet"), params["unet"], is_main_process)
        if not is_main_process:
            return
        self.scheduler.save_pretrained(os.path.join(save_directory, "scheduler"))
        index = {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", self.scheduler.diffusers_class],
            "unet": ["diffusers", "UNet2DModel"],
        }
        with open(os.path.join(save_directory, MODEL_INDEX_NAME), "w", encoding="utf-8") as f:
            f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")

    # ---- sampling -----------------------------------------------------------------------------
    def __call__(
        self,
        params: dict,
        rng: jax.Array,
        batch_size: int = 1,
        num_inference_steps: int = 1000,
        scheduler: Scheduler | None = None,
        eta: float = 0.0,
        latents: jax.Array | np.ndarray | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> FlaxImagePipelineOutput | tuple:
        """Generate `batch_size` images with `num_inference_steps` denoising steps.

        `scheduler` replaces the pipeline's for this call, e.g. `FlaxDPMSolverMultistepScheduler.from_config(
        pipeline.scheduler.config)` with ~20 steps (docs/sampling.md); `eta` (DDIM only) 0 is deterministic,
        1 DDPM-like. `latents` (NCHW, unit variance) replaces the initial noise drawn from `rng`; both are
        scaled by the scheduler's `init_noise_sigma` (Euler: sigma_max), as diffusers' pipelines do.
        """
        scheduler = self.scheduler if scheduler is None else scheduler
        if not isinstance(scheduler, tuple(SCHEDULER_CLASSES.values())):
            raise ValueError(f"scheduler must be one of {', '.join(c.__name__ for c in SCHEDULER_CLASSES.values())}; "
                             f"got {type(scheduler).__name__}")  # fmt: skip
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}")
        if eta != 0 and not isinstance(scheduler, FlaxDDIMScheduler):
            raise ValueError(f"eta={eta} applies to DDIM only; pass a FlaxDDIMScheduler or leave eta at 0")
        shape = self._latent_shape(batch_size)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (batch_size, C, H, W); got {tuple(latents.shape)}")

        devices = tuple(jax.local_devices())
        devices = devices if batch_size % len(devices) == 0 else devices[:1]
        state = _scheduler_state(scheduler, num_inference_steps, shape)
        sampler, mesh = _build_sampler(self.unet, scheduler, shape, float(eta), latents is not None, devices)
        inputs = _on_local_devices((params["unet"], state, rng), replicated(mesh))
        if latents is not None:
            latents = latents.astype(jnp.float32) if isinstance(latents, jax.Array) else np.asarray(latents, np.float32)
            inputs += (jax.device_put(latents, batch_sharding(mesh)),)
        images = np.asarray(jax.device_get(sampler(*inputs)))
        if output_type == "pil":
            images = numpy_to_pil(images)
        return FlaxImagePipelineOutput(images=images) if return_dict else (images,)

    def sample_on_mesh(self, params: dict, rng: jax.Array, batch_size: int, num_inference_steps: int,
                       scheduler: Scheduler, mesh: Mesh) -> jax.Array:
        """`batch_size` images over every device of `mesh` (of every process): a global NHWC jax.Array in [0, 1]
        split over the batch and never gathered (FID sampling). `params` live on `mesh` (replicated); the jitted
        sampler places the host-side scheduler state and `rng` itself (also across processes)."""
        sampler, state = self.mesh_sampler(batch_size, num_inference_steps, scheduler, mesh)
        return sampler(params["unet"], state, rng)

    def mesh_sampler(self, batch_size: int, num_inference_steps: int, scheduler: Scheduler,
                     mesh: Mesh) -> tuple[Any, Any]:
        """The jitted sampler `sample_on_mesh` calls, `(unet params, scheduler state, rng) -> images`, and the
        scheduler state it takes (also what `jax_uncond.plan` compiles for a TPU slice)."""
        shape = self._latent_shape(batch_size)
        sampler, _ = _build_sampler(self.unet, scheduler, shape, 0.0, False, tuple(mesh.devices.flat))
        return sampler, _scheduler_state(scheduler, num_inference_steps, shape)

    def _latent_shape(self, batch_size: int) -> tuple[int, int, int, int]:
        size = self.unet.sample_size
        if size is None:
            raise ValueError("unet.sample_size is None: set it in the UNet config to sample images")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (batch_size, self.unet.in_channels, height, width)


@functools.lru_cache(maxsize=16)
def _scheduler_state(scheduler: Scheduler, num_inference_steps: int, shape: tuple) -> Any:
    """The scheduler state with its inference timesteps set, for samples of `shape` (a multistep solver's
    history); host-built once per scheduler, count and shape."""
    return scheduler.set_timesteps(scheduler.create_state(), num_inference_steps, shape)


def _split_like_latents(state: Any, shape: tuple, mesh: Mesh) -> Any:
    """The scheduler state with its latent-shaped leaves (a multistep history: (order, *shape)) split over
    the batch as the latents are, so the scan carries them without gathering."""

    def constrain(leaf: jax.Array) -> jax.Array:
        lead = leaf.ndim - len(shape)
        if lead >= 0 and leaf.shape[lead:] == shape:
            return jax.lax.with_sharding_constraint(leaf, batch_sharding(mesh, axis=lead))
        return leaf

    return jax.tree.map(constrain, state)


@functools.lru_cache(maxsize=16)
def _build_sampler(
    unet: FlaxUNet2DModel, scheduler: Scheduler, shape: tuple, eta: float, given_latents: bool, mesh_devices: tuple
) -> tuple[Any, Mesh]:
    """The jitted sampler (and its mesh) for these static choices, shared by pipelines with equal UNets.

    unet_params, scheduler state and rng are replicated; latents and images are split over the batch.
    Random numbers do not depend on the sharding (jax_threefry_partitionable), so the device count
    does not change the images. The UNet's attention follows the mesh's devices (`on_mesh`).
    """
    mesh = make_mesh(mesh_devices)
    unet = on_mesh(unet, mesh)
    batch = batch_sharding(mesh)
    step_kwargs = {"eta": eta} if isinstance(scheduler, FlaxDDIMScheduler) else {}

    def sample(unet_params, state, rng, latents=None):
        noise_key, step_key = jax.random.split(rng)
        if latents is None:
            latents = jax.random.normal(noise_key, shape, jnp.float32)
        latents = jax.lax.with_sharding_constraint(latents * state.init_noise_sigma, batch)

        def denoise(carry, t_and_key):
            x, state = carry
            t, key = t_and_key
            model_input = scheduler.scale_model_input(state, x, t)
            model_output = unet.apply({"params": unet_params}, model_input, t).sample
            out = scheduler.step(state, model_output, t, x, key=key, **step_kwargs)
            return (out.prev_sample, out.state), None

        keys = jax.random.split(step_key, state.timesteps.shape[0])
        carry = (latents, _split_like_latents(state, shape, mesh))
        (x, _), _ = jax.lax.scan(denoise, carry, (state.timesteps, keys))
        return jnp.transpose(jnp.clip(x / 2 + 0.5, 0, 1), (0, 2, 3, 1))

    shardings = (replicated(mesh),) * 3 + ((batch,) if given_latents else ())
    return jax.jit(sample, in_shardings=shardings, out_shardings=batch), mesh
