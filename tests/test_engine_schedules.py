"""LR schedules and EMA decay against diffusers' own code (torch CPU), value by value."""

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel

import jax
import jax.numpy as jnp

from jax_uncond.training.config import LR_SCHEDULERS
from jax_uncond.training.ema import ema_decay, ema_update
from jax_uncond.training.optim import lr_schedule


def diffusers_lrs(name, lr, warmup, total, steps):
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total)
    values = []
    for _ in range(steps):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return np.asarray(values)


@pytest.mark.parametrize("name", LR_SCHEDULERS)
@pytest.mark.parametrize("warmup", [0, 1, 37])
def test_lr_schedule_matches_diffusers(name, warmup):
    lr, total = 3e-4, 250
    expected = diffusers_lrs(name, lr, warmup, total, total + 20)  # past the end too
    schedule = jax.jit(jax.vmap(lr_schedule(name, lr, warmup, total)))
    got = np.asarray(schedule(jnp.arange(total + 20)))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=lr * 1e-6)


def test_polynomial_rejects_lr_below_its_end():
    with pytest.raises(ValueError, match="learning_rate"):
        lr_schedule("polynomial", 1e-8, 0, 10)


@pytest.mark.parametrize("inv_gamma,power,max_decay", [(1.0, 0.75, 0.9999), (2.0, 2 / 3, 0.999)])
def test_ema_decay_matches_emamodel(inv_gamma, power, max_decay):
    ema = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=max_decay, use_ema_warmup=True,
                   inv_gamma=inv_gamma, power=power)
    steps = np.arange(0, 10001)
    expected = np.asarray([ema.get_decay(int(s)) for s in steps])
    got = np.asarray(jax.jit(lambda s: ema_decay(s, inv_gamma, power, max_decay))(jnp.asarray(steps)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert got[0] == 0.0 and got[1] == 0.0  # the first update (optimization_step 1) copies


def test_ema_update_matches_emamodel_step():
    rng = np.random.default_rng(0)
    start = rng.standard_normal((4, 3)).astype(np.float32)
    param = torch.nn.Parameter(torch.from_numpy(start.copy()))
    ema = EMAModel([param], decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    ours = jnp.asarray(start)
    for i in range(1, 30):
        new = rng.standard_normal((4, 3)).astype(np.float32)
        with torch.no_grad():
            param.copy_(torch.from_numpy(new))
        ema.step([param])
        ours = ema_update(ours, jnp.asarray(new), ema_decay(i, 1.0, 0.75, 0.9999))
        np.testing.assert_allclose(np.asarray(ours), ema.shadow_params[0].numpy(), rtol=1e-6, atol=1e-6)
