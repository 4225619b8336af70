"""`--shard_state` and the attention that follows the devices, on 8 CPU devices.

- Which leaves split where: each along its largest axis the device count divides, by mode.
- The compiled step moves no activations: on 8 devices the blocked CPU attention keeps the batch split (no
  all-gather at all when the state is replicated; only weights and gradients otherwise).
- `optimizer` and `full` train as `replicated` does (20 steps, params and EMA within 1e-5), and checkpoints
  restore across modes and device counts: saved `full` on 8 devices, resumed `replicated` on 1, and back;
  the export of a `full` checkpoint is the trained EMA, and diffusers' DiffusionPipeline loads it.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from engine_parts import ArrayLoader, RecordingOutputs, TINY_UNET, assert_state_close, build_parts, host_state, tiny_config
from jax_uncond.export import export
from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline
from jax_uncond.run import checkpoint as ckpt
from jax_uncond.run import metrics
from jax_uncond.run.loop import train
from jax_uncond.training import sharding
from jax_uncond.training.program import batch_shapes, train_program
from jax_uncond.training.step import jit_train_step

MODES = sharding.SHARD_STATE_MODES
STEPS = 20
COLLECTIVE = re.compile(r" (all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    metrics.enable_compilation_cache(str(tmp_path_factory.mktemp("xla_cache")))


def tiny_state_shapes(tmp_path, mode: str, devices: int = 8):
    config = tiny_config(tmp_path, "--shard_state", mode)
    model, scheduler = build_parts(config)
    return train_program(config, model, scheduler, sharding.make_mesh(jax.devices()[:devices]), 10)


def test_each_leaf_splits_along_its_largest_axis_the_device_count_divides():
    mesh = sharding.make_mesh()
    assert sharding.split_sharding(mesh, (3, 3, 32, 64)).spec == P(None, None, None, "data")
    assert sharding.split_sharding(mesh, (64, 32)).spec == P("data")  # the first of the largest
    assert sharding.split_sharding(mesh, (3, 3, 3, 4)).is_fully_replicated  # no axis divides
    assert sharding.split_sharding(mesh, ()).is_fully_replicated
    assert sharding.split_sharding(sharding.make_mesh(jax.devices()[:1]), (64,)).is_fully_replicated


@pytest.mark.parametrize("mode", MODES)
def test_modes_split_the_parts_they_name_and_cut_the_bytes_per_device(tmp_path, mode):
    program = tiny_state_shapes(tmp_path, mode)
    shardings = program.state_sharding

    def split(tree):
        return {not s.is_fully_replicated for s in jax.tree.leaves(tree)}

    assert split(shardings.params) == ({True, False} if mode == "full" else {False})
    assert split(shardings.opt_state) == ({False} if mode == "replicated" else {True, False})
    assert split(shardings.ema_params) == split(shardings.opt_state)
    assert all(s.is_fully_replicated for s in (shardings.step, shardings.ema_step, shardings.loss_scale))

    state = program.abstract_state()
    per_device = sum(np.prod(x.sharding.shard_shape(x.shape)) for x in jax.tree.leaves(state))
    whole = sum(np.prod(x.shape) for x in jax.tree.leaves(state))
    expected = {"replicated": 1.0, "optimizer": (1 + 3 / 8) / 4, "full": 1 / 8}[mode]  # params : moments+EMA = 1 : 3
    assert per_device / whole == pytest.approx(expected, abs=0.02)


@pytest.fixture(scope="module")
def compiled_steps(tmp_path_factory):
    """The train step of each mode compiled for 8 CPU devices at 32x32 (the blocked attention over 16 groups of
    (batch, head) pairs per call: on 8 devices it used to gather the global batch's queries, keys and values)."""
    out = {}
    for mode in MODES:
        config = tiny_config(tmp_path_factory.mktemp(mode), "--resolution", "32", "--global_batch_size", "16",
                             "--shard_state", mode)
        config = dataclasses.replace(config, unet={**TINY_UNET, "sample_size": 32})
        mesh = sharding.make_mesh()
        model, scheduler = build_parts(config)
        program = train_program(config, model, scheduler, mesh, 10)
        state, batch = program.abstract_state(), batch_shapes(config, 16, mesh)
        text = jit_train_step(program.step, state, batch, mesh).lower(state, batch).compile().as_text()
        leaf_sizes = {int(np.prod(x.shape)) for x in jax.tree.leaves(state)}
        out[mode] = (text, leaf_sizes | {s // 8 for s in leaf_sizes if s % 8 == 0})
    return out


def arrays_moved(text: str) -> list[tuple[str, int]]:
    """(kind, element count) of every array every collective of an HLO text delivers."""
    moved = []
    for line in text.splitlines():
        if found := COLLECTIVE.search(line):
            result = line.split(" = ", 1)[1].split(f" {found.group(1)}", 1)[0]
            for dims in re.findall(r"\w+\[([\d,]*)\]", result):
                moved.append((found.group(1), int(np.prod([int(d) for d in dims.split(",") if d]))))
    return moved


def test_the_cpu_attention_keeps_the_batch_split_and_a_replicated_state_needs_one_all_reduce(compiled_steps):
    kinds = [kind for kind, _ in arrays_moved(compiled_steps["replicated"][0])]
    assert set(kinds) == {"all-reduce"}, kinds  # the gradients' (and metrics') sum, nothing gathered
    assert len(COLLECTIVE.findall(compiled_steps["replicated"][0])) == 1


@pytest.mark.parametrize("mode", ["optimizer", "full"])
def test_split_states_move_weights_and_gradients_only(compiled_steps, mode):
    text, state_sizes = compiled_steps[mode]
    moved = arrays_moved(text)
    assert {kind for kind, _ in moved} <= {"all-reduce", "all-gather", "reduce-scatter"}
    activations = [(kind, size) for kind, size in moved if size > 1 and size not in state_sizes]
    assert not activations, activations
    assert any(kind == "all-gather" for kind, _ in moved)  # the updated (or, with full, the used) weights


def run(config, devices, resume=None):
    mesh = sharding.make_mesh(jax.devices()[:devices])
    model, scheduler = build_parts(config)
    loader = ArrayLoader(mesh, config.global_batch_size, seed=config.seed)
    state = train(config, model, scheduler, mesh, loader, RecordingOutputs(), config.global_batch_size, resume)
    return host_state(state)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """20 steps in each mode on 8 devices, checkpoints every 10 steps."""
    out = {}
    for mode in MODES:
        config = tiny_config(tmp_path_factory.mktemp(mode), "--shard_state", mode, "--max_train_steps", str(STEPS),
                             "--checkpointing_steps", "10", "--logging_steps", "10")
        out[mode] = (config, run(config, 8))
    return out


def relative_l2(actual: dict, desired: dict, prefix: str) -> float:
    """|actual - desired| / |desired| over every leaf under `prefix` (the parameters, or the EMA) together."""
    keys = [k for k in desired if k.startswith(prefix)]
    difference = sum(float(np.sum((actual[k] - desired[k]).astype(np.float64) ** 2)) for k in keys)
    return (difference / sum(float(np.sum(desired[k].astype(np.float64) ** 2)) for k in keys)) ** 0.5


@pytest.mark.parametrize("mode", ["optimizer", "full"])
def test_split_states_train_as_the_replicated_one(trained, mode):
    reference, actual = trained["replicated"][1], trained[mode][1]
    assert relative_l2(actual, reference, ".params") <= 1e-5
    assert relative_l2(actual, reference, ".ema_params") <= 1e-5
    assert_state_close(actual, reference)  # every leaf, moments and counters too (attention key biases: 1e-4)


@pytest.mark.parametrize("saved,resumed", [(("full", 8), ("replicated", 1)), (("replicated", 1), ("full", 8))])
def test_checkpoints_restore_across_modes_and_device_counts(trained, tmp_path, saved, resumed):
    """Step 10 of a run saved in one mode on one device count continues in another to the same step 20."""
    (saved_mode, saved_devices), (mode, devices) = saved, resumed
    if saved_devices == 8:
        source = trained[saved_mode][0]
    else:  # the replicated run again, on one device
        source = dataclasses.replace(trained[saved_mode][0], output_dir=str(tmp_path / "saved"))
        run(source, saved_devices)
    checkpoint = ckpt.step_path(ckpt.checkpoints_dir(source.output_dir), 10)
    config = dataclasses.replace(trained[mode][0], output_dir=str(tmp_path / "resumed"), max_train_steps=STEPS,
                                 resume_from_checkpoint=checkpoint)
    state = run(config, devices, ckpt.resolve_resume(checkpoint, config.output_dir))
    assert_state_close(state, trained["replicated"][1])


def test_export_of_a_split_checkpoint_is_the_trained_ema(trained, tmp_path):
    config, state = trained["full"]
    export(config.output_dir, str(tmp_path / "exported"))
    _, params = FlaxDDPMPipeline.from_pretrained(tmp_path / "exported")
    exported = {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(params["unet"])}
    assert exported.keys() == {k.removeprefix(".ema_params") for k in state if k.startswith(".ema_params")}
    for key, value in exported.items():
        np.testing.assert_array_equal(value, state[".ema_params" + key], err_msg=key)

    from diffusers import DDPMPipeline, DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "exported")  # the PyTorch side loads it as any export
    assert isinstance(pipeline, DDPMPipeline)
    np.testing.assert_array_equal(pipeline.unet.conv_in.bias.detach().numpy(), exported["['conv_in']['bias']"])
