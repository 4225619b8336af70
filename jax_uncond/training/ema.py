"""Exponential moving average of the weights with diffusers' `EMAModel` semantics, in float32.

`EMAModel(..., use_ema_warmup=True, inv_gamma, power, decay=max_decay)` as the PyTorch script builds
it: its `optimization_step` counts applied updates, and the first update has decay 0 (a copy).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp


def ema_decay(optimization_step: jnp.ndarray, inv_gamma: float, power: float, max_decay: float,
              min_decay: float = 0.0) -> jnp.ndarray:
    """`EMAModel.get_decay(optimization_step)` with warm-up: 0 on the first update, then
    `1 - (1 + step / inv_gamma) ** -power` clipped to [min_decay, max_decay]."""
    step = jnp.maximum(0.0, jnp.asarray(optimization_step, jnp.float32) - 1.0)
    value = 1.0 - (1.0 + step / inv_gamma) ** -power
    value = jnp.clip(jnp.minimum(value, max_decay), min_decay)
    return jnp.where(step <= 0.0, 0.0, value)


def ema_update(ema_params: Any, params: Any, decay: jnp.ndarray) -> Any:
    """`EMAModel.step`: `ema -= (1 - decay) * (ema - param)`, every leaf kept in float32."""
    one_minus = 1.0 - decay

    def update(ema: jnp.ndarray, param: jnp.ndarray) -> jnp.ndarray:
        return ema - one_minus * (ema - param.astype(jnp.float32))

    return jax.tree.map(update, ema_params, params)
