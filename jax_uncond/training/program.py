"""What a run compiles, built from its config: the train state's init, shapes and shardings, and the step.

The loop (`run/loop.py`) runs it on the devices at hand; the plan (`jax_uncond.plan`) compiles the very same
program for a TPU slice it does not have. Both get it from `train_program`, so what the plan measures is
what the run would execute.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from jax_uncond.training import sharding
from jax_uncond.training.config import TrainConfig
from jax_uncond.training.optim import make_optimizer
from jax_uncond.training.state import StartWeights, TrainState, make_init_fn, train_state_shapes
from jax_uncond.training.step import StepConfig, StepFn, make_train_step

IMAGE_CHANNELS = 3
"""The loader's images are RGB: data/transforms.py maps every source's channels to three."""


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """The run's state and step over `mesh`: `init` makes a fresh state from optional start weights, `step` is
    the pure train step, `schedule` the learning rate by optimizer step; the state is split as `shard_state`."""

    mesh: Mesh
    init: Callable[[StartWeights | None], TrainState]
    step: StepFn
    schedule: optax.Schedule
    state_shapes: TrainState
    shard_state: str

    @property
    def state_sharding(self) -> TrainState:
        return sharding.state_shardings(self.mesh, self.state_shapes, self.shard_state)

    def abstract_state(self) -> TrainState:
        """The state's shapes carrying their shardings: what a checkpoint restores into, and a plan compiles for."""
        return sharding.abstract_state(self.state_shapes, self.mesh, self.shard_state)

    def fresh_state(self, start: StartWeights | None = None) -> TrainState:
        """A new state (from `start`'s weights when given), created where it lives on the mesh."""
        return jax.jit(self.init, out_shardings=self.state_sharding)(start)


def train_program(config: TrainConfig, model: Any, scheduler: Any, mesh: Mesh, num_training_steps: int) -> TrainProgram:
    """The run's program: AdamW with the LR schedule over `num_training_steps`, the state split as
    `--shard_state` says, and the step keyed by `--seed` (initialisation and step keys are its two halves)."""
    optimizer, schedule = make_optimizer(config, num_training_steps, model)
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    shapes = train_state_shapes(config, model, optimizer)
    step = make_train_step(model, scheduler, scheduler.create_state(), optimizer, schedule,
                           StepConfig.from_config(config), step_key, mesh)
    return TrainProgram(mesh=mesh, init=make_init_fn(config, model, optimizer, init_key), step=step, schedule=schedule,
                        state_shapes=shapes, shard_state=config.shard_state)


def batch_shapes(config: TrainConfig, batch_size: int, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The loader's global batch for one optimizer step (`batch_size` images per micro-batch, times the
    accumulation steps), split over the mesh: what the plan compiles the step for."""
    shape = (batch_size * config.gradient_accumulation_steps, IMAGE_CHANNELS, config.resolution, config.resolution)
    return {"images": jax.ShapeDtypeStruct(shape, np.float32, sharding=sharding.batch_sharding(mesh))}
