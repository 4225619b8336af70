"""Joining the processes of a multi-host run: `jax.distributed.initialize` when there are several.

Detected: multi-host Cloud TPU VMs, SLURM jobs with several tasks, Open MPI runs with several ranks
(JAX reads the coordinator, process count and index from their environment); or explicit
`--coordinator_address/--num_processes/--process_id` (N GPU hosts launched by hand).
"""

from __future__ import annotations

import glob
import os
from typing import Any, Mapping

import jax


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


def initialize(config: Any, environ: Mapping[str, str] | None = None) -> str:
    """Join the other processes if there are any; returns how (for the start-up line)."""
    explicit = (config.coordinator_address, config.num_processes, config.process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together; give all three")
        jax.distributed.initialize(coordinator_address=config.coordinator_address,
                                   num_processes=config.num_processes, process_id=config.process_id)
        return f"process {config.process_id} of {config.num_processes} via {config.coordinator_address}"
    cluster = detect_cluster(environ)
    if cluster is None:
        return "single process"
    jax.distributed.initialize()
    return f"process {jax.process_index()} of {jax.process_count()} ({cluster})"
