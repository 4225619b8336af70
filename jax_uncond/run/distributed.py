"""Joining the processes of a multi-host run: `jax.distributed.initialize` when there are several.

Detected: multi-host Cloud TPU VMs, SLURM jobs with several tasks, Open MPI runs with several ranks
(JAX reads the coordinator, process count and index from their environment); or explicit
`--coordinator_address/--num_processes/--process_id` (N GPU hosts launched by hand).

JAX's coordination service (run by process 0) ends every process from native code (SIGABRT and a
stack trace) when it notices a lost process, so the run's own watchdog (`peers.py`) must notice first:
the heartbeat timeout is set to three times the watchdog's, and the shutdown timeout leaves process 0
time for its last uploads while the others wait in JAX's shutdown barrier (docs/reliability.md).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping

import jax

from jax_uncond.errors import UsageError
from jax_uncond.training.config import TrainConfig

HEARTBEAT_TIMEOUT_S = 60
"""JAX's `heartbeat_timeout_seconds` (default 100): a process silent this long is declared dead by JAX,
which then aborts all the others; 3 x `peers.LOST_AFTER_S`, so the run's watchdog stops them cleanly first."""
SHUTDOWN_TIMEOUT_S = 300
"""JAX's `shutdown_timeout_seconds` (its default, stated): how long a finished process waits in JAX's shutdown
barrier for the others; process 0 finishes last (the last sample grid, pipeline and `uploads.FINAL_WAIT_S`)."""


def detect_cluster(environ: Mapping[str, str] | None = None) -> str | None:
    """The multi-process launcher this process runs under ('tpu', 'slurm', 'openmpi'), or None."""
    env = os.environ if environ is None else environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) > 1 and "SLURM_JOB_ID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    hostnames = env.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hostnames or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    if environ is None and (glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")):
        return "tpu"  # a Cloud TPU VM: JAX asks the metadata server whether it is part of a pod
    return None


def initialize(config: TrainConfig, environ: Mapping[str, str] | None = None) -> str:
    """Join the other processes if there are any; returns how (for the start-up line)."""
    timeouts = {"heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S, "shutdown_timeout_seconds": SHUTDOWN_TIMEOUT_S}
    explicit = (config.coordinator_address, config.num_processes, config.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise UsageError("--coordinator_address, --num_processes and --process_id go together; give all three")
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id, **timeouts)
        return f"process {config.process_id} of {config.num_processes} via {config.coordinator_address}"
    cluster = detect_cluster(environ)
    if cluster is None:
        return "single process"
    jax.distributed.initialize(**timeouts)
    return f"process {jax.process_index()} of {jax.process_count()} ({cluster})"


def coordination_client() -> Any:
    """JAX's client of the coordination service, whose key-value store the processes share (None before
    `initialize`). JAX has no public accessor; Orbax reads the same attribute."""
    from jax._src import distributed

    return distributed.global_state.client
