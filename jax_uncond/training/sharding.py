"""The device mesh, every `NamedSharding` the project uses, and the attention the mesh's devices run.

One mesh axis, `data`, over all devices of all processes: batches are split along it. The train state
is replicated (`--shard_state replicated`, plain data parallelism), or partly split along the same axis:
`optimizer` splits AdamW's moments and the EMA (ZeRO-1/2: each device updates its slice), `full` the
parameters too (FSDP: the step gathers them before use, and the compiler reduce-scatters their gradients).
Each split leaf is cut along its largest axis that the device count divides; a leaf with none stays whole.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
SHARD_STATE_MODES = ("replicated", "optimizer", "full")
"""`--shard_state`: which parts of the train state are split over the data axis instead of replicated."""


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device."""
    return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Values replicated over `mesh`: host values (the same on every process), or device arrays split any way
    (gathered), also where the mesh spans processes (`jax.device_put` refuses devices of other processes; a
    jitted identity does not)."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def gathered(tree: Any, mesh: Mesh) -> Any:
    """`tree` whole on every device of `mesh`, as sampling and saving read it: as it is when every leaf already
    is (`--shard_state replicated`), else gathered."""
    if all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(tree)):
        return tree
    return put_replicated(tree, mesh)


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Split the batch axis (the leading one, or `axis`) over the `data` axis; other axes whole."""
    return NamedSharding(mesh, P(*(None,) * axis, DATA_AXIS))


def split_sharding(mesh: Mesh, shape: Sequence[int]) -> NamedSharding:
    """A state leaf split over the `data` axis along its largest axis that the device count divides
    (the first of equal ones); replicated when no axis divides, or on one device."""
    devices = data_parallel_size(mesh)
    axes = [i for i, size in enumerate(shape) if size >= devices and size % devices == 0]
    if devices == 1 or not axes:
        return replicated(mesh)
    axis = max(axes, key=lambda i: shape[i])
    return NamedSharding(mesh, P(*(None,) * axis, DATA_AXIS))


def state_shardings(mesh: Mesh, state_shapes: Any, shard_state: str = "replicated") -> Any:
    """The sharding of every leaf of a TrainState (of shapes or arrays) under `--shard_state`: parameters
    split with `full`, optimizer moments and EMA with `optimizer` and `full`, counters always replicated."""
    if shard_state not in SHARD_STATE_MODES:
        raise ValueError(f"--shard_state {shard_state!r}: expected one of {', '.join(SHARD_STATE_MODES)}")

    def leaves(tree: Any, split: bool) -> Any:
        return jax.tree.map(lambda x: split_sharding(mesh, x.shape) if split else replicated(mesh), tree)

    everything = leaves(state_shapes, False)
    if shard_state == "replicated":
        return everything
    return everything.replace(params=leaves(state_shapes.params, shard_state == "full"),
                              opt_state=leaves(state_shapes.opt_state, True),
                              ema_params=leaves(state_shapes.ema_params, True))


def abstract_state(state_shapes: Any, mesh: Mesh, shard_state: str = "replicated") -> Any:
    """`jax.ShapeDtypeStruct`s of the train state carrying their shardings on `mesh`: what a checkpoint is
    restored into, and what a plan compiles the step for."""
    shardings = state_shardings(mesh, state_shapes, shard_state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), state_shapes, shardings)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape[DATA_AXIS]


def platform(mesh: Mesh) -> str:
    """The devices' platform: "cpu", "gpu" or "tpu" (also for a TPU topology compiled for elsewhere)."""
    return mesh.devices.flat[0].platform


def attention_on(mesh: Mesh, requested: str | None = None) -> str:
    """The attention the UNet runs on `mesh`'s devices, chosen from them (never `jax.default_backend()`, which
    is the CPU where a plan compiles for a TPU slice): `requested` where given, except cuDNN's off NVIDIA GPUs;
    otherwise the blocked attention on CPUs (cache-sized groups, models/layers.py) and XLA's elsewhere."""
    kind = platform(mesh)
    if requested in ("xla", "blocked") or (requested == "cudnn" and kind == "gpu"):
        return requested
    return "blocked" if kind == "cpu" else "xla"


def on_mesh(model: Any, mesh: Mesh) -> Any:
    """The UNet as it runs in a program over `mesh`: its attention chosen for the mesh's devices, and the mesh
    given to it, so that the blocked attention runs per device and keeps the batch split."""
    return model.clone(attention_implementation=attention_on(mesh, model.attention_implementation), mesh=mesh)
