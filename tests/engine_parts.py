"""Shared parts for the engine tests: a tiny config, the tiny UNet, in-memory data and a recording
RunOutputs stand-in, so the loop runs without datasets, trackers or pipelines.

Every batch carries the step's NaN test hook (all False unless asked), so runs with and without
injected NaNs share one compiled program.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jax_uncond.training import sharding
from jax_uncond.training.config import parse_args
from jax_uncond.training.step import INJECT_NAN_KEY

TINY_UNET = {
    "sample_size": 8,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": (32, 64),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "norm_num_groups": 8,
}
NUM_IMAGES = 64


def tiny_config(output_dir: str, *flags: str, **overrides: Any) -> Any:
    """A TrainConfig for an 8x8 run on the tiny UNet, metrics logged every step; `flags` as on the command line."""
    argv = ["--output_dir", str(output_dir), "--resolution", "8", "--global_batch_size", "8",
            "--max_train_steps", "6", "--checkpointing_steps", "2", "--lr_warmup_steps", "2",
            "--learning_rate", "1e-3", "--ddpm_num_steps", "100", "--use_ema", "--logging_steps", "1", *flags]
    config = parse_args(argv)
    return dataclasses.replace(config, unet=dict(TINY_UNET), **overrides)


def build_parts(config: Any) -> tuple[Any, Any]:
    from jax_uncond.run.loop import build_model, build_scheduler

    return build_model(config), build_scheduler(config)


class ArrayLoader:
    """The data loader's interface over fixed random images: epoch e's order is a permutation
    seeded by (seed, e); the position is the number of global batches consumed."""

    skipped_files = 0

    def __init__(self, mesh: Any, batch_size: int, seed: int = 0, num_examples: int = NUM_IMAGES,
                 resolution: int = 8, nan_at: tuple[int, ...] = ()):
        self.mesh = mesh
        self.nan_at = frozenset(nan_at)
        self.batch_size = batch_size
        self.seed = seed
        self.num_examples = num_examples
        self.steps_per_epoch = num_examples // batch_size
        rng = np.random.default_rng(1234)
        self.images = rng.uniform(-1, 1, (num_examples, 3, resolution, resolution)).astype(np.float32)
        self.position = 0

    def get_state(self) -> dict[str, Any]:
        return {"position": self.position}

    def set_state(self, state: dict[str, Any]) -> None:
        self.position = int(state["position"])

    def batch(self, index: int) -> np.ndarray:
        epoch, i = divmod(index, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        return self.images[order[i * self.batch_size:(i + 1) * self.batch_size]]

    def __iter__(self):
        while True:
            rows = self.batch(self.position)
            flags = np.full((len(rows),), self.position in self.nan_at)
            self.position += 1
            yield {"images": self._place(rows), INJECT_NAN_KEY: self._place(flags)}

    def _place(self, rows: np.ndarray) -> jax.Array:
        return jax.make_array_from_callback(rows.shape, sharding.batch_sharding(self.mesh), lambda idx: rows[idx])


class RecordingOutputs:
    """RunOutputs' interface, remembering what the loop reported instead of writing it."""

    def __init__(self):
        self.logs: dict[int, dict[str, float]] = {}
        self.epochs: list[tuple[int, bool]] = []
        self.summary: dict[str, Any] | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.logs.setdefault(step, {}).update(metrics)

    def epoch_end(self, epoch: int, params: Any, last: bool, step: int | None = None) -> None:
        self.epochs.append((epoch, last))

    def close(self, summary: dict[str, Any]) -> None:
        self.summary = dict(summary)

    def losses(self) -> list[float]:
        return [self.logs[s]["loss"] for s in sorted(self.logs) if "loss" in self.logs[s]]


def host_state(state: Any) -> dict[str, np.ndarray]:
    """Every leaf of a TrainState as numpy, keyed by its path (for exact comparisons)."""
    def fetch(leaf: Any) -> np.ndarray:  # across processes the state is replicated: any one shard is the whole
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            return np.asarray(leaf.addressable_data(0))
        return np.asarray(leaf)

    leaves = jax.tree_util.tree_leaves_with_path(state)
    return {jax.tree_util.keystr(path): fetch(leaf) for path, leaf in leaves}


GAUGE_KEYS = ("['to_k']['bias']",)
"""Attention key biases: softmax ignores them, so their gradient is zero in exact arithmetic and only
rounding noise reaches Adam, which turns it into updates of up to ~lr x 1e-2 that differ with the
summation order (device count, micro-batches). They are held to 1e-4 instead of 1e-5."""


def assert_state_close(actual: dict[str, np.ndarray], desired: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    """Every leaf within `rtol` of the desired one, relative to the leaf's scale (gauge leaves: 1e-4)."""
    assert actual.keys() == desired.keys()
    for key in desired:
        tol = 1e-4 if any(g in key for g in GAUGE_KEYS) else rtol
        scale = max(1.0, float(np.abs(desired[key]).max()))
        np.testing.assert_allclose(actual[key], desired[key], rtol=tol, atol=tol * scale, err_msg=key)
