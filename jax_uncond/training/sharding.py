"""The device mesh and every `NamedSharding` the project uses.

Data parallelism today: one mesh axis, `data`, over all devices of all processes; batches are split
along it and parameters, optimizer state and EMA are replicated. Sharding parameters over a second
axis (FSDP) later is a change local to this module.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh named `data` over `devices` (default: every device of every process)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices).reshape(-1), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full copy on every device: parameters, optimizer state, EMA, step."""
    return NamedSharding(mesh, P())


def put_replicated(tree: Any, mesh: Mesh) -> Any:
    """Host values (the same on every process) as arrays replicated over `mesh`, also where the mesh spans
    processes (`jax.device_put` refuses devices of other processes; a jitted identity does not)."""
    return jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Split the batch axis (the leading one, or `axis`) over the `data` axis; other axes whole."""
    return NamedSharding(mesh, P(*(None,) * axis, DATA_AXIS))


def state_shardings(mesh: Mesh, state_shapes: Any) -> Any:
    """The sharding of every leaf of a train-state pytree (all replicated under data parallelism)."""
    return jax.tree.map(lambda _: replicated(mesh), state_shapes)


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return mesh.shape[DATA_AXIS]
