"""Learning-rate schedules and the optimizer: diffusers' schedules and the PyTorch script's AdamW.

Every schedule gives, at optimizer step `count`, the learning rate that
`diffusers.optimization.get_scheduler(name, ...)` gives after `count` calls of `scheduler.step()`.
Steps are optimizer steps: gradient accumulation never advances the schedule (see step.py).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

CLIP_GRAD_NORM = 1.0
"""`accelerator.clip_grad_norm_(model.parameters(), 1.0)` in the PyTorch script."""
POLYNOMIAL_LR_END = 1e-7
"""diffusers' `get_polynomial_decay_schedule_with_warmup` default `lr_end` (power 1.0)."""


def lr_schedule(name: str, learning_rate: float, num_warmup_steps: int, num_training_steps: int) -> optax.Schedule:
    """diffusers' `get_scheduler(name, num_warmup_steps, num_training_steps)` times `learning_rate`, in JAX."""
    warmup = float(num_warmup_steps)
    total = float(num_training_steps)

    def warmup_factor(step: jnp.ndarray) -> jnp.ndarray:
        return step / max(1.0, warmup)

    def progress(step: jnp.ndarray) -> jnp.ndarray:
        return (step - warmup) / max(1.0, total - warmup)

    if name == "constant":
        factor = lambda step: jnp.ones_like(step)  # noqa: E731 - diffusers' constant ignores warm-up
    elif name == "constant_with_warmup":
        factor = lambda step: jnp.where(step < warmup, warmup_factor(step), 1.0)  # noqa: E731
    elif name == "linear":
        def factor(step):
            decay = jnp.maximum(0.0, (total - step) / max(1.0, total - warmup))
            return jnp.where(step < warmup, warmup_factor(step), decay)
    elif name == "cosine":
        def factor(step):
            decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * 0.5 * 2.0 * progress(step))))
            return jnp.where(step < warmup, warmup_factor(step), decay)
    elif name == "cosine_with_restarts":
        def factor(step):
            p = progress(step)
            decay = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * jnp.mod(p, 1.0))))
            return jnp.where(step < warmup, warmup_factor(step), jnp.where(p >= 1.0, 0.0, decay))
    elif name == "polynomial":
        if not learning_rate > POLYNOMIAL_LR_END:
            raise ValueError(f"--learning_rate {learning_rate} must exceed the polynomial schedule's end value "
                             f"{POLYNOMIAL_LR_END}")
        lr_range = learning_rate - POLYNOMIAL_LR_END

        def factor(step):
            remaining = 1.0 - (step - warmup) / max(1.0, total - warmup)
            decay = (lr_range * remaining + POLYNOMIAL_LR_END) / learning_rate
            after = jnp.where(step > total, POLYNOMIAL_LR_END / learning_rate, decay)
            return jnp.where(step < warmup, warmup_factor(step), after)
    else:
        raise ValueError(f"unknown --lr_scheduler {name!r}")

    def schedule(count: Any) -> jnp.ndarray:
        step = jnp.asarray(count, jnp.float32)
        return learning_rate * factor(step)

    return schedule


def make_optimizer(config: Any, num_training_steps: int, model: Any) -> tuple[optax.GradientTransformation,
                                                                            optax.Schedule]:
    """Global-norm clipping at 1.0, then AdamW with the config's betas, epsilon and weight decay.

    The gradients reaching it are already the mean over the whole global batch (the compiler
    inserts the cross-device reduction), so the clip sees the same norm as PyTorch's does. Tensors
    `model.trainable_mask` marks frozen (diffusers' `requires_grad=False` Fourier weights) are never
    updated, weight decay included, as PyTorch's AdamW skips parameters without gradients.
    """
    schedule = lr_schedule(config.lr_scheduler, config.learning_rate, config.lr_warmup_steps, num_training_steps)
    adamw = optax.chain(
        optax.clip_by_global_norm(CLIP_GRAD_NORM),
        optax.adamw(schedule, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_epsilon,
                    weight_decay=config.adam_weight_decay),
    )

    def labels(params: Any) -> Any:
        return jax.tree.map(lambda trainable: "train" if trainable else "frozen", model.trainable_mask(params))

    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule
