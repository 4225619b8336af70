"""`train_flax.py` runs in subprocesses, for the end-to-end reliability tests and benchmarks/chaos.py: the tiny
UNet on the built-in 8x8 images, checkpoints every few steps, on one process or on several (jax.distributed
on localhost, one CPU device each), the exported weights compared bit for bit.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from jax_uncond.run import faults

ROOT = Path(__file__).resolve().parent.parent
TINY_UNET = ('{"_class_name": "UNet2DModel", "sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64], '
             '"down_block_types": ["DownBlock2D", "AttnDownBlock2D"], '
             '"up_block_types": ["AttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8}')


def environment(cache_dir: Path) -> dict[str, str]:
    """One CPU device per process, offline, one compilation cache for all runs, no injected faults. PYTHONPATH
    comes from the caller (tests/conftest.py: the package under test)."""
    env = dict(os.environ)
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
               JAX_COMPILATION_CACHE_DIR=str(cache_dir))
    env.pop(faults.FAULTS_ENV, None)
    return env


def tiny_flags(output_dir: Path, unet_json: Path, steps: int = 30, every: int = 10) -> list[str]:
    """The flags of a tiny run of `steps` steps, a checkpoint every `every`."""
    return ["--output_dir", str(output_dir), "--model_config_name_or_path", str(unet_json), "--resolution", "8",
            "--global_batch_size", "8", "--max_train_steps", str(steps), "--checkpointing_steps", str(every),
            "--use_ema", "--lr_warmup_steps", "2", "--learning_rate", "1e-3", "--ddpm_num_steps", "100",
            "--ddpm_num_inference_steps", "2", "--eval_batch_size", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class Processes:
    """`train_flax.py` started on `count` processes that join each other (their stdout and stderr in files)."""

    def __init__(self, env: dict[str, str], logs: Path, flags: list[str], count: int = 2,
                 faults_of: dict[int, str] | None = None, extra_of: dict[int, list[str]] | None = None,
                 script_of: dict[int, list[str]] | None = None):
        """`faults_of`, `extra_of` and `script_of` (the script and its first arguments, instead of train_flax.py)
        set JAX_UNCOND_FAULTS, more flags and another entry point for some processes."""
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        port = free_port()
        self.processes = []
        for i in range(count):
            joined = ["--coordinator_address", f"localhost:{port}", "--num_processes", str(count),
                      "--process_id", str(i)] if count > 1 else []
            process_env = dict(env, **({faults.FAULTS_ENV: faults_of[i]} if faults_of and i in faults_of else {}))
            with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
                script = (script_of or {}).get(i, [str(ROOT / "train_flax.py")])
                self.processes.append(subprocess.Popen(
                    [sys.executable, *script, *flags, *joined, *(extra_of or {}).get(i, [])],
                    env=process_env, stdout=out, stderr=err, cwd=ROOT))

    def wait(self, timeout: float) -> list[int]:
        """The exit codes, once every process has ended (subprocess.TimeoutExpired after `timeout` seconds)."""
        return [p.wait(timeout=timeout) for p in self.processes]

    def kill(self, which: list[int] | None = None) -> None:
        for i in range(len(self.processes)) if which is None else which:
            if self.processes[i].poll() is None:
                self.processes[i].kill()

    def stderr(self, i: int) -> str:
        return (self.logs / f"{i}.err").read_text()

    def stdout(self, i: int) -> str:
        return (self.logs / f"{i}.out").read_text()

    def error_lines(self, i: int) -> list[str]:
        """Process i's lines on stderr but the progress bar and Gloo's connection notes."""
        lines = self.stderr(i).replace("\r", "\n").splitlines()
        return [line for line in lines if line.strip() and "it/s" not in line and "%|" not in line
                and not line.startswith("[Gloo]")]


def exported(output_dir: Path, target: Path) -> dict[str, np.ndarray]:
    """The EMA weights of the run's newest restorable checkpoint, through `python -m jax_uncond.export`."""
    from safetensors.numpy import load_file

    from jax_uncond import export

    assert export.main([str(output_dir), str(target)]) == 0
    return load_file(str(target / "unet" / "diffusion_pytorch_model.safetensors"))


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
