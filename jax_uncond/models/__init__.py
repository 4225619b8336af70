"""diffusers' UNet2DModel in Flax, and its PyTorch weight exchange."""

from jax_uncond.models.unet_2d import FlaxUNet2DModel, FlaxUNet2DOutput

__all__ = ["FlaxUNet2DModel", "FlaxUNet2DOutput"]
