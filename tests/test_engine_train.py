"""The training loop in-process on 8 CPU devices: device-count independence, restore across device
counts, gradient accumulation, the LR schedule under accumulation, non-finite steps."""

import dataclasses
import math

import jax
import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler

from engine_parts import ArrayLoader, RecordingOutputs, assert_state_close, build_parts, host_state, tiny_config
from jax_uncond.run import checkpoint as ckpt
from jax_uncond.run import metrics
from jax_uncond.errors import RunError
from jax_uncond.run.loop import NonFiniteError, train
from jax_uncond.training.optim import make_optimizer
from jax_uncond.training.state import train_state_shapes
from jax_uncond.training import sharding
from jax_uncond.training.sharding import make_mesh


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    metrics.enable_compilation_cache(str(tmp_path_factory.mktemp("xla_cache")))


def run(config, devices, nan_at=()):
    """Train `config` on the first `devices` devices; returns (final state, what was logged)."""
    mesh = make_mesh(jax.devices()[:devices])
    model, scheduler = build_parts(config)
    k = config.gradient_accumulation_steps
    loader = ArrayLoader(mesh, config.global_batch_size * k, seed=config.seed, nan_at=nan_at)
    outputs = RecordingOutputs()
    state = train(config, model, scheduler, mesh, loader, outputs, config.global_batch_size,
                  ckpt.resolve_resume(config.resume_from_checkpoint, config.output_dir))
    return host_state(state), outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 6-step run (EMA on, checkpoints every 2 steps, a NaN injected at step 3) on 1 and 8 devices."""
    out = {}
    for devices in (1, 8):
        config = tiny_config(tmp_path_factory.mktemp(f"run{devices}"))
        out[devices] = (config, *run(config, devices, nan_at=(2,)))
    return out


def test_one_device_equals_eight(runs):
    (_, state1, out1), (_, state8, out8) = runs[1], runs[8]
    losses = out8.losses()
    assert len(losses) == 6 and math.isnan(losses[2]) and all(math.isfinite(x) for i, x in enumerate(losses) if i != 2)
    np.testing.assert_allclose(out1.losses(), losses, rtol=1e-5)
    assert_state_close(state1, state8)
    assert int(state8[".step"]) == 6 and int(state8[".ema_step"]) == 5
    assert int(state8[".nonfinite_total"]) == 1 and int(state8[".nonfinite_run"]) == 0
    assert out8.logs[3]["nonfinite_total"] == 1 and out8.logs[3]["update_norm"] == 0.0
    assert out8.epochs[-1] == (0, True) and out8.summary["step"] == 6 and out8.summary["nonfinite_steps"] == 1


@pytest.mark.parametrize("saved_on,restored_on", [(8, 1), (1, 8)])
def test_restore_onto_other_device_count_continues_identically(runs, tmp_path, saved_on, restored_on):
    config, final, _ = runs[saved_on]
    checkpoint = ckpt.step_path(ckpt.checkpoints_dir(config.output_dir), 2)
    resumed = dataclasses.replace(config, output_dir=str(tmp_path), resume_from_checkpoint=checkpoint)
    state, outputs = run(resumed, restored_on, nan_at=(2,))
    assert sorted(outputs.logs) == [3, 4, 5, 6]
    assert_state_close(state, final)


def test_nonfinite_steps_in_a_row_stop_the_run_and_keep_the_last_good_checkpoint(runs, tmp_path):
    """NaN at step index 1 is skipped and counted; indices 3, 4, 5 in a row (limit 3) stop the run,
    and the checkpoints still hold the last good weights."""
    config = dataclasses.replace(runs[8][0], output_dir=str(tmp_path), max_nonfinite_steps=3)
    with pytest.raises(NonFiniteError, match="3 consecutive steps") as stopped:
        run(config, 8, nan_at=(1, 3, 4, 5))
    assert isinstance(stopped.value, RunError)  # train_flax.py: one line, exit code 1
    checkpoints = ckpt.Checkpoints(ckpt.checkpoints_dir(config.output_dir), 2, read_only=True)
    assert checkpoints.all_steps() == [2, 4, 6]
    mesh = make_mesh(jax.devices()[:8])
    model, _ = build_parts(config)
    optimizer, _ = make_optimizer(config, 6, model)
    shapes = train_state_shapes(config, model, optimizer)
    restored = {s: host_state(checkpoints.restore(s, sharding.abstract_state(shapes, mesh))[0]) for s in (2, 4, 6)}
    assert int(restored[2][".nonfinite_total"]) == 1 and int(restored[2][".ema_step"]) == 1
    assert int(restored[6][".nonfinite_total"]) == 4 and int(restored[6][".nonfinite_run"]) == 3
    for key, value in restored[6].items():
        if key.startswith((".params", ".ema_params", ".opt_state")):
            assert np.all(np.isfinite(value)), key
            np.testing.assert_array_equal(value, restored[4][key], err_msg=key)  # nothing applied after step 3


def test_gradient_accumulation_equals_one_big_batch_and_counts_optimizer_steps(runs, tmp_path):
    """2 micro-batches of 4 on 4 devices train exactly as batches of 8 on 8 devices, and the LR
    schedule advances once per optimizer step, as diffusers' get_scheduler does."""
    config, final, reference = runs[8]
    accumulated = dataclasses.replace(config, output_dir=str(tmp_path), global_batch_size=4,
                                      gradient_accumulation_steps=2)
    state, outputs = run(accumulated, 4, nan_at=(2,))
    np.testing.assert_allclose(outputs.losses(), reference.losses(), rtol=1e-5)
    assert_state_close(state, final)

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=config.learning_rate)
    scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                              num_training_steps=config.max_train_steps)
    expected = []
    for step in range(6):
        expected.append(optimizer.param_groups[0]["lr"])
        if step != 2:  # the skipped (NaN) step applies no update, so the schedule does not advance
            optimizer.step()
            scheduler.step()
    np.testing.assert_allclose([outputs.logs[s]["lr"] for s in range(1, 7)], expected, rtol=1e-6, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_with_float32_state(tmp_path, precision):
    config = tiny_config(tmp_path, "--mixed_precision", precision, "--max_train_steps", "3")
    state, outputs = run(config, 8, nan_at=(1,))
    losses = outputs.losses()
    assert math.isfinite(losses[0]) and math.isnan(losses[1]) and math.isfinite(losses[2])
    for key, value in state.items():
        if key.startswith((".params", ".ema_params")):
            assert value.dtype == np.float32 and np.all(np.isfinite(value)), key
    scale = [outputs.logs[s]["loss_scale"] for s in (1, 2, 3)]
    if precision == "fp16":  # dynamic loss scaling: 2^16 at first, halved by every non-finite step
        assert scale[0] == 65536.0 and scale[2] == scale[1] / 2
    else:
        assert scale == [1.0, 1.0, 1.0]


@pytest.mark.slow
def test_logging_every_n_steps_profile_window_and_nonfinite_stop_between_logs(runs, tmp_path):
    """--logging_steps 4 logs steps 4 and 6 (the last) only; --profile_steps 1:3 writes a trace that
    TensorBoard's profile plugin and Perfetto open; a run of non-finite steps between two logged steps
    still stops the run at its limit (the counter is read every step)."""
    config = dataclasses.replace(runs[8][0], output_dir=str(tmp_path / "run"), logging_steps=4, profile_steps="1:3")
    _, outputs = run(config, 8, nan_at=(2,))
    assert [s for s in sorted(outputs.logs) if "loss" in outputs.logs[s]] == [4, 6]
    profile = tmp_path / "run" / "logs" / "plugins" / "profile"
    assert list(profile.glob("*/*.xplane.pb")) and list(profile.glob("*/perfetto_trace.json.gz"))
    stopping = dataclasses.replace(config, output_dir=str(tmp_path / "nan"), logging_steps=100, profile_steps=None,
                                   max_nonfinite_steps=2)
    with pytest.raises(NonFiniteError, match="2 consecutive steps up to step 3"):
        run(stopping, 8, nan_at=(1, 2))
