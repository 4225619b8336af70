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


@flax.struct.dataclass
class StartWeights:
    """Trained weights a fresh state starts from instead of the init (fine-tuning, or continuing a PyTorch run).

    `ema_params` None: the EMA starts as a copy of `params`. `step` continues the step count (the LR schedule,
    the EMA warm-up and the step's randomness) from there; AdamW's moments always start afresh.
    """

    params: Any
    ema_params: Any = None
    step: Any = 0


def _schedule_count(opt_state: optax.OptState, count: jnp.ndarray) -> optax.OptState:
    """The optimizer state with optax's LR-schedule counters at `count` (Adam's own count, for its bias
    correction, stays with its fresh moments at 0, as in a fresh PyTorch AdamW)."""
    def is_schedule(s: Any) -> bool:
        return isinstance(s, optax.ScaleByScheduleState)

    return jax.tree.map(lambda s: optax.ScaleByScheduleState(count=count) if is_schedule(s) else s, opt_state,
                        is_leaf=is_schedule)


def create_train_state(params: Any, optimizer: optax.GradientTransformation, use_ema: bool,
                       fp16: bool, ema_params: Any = None, step: Any = 0) -> TrainState:
    """A fresh state around `params` at optimizer step `step`; the EMA starts as a float32 copy of
    `ema_params`, else of `params` (as `EMAModel` does)."""
    params = jax.tree.map(lambda p: p.astype(jnp.float32), params)
    step = jnp.asarray(step, jnp.int32)
    ema_source = params if ema_params is None else ema_params
    return TrainState(
        step=step,
        params=params,
        opt_state=_schedule_count(optimizer.init(params), step),
        ema_params=jax.tree.map(lambda p: jnp.array(p, jnp.float32, copy=True), ema_source) if use_ema else None,
        ema_step=step,
        loss_scale=jnp.asarray(FP16_INITIAL_LOSS_SCALE if fp16 else 1.0, jnp.float32),
        good_steps=jnp.zeros((), jnp.int32),
        nonfinite_run=jnp.zeros((), jnp.int32),
        nonfinite_total=jnp.zeros((), jnp.int32),
    )


def make_init_fn(config: TrainConfig, model: Any, optimizer: optax.GradientTransformation,
                 key: jax.Array) -> Callable[[StartWeights | None], TrainState]:
    """The run's fresh-state function of an optional `StartWeights`: `model.init_weights(key)` (or the given
    weights) wrapped with the optimizer, EMA and loss scale the config asks for.
    `jax.jit(fn, out_shardings=...)(start)` creates it on the devices; given weights are arguments, not
    constants compiled into the program."""
    fp16 = config.mixed_precision == "fp16"

    def init(start: StartWeights | None = None) -> TrainState:
        if start is None:
            return create_train_state(model.init_weights(key), optimizer, config.use_ema, fp16)
        return create_train_state(start.params, optimizer, config.use_ema, fp16, start.ema_params, start.step)

    return init


def train_state_shapes(config: TrainConfig, model: Any, optimizer: optax.GradientTransformation) -> TrainState:
    """The shapes and dtypes of every leaf of the run's TrainState (no memory, no compute): the one
    place the loop, the exporter and the evaluator get the checkpoint's structure from."""
    return jax.eval_shape(make_init_fn(config, model, optimizer, jax.random.key(0)))
