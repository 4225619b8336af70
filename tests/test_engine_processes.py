"""The engine across real processes: SIGKILL + resume is bit-identical, SIGTERM saves and exits 0,
and two processes (jax.distributed on localhost, CPU collectives) equal one process."""

import os
import subprocess
import sys

import numpy as np
import pytest

from engine_parts import assert_state_close
from jax_uncond.run import checkpoint as ckpt
from run_parts import free_port

WORKER = os.path.join(os.path.dirname(__file__), "engine_worker.py")
STEPS = ["--max_train_steps", "6", "--checkpointing_steps", "2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    environ = dict(os.environ)
    environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("xla_cache"))
    environ.pop("XLA_FLAGS", None)
    return environ


def launch(env, devices, result, *flags):
    return subprocess.Popen([sys.executable, WORKER, str(devices), str(result), *map(str, flags)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process, timeout=600):
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def worker(env, devices, result, *flags):
    code, output = finish(launch(env, devices, result, *flags))
    assert code == 0, output
    return output


def load(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.fixture(scope="module")
def reference(env, tmp_path_factory):
    """An uninterrupted 6-step run on 4 devices in one process."""
    tmp = tmp_path_factory.mktemp("reference")
    worker(env, 4, tmp / "state.npz", "--output_dir", tmp / "out", *STEPS)
    return load(tmp / "state.npz")


def test_sigkill_then_resume_latest_is_bit_identical(env, reference, tmp_path):
    out = tmp_path / "out"
    code, output = finish(launch(env, 4, tmp_path / "unused.npz", "--output_dir", out, *STEPS,
                                 "--signal_at", "kill:4:4"))
    assert code == -9, output
    assert not (tmp_path / "unused.npz").exists()
    output = worker(env, 4, tmp_path / "state.npz", "--output_dir", out, *STEPS, "--resume_from_checkpoint", "latest")
    assert "start: resuming from" in output and "at step 4" in output, output
    assert_identical(load(tmp_path / "state.npz"), reference)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_reached_and_exits_0(env, tmp_path):
    out = tmp_path / "out"
    output = worker(env, 4, tmp_path / "state.npz", "--output_dir", out, *STEPS, "--signal_at", "term:2")
    assert "stopped by SIGTERM at step 3" in output, output
    steps = ckpt.Checkpoints(ckpt.checkpoints_dir(out), 2, read_only=True).all_steps()
    assert steps == [2, 3]
    assert int(load(tmp_path / "state.npz")[".step"]) == 3


@pytest.mark.slow
def test_two_processes_equal_one(env, reference, tmp_path):
    address = f"localhost:{free_port()}"
    processes = [launch(env, 2, tmp_path / f"state{i}.npz", "--output_dir", tmp_path / "out", *STEPS,
                        "--coordinator_address", address, "--num_processes", 2, "--process_id", i)
                 for i in range(2)]
    results = [finish(p) for p in processes]
    for code, output in results:
        assert code == 0, output
    state = load(tmp_path / "state0.npz")
    assert not (tmp_path / "state1.npz").exists()
    assert_state_close(state, reference)


@pytest.mark.slow
def test_sigterm_on_two_processes_stops_both_at_one_step(env, tmp_path):
    """JAX's preemption service agrees on the step: both processes save it together and exit 0."""
    address = f"localhost:{free_port()}"
    processes = [launch(env, 2, tmp_path / f"state{i}.npz", "--output_dir", tmp_path / "out", *STEPS,
                        "--coordinator_address", address, "--num_processes", 2, "--process_id", i,
                        "--signal_at", "term:2") for i in range(2)]
    results = [finish(p) for p in processes]
    for code, output in results:
        assert code == 0, output
    stopped = [line for line in results[0][1].splitlines() if "stopped by SIGTERM at step" in line]
    assert stopped, results[0][1]
    step = int(stopped[0].split("at step ")[1].split(":")[0])
    assert step in ckpt.Checkpoints(ckpt.checkpoints_dir(tmp_path / "out"), 2, read_only=True).all_steps()
    assert int(load(tmp_path / "state0.npz")[".step"]) == step < 6
