"""The train state: everything a checkpoint holds besides the data position and the config."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jax_uncond.training.config import TrainConfig

FP16_INITIAL_LOSS_SCALE = 2.0**16
"""PyTorch's `GradScaler` default `init_scale`."""


@flax.struct.dataclass
class TrainState:
    """Parameters (float32), optimizer state, EMA (float32) and the counters of a run.

    `step` counts optimizer steps attempted (it seeds the step's randomness and equals the number of
    global batches consumed); `ema_step` counts updates applied (diffusers' `optimization_step`).
    `loss_scale`/`good_steps` drive fp16 dynamic loss scaling (scale 1 otherwise);
    `nonfinite_run` counts consecutive skipped steps and `nonfinite_total` all of them.
    """

    step: jnp.ndarray
    params: Any
    opt_state: optax.OptState
    ema_params: Any
    ema_step: jnp.ndarray
    loss_scale: jnp.ndarray
    good_steps: jnp.ndarray
    nonfinite_run: jnp.ndarray
    nonfinite_total: jnp.ndarray


def create_train_state(params: Any, optimizer: optax.GradientTransformation, use_ema: bool,
                       fp16: bool) -> TrainState:
    """A fresh state around `params`; EMA starts as a float32 copy (as `EMAModel` does)."""
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if use_ema else None,
        ema_step=jnp.zeros((), jnp.int32),
        loss_scale=jnp.asarray(FP16_INITIAL_LOSS_SCALE if fp16 else 1.0, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )


def make_init_fn(config: TrainConfig, model: Any, optimizer: optax.GradientTransformation,
                 key: jax.Array) -> Callable[[], TrainState]:
    """The run's fresh-state function: `model.init_weights(key)` wrapped with the optimizer, EMA and
    loss scale the config asks for. `jax.jit(fn, out_shardings=...)()` creates it on the devices."""
    fp16 = config.mixed_precision == "fp16"
    return lambda: create_train_state(model.init_weights(key), optimizer, config.use_ema, fp16)


def train_state_shapes(config: TrainConfig, model: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """The shapes and dtypes of every leaf of the run's TrainState (no memory, no compute): the one
    place the loop, the exporter and the evaluator get the checkpoint's structure from."""
    return jax.eval_shape(make_init_fn(config, model, optimizer, jax.random.key(0)))
