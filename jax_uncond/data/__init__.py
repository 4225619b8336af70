"""Image data: sources (datasets, image folders, TFDS, built-in, prepared folders), transforms and the Grain loader.

The loader is imported on first use, so that the sources and the prepared format load without Grain: importing
it logs through absl, which configures Python's logging before a command's `setup_logging` can."""

from typing import Any

__all__ = ["TrainLoader", "make_train_loader"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from jax_uncond.data import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
