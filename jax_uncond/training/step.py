"""The train step: one pure function of (state, batch), compiled once over the whole mesh.

Noise, timesteps and dropout come from `fold_in(key, state.step)` drawn at the global batch shape,
so a run does not depend on how many devices or hosts share it. Gradient accumulation splits the
global batch into micro-batches inside the step (a `lax.scan`), so one call is one optimizer step
and the LR schedule, EMA and checkpoints all count optimizer steps.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jax_uncond.training import sharding
from jax_uncond.training.ema import ema_decay, ema_update
from jax_uncond.training.state import TrainState

FP16_GROWTH_INTERVAL = 2000
"""PyTorch's `GradScaler` defaults: double the scale after this many finite steps, halve on overflow."""

INJECT_NAN_KEY = "inject_nan"
"""Test hook: a batch may carry a (batch,) bool array under this key; any True makes the loss NaN,
exercising the skip-and-count path in the very program that trains."""

StepFn = Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the step needs to know besides the model, scheduler and optimizer."""

    prediction_type: str = "epsilon"
    num_train_timesteps: int = 1000
    snr_gamma: float | None = None
    accumulation_steps: int = 1
    fp16: bool = False
    use_ema: bool = False
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999

    @classmethod
    def from_config(cls, config: Any) -> "StepConfig":
        return cls(prediction_type=config.prediction_type, num_train_timesteps=config.ddpm_num_steps,
                   snr_gamma=config.snr_gamma, accumulation_steps=config.gradient_accumulation_steps,
                   fp16=config.mixed_precision == "fp16", use_ema=config.use_ema,
                   ema_inv_gamma=config.ema_inv_gamma, ema_power=config.ema_power,
                   ema_max_decay=config.ema_max_decay)


def loss_weights(prediction_type: str, snr: jnp.ndarray, snr_gamma: float | None) -> jnp.ndarray:
    """Per-example loss weights: the PyTorch script's SNR weighting for `sample`, and min-SNR-gamma
    (diffusers' train_text_to_image.py) when `snr_gamma` is set."""
    if snr_gamma is None:
        return snr if prediction_type == "sample" else jnp.ones_like(snr)
    clipped = jnp.minimum(snr, snr_gamma)
    if prediction_type == "epsilon":
        return clipped / snr
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped


def diffusion_loss(model: Any, params: Any, scheduler: Any, scheduler_state: Any, images: jnp.ndarray,
                   noise: jnp.ndarray, timesteps: jnp.ndarray, dropout_key: jax.Array,
                   step_config: StepConfig) -> jnp.ndarray:
    """Mean weighted squared error of the UNet's prediction, in float32."""
    noisy = scheduler.add_noise(scheduler_state, images, noise, timesteps)
    pred = model.apply({"params": params}, noisy, timesteps, train=True, rngs={"dropout": dropout_key}).sample
    pred = pred.astype(jnp.float32)
    if step_config.prediction_type == "epsilon":
        target = noise
    elif step_config.prediction_type == "sample":
        target = images
    elif step_config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(scheduler_state, images, noise, timesteps)
    else:
        raise ValueError(f"unknown --prediction_type {step_config.prediction_type!r}")
    alphas_cumprod = scheduler_state.common.alphas_cumprod[timesteps].astype(jnp.float32)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    weights = loss_weights(step_config.prediction_type, snr, step_config.snr_gamma)
    per_example = jnp.mean(jnp.square(pred - target.astype(jnp.float32)), axis=tuple(range(1, pred.ndim)))
    return jnp.mean(weights * per_example)


def _tree_select(pred: jnp.ndarray, on_true: Any, on_false: Any) -> Any:
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(model: Any, scheduler: Any, scheduler_state: Any, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, step_config: StepConfig, seed_key: jax.Array, mesh: Mesh) -> StepFn:
    """The pure step `(state, batch) -> (state, metrics)`; compile it with `compile_train_step`.

    The UNet runs as `sharding.on_mesh` makes it for `mesh` (its attention chosen for the mesh's devices).
    Parameters split over the mesh (`--shard_state full`) are gathered whole before the forward pass and the
    gradients summed whole, so the compiler moves weights and gradients, never activations; each device
    then updates its slice of whatever is split.
    """
    k = step_config.accumulation_steps
    model = sharding.on_mesh(model, mesh)
    whole = sharding.replicated(mesh)
    micro_sharding = NamedSharding(mesh, P(None, sharding.DATA_AXIS))

    def split_micro(x: jnp.ndarray) -> jnp.ndarray:
        # Micro-batch j holds rows j, j+k, j+2k, ...: each device keeps its own rows, so no data moves.
        x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
        return jax.lax.with_sharding_constraint(jnp.swapaxes(x, 0, 1), micro_sharding)

    def loss_and_grads(params: Any, images, noise, timesteps, dropout_key, scale):
        def scaled_loss(p, x, n, t, key):
            loss = diffusion_loss(model, p, scheduler, scheduler_state, x, n, t, key, step_config)
            return loss * scale, loss

        grad_fn = jax.grad(scaled_loss, has_aux=True)
        if k == 1:
            grads, loss = grad_fn(params, images, noise, timesteps, dropout_key)
        else:
            def micro_step(carry, xs):
                grads_sum, loss_sum = carry
                j, x, n, t = xs
                g, loss = grad_fn(params, x, n, t, jax.random.fold_in(dropout_key, j))
                return (jax.tree.map(jnp.add, grads_sum, g), loss_sum + loss), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            xs = (jnp.arange(k), split_micro(images), split_micro(noise), split_micro(timesteps))
            (grads, loss), _ = jax.lax.scan(micro_step, (zeros, jnp.zeros((), jnp.float32)), xs)
            grads = jax.tree.map(lambda g: g / k, grads)
            loss = loss / k
        grads = jax.tree.map(lambda g: g.astype(jnp.float32) / scale, grads)
        return loss, grads

    def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
        images = batch["images"].astype(jnp.float32)
        key = jax.random.fold_in(seed_key, state.step)
        noise_key, time_key, dropout_key = jax.random.split(key, 3)
        noise = jax.random.normal(noise_key, images.shape, jnp.float32)
        timesteps = jax.random.randint(time_key, (images.shape[0],), 0, step_config.num_train_timesteps)

        params = jax.tree.map(lambda p: jax.lax.with_sharding_constraint(p, whole), state.params)
        loss, grads = loss_and_grads(params, images, noise, timesteps, dropout_key, state.loss_scale)
        # The backward pass stays data parallel whatever is split: gradients whole on every device (the one
        # all-reduce). Left free, the split moments' layout propagated into the backward convolutions, which
        # then passed weights between devices and held 3.3 GiB more temporaries on a v5e (docs/plan.md).
        grads = jax.tree.map(lambda g: jax.lax.with_sharding_constraint(g, whole), grads)
        if INJECT_NAN_KEY in batch:  # test hook: a batch flagged so makes the step non-finite
            loss = jnp.where(jnp.any(batch[INJECT_NAN_KEY]), jnp.nan, loss)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_step = state.ema_step + 1
        ema_params, decay = state.ema_params, None
        if step_config.use_ema:
            decay = ema_decay(ema_step, step_config.ema_inv_gamma, step_config.ema_power, step_config.ema_max_decay)
            ema_params = _tree_select(finite, ema_update(state.ema_params, params, decay), state.ema_params)

        loss_scale, good_steps = state.loss_scale, state.good_steps
        if step_config.fp16:
            grow = finite & (good_steps + 1 >= FP16_GROWTH_INTERVAL)
            loss_scale = jnp.where(finite, jnp.where(grow, loss_scale * 2.0, loss_scale), loss_scale * 0.5)
            good_steps = jnp.where(finite & ~grow, good_steps + 1, 0)

        nonfinite_run = jnp.where(finite, 0, state.nonfinite_run + 1)
        new_state = state.replace(
            step=state.step + 1,
            params=_tree_select(finite, params, state.params),
            opt_state=_tree_select(finite, opt_state, state.opt_state),
            ema_params=ema_params,
            ema_step=jnp.where(finite, ema_step, state.ema_step),
            loss_scale=loss_scale,
            good_steps=good_steps,
            nonfinite_run=nonfinite_run,
            nonfinite_total=state.nonfinite_total + jnp.where(finite, 0, 1),
        )
        metrics = {
            "loss": loss,
            "lr": schedule(state.ema_step),
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_state.params),
            "update_norm": jnp.where(finite, optax.tree.norm(updates), 0.0),
            "loss_scale": state.loss_scale,
            "nonfinite_run": nonfinite_run,
            "nonfinite_total": new_state.nonfinite_total,
        }
        if decay is not None:
            metrics["ema_decay"] = decay
        return new_state, metrics

    return train_step


def jit_train_step(train_step: StepFn, state: TrainState, batch: dict[str, jax.Array], mesh: Mesh) -> Any:
    """The step under `jax.jit`: the state donated (updated in place) and kept where it lives (each leaf's
    own sharding: `sharding.state_shardings` placed it), the batch split over the mesh."""
    state_sharding = jax.tree.map(lambda leaf: leaf.sharding, state)
    batch_shardings = jax.tree.map(lambda _: sharding.batch_sharding(mesh), batch)
    return jax.jit(train_step, donate_argnums=0, in_shardings=(state_sharding, batch_shardings),
                   out_shardings=(state_sharding, sharding.replicated(mesh)))


def compile_train_step(train_step: StepFn, state: TrainState, batch: dict[str, jax.Array],
                       mesh: Mesh) -> tuple[Any, float, jax.stages.Lowered]:
    """Compile the step ahead of time for these shapes, state donated; returns the executable, the
    seconds compilation took (from the persistent cache when it has the program) and the lowered
    program (what `metrics.step_flops` counts)."""
    start = time.perf_counter()
    lowered = jit_train_step(train_step, state, batch, mesh).lower(state, batch)
    compiled = lowered.compile()
    return compiled, time.perf_counter() - start, lowered
