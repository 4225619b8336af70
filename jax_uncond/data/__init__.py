"""Image data: sources (datasets, image folders, TFDS, built-in), transforms and the Grain loader."""

from jax_uncond.data.loader import TrainLoader, make_train_loader

__all__ = ["TrainLoader", "make_train_loader"]
