"""Faults of a multi-host run, end to end with `train_flax.py` on two processes (jax.distributed on localhost,
one CPU device each; docs/reliability.md): a checkpoint file one process cannot read, a process that fails
alone, flags that differ between processes, and processes killed mid-run (one or both, again and again).

One uninterrupted two-process reference run (checkpoints 10, 20, 30) is the model every interrupted run
must equal to the bit; every run shares its compilation cache, so only the reference compiles.
"""

import os
import shutil
import sys

import pytest

from jax_uncond.run import checkpoint as ckpt
from run_parts import ROOT, TINY_UNET, Processes, environment, exported, tiny_flags

sys.path.insert(0, str(ROOT / "benchmarks"))

import chaos  # noqa: E402

pytestmark = pytest.mark.slow  # the reference run compiles (about a minute on two busy cores)
STOP_BOUND_S = 120  # the bound on a process that must stop by itself


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("pods")
    (root / "unet.json").write_text(TINY_UNET)
    return root, environment(root / "xla_cache")


def flags(workspace, output_dir, *extra):
    return [*tiny_flags(output_dir, workspace[0] / "unet.json"), *map(str, extra)]


@pytest.fixture(scope="module")
def reference(workspace):
    """An uninterrupted two-process run and its exported weights."""
    output_dir = workspace[0] / "reference"
    run = Processes(workspace[1], workspace[0] / "logs", flags(workspace, output_dir))
    assert run.wait(timeout=1200) == [0, 0], run.stderr(0) + run.stderr(1)
    assert "Traceback" not in run.stderr(0) + run.stderr(1)
    return output_dir, exported(output_dir, workspace[0] / "reference_export")


def copy_run(reference, tmp_path, keep=(10, 20, 30)):
    output_dir = tmp_path / "run"
    shutil.copytree(reference[0], output_dir)
    for step in {10, 20, 30} - set(keep):
        shutil.rmtree(ckpt.step_path(ckpt.checkpoints_dir(output_dir), step))
    return output_dir


def assert_one_error_line(run, i, *fragments):
    lines = run.error_lines(i)
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), lines
    assert not any("Traceback" in line or "Check failure" in line or line.startswith(("F1", "E1")) for line in lines)


@pytest.mark.parametrize("resume", ["latest", "path"])
def test_a_checkpoint_only_process_1_cannot_read(workspace, reference, tmp_path, resume):
    """Checkpoint 30 is unreadable to process 1 alone: with `latest` both resume from 20 (the decision alone:
    with --max_train_steps 20 nothing is left to train, so nothing compiles); named by its path, both stop at
    start-up with exit code 2, the line naming process 1. Either way within the bound, nothing deleted."""
    output_dir = copy_run(reference, tmp_path)
    directory = ckpt.checkpoints_dir(output_dir)
    asked = "latest" if resume == "latest" else ckpt.step_path(directory, 30)
    run = Processes(workspace[1], tmp_path / "logs", flags(workspace, output_dir, "--resume_from_checkpoint", asked,
                                                           "--max_train_steps", 20), faults_of={1: "read:30"})
    codes = run.wait(timeout=STOP_BOUND_S)
    if resume == "path":
        assert codes == [2, 2], run.stderr(0) + run.stderr(1)
        for i in range(2):
            assert_one_error_line(run, i, "checkpoint_30", "on process 1: OSError", "Input/output error")
        assert sorted(os.listdir(directory)) == ["checkpoint_10", "checkpoint_20", "checkpoint_30"]
        return
    assert codes == [0, 0], run.stderr(0) + run.stderr(1)
    assert f"start: resuming from {ckpt.step_path(directory, 20)} at step 20" in run.stdout(0)
    warnings = [line for line in run.error_lines(0) if line.startswith("WARNING:")]
    assert len(warnings) == 1 and "on process 1: OSError" in warnings[0] and ".broken" in warnings[0], warnings
    assert os.path.isdir(ckpt.step_path(directory, 30) + ckpt.BROKEN_SUFFIX)


def test_a_process_that_fails_alone_stops_the_other_with_its_line(workspace, reference, tmp_path):
    """Process 0 meets a bug at step 22 while process 1 goes on into the next step's collective and waits for
    it: process 0 stops with its traceback, process 1 a few seconds later with one line naming it; exit code 1
    on both, process 0 (JAX's coordination service) last, so no native abort. (Process 1 failing alone is the
    watchdog's other side: the unit test of `peers.Watch`.)"""
    failing = 0
    output_dir = copy_run(reference, tmp_path, keep=(10, 20))
    run = Processes(workspace[1], tmp_path / "logs", flags(workspace, output_dir, "--resume_from_checkpoint",
                                                           "latest"),
                    script_of={failing: [str(ROOT / "tests" / "bug_worker.py"), "22"]})
    assert run.wait(timeout=STOP_BOUND_S + 300) == [1, 1], run.stderr(0) + run.stderr(1)
    assert run.error_lines(failing)[-1] == "RuntimeError: a bug at step 22", run.stderr(failing)
    other = 1 - failing
    assert_one_error_line(run, other, f"process {failing} of 2 stopped (RuntimeError: a bug at step 22)",
                          "this process stops too", "--resume_from_checkpoint latest")
    assert ckpt.Checkpoints(ckpt.checkpoints_dir(output_dir), 1, read_only=True).all_steps() == [10, 20]


def test_flags_that_differ_between_processes_stop_both_at_start_up(workspace, tmp_path):
    run = Processes(workspace[1], tmp_path / "logs", flags(workspace, tmp_path / "run"), extra_of={1: ["--seed", "1"]})
    assert run.wait(timeout=STOP_BOUND_S) == [2, 2], run.stderr(0) + run.stderr(1)
    for i in range(2):
        assert_one_error_line(run, i, "the flags differ from process 0's: --seed 1 (process 0: 0)")


def test_kills_on_two_processes_stop_the_survivor_and_end_bit_identical(workspace, reference, tmp_path):
    """Chaos, seeded: process 1 killed inside the first checkpoint save, then one or both processes killed at
    random moments, at least 8 kills in all, both restarted with `latest` each time. Whenever process 1 alone
    was killed, process 0 stopped by itself within the bound: one line naming it, exit code 1, no traceback.
    No process was left waiting; the final export equals the uninterrupted run's to the bit."""
    figures, rounds = chaos.chaos(tmp_path, kills=8, processes=2, seed=93, reference=reference[1], first_victims=[1])
    assert rounds[0]["moment"] == "save" and rounds[0]["victims"] == [1], rounds[0]
    for done in (r for r in rounds if r["victims"] == [1]):
        assert done["codes"][0] == 1 and done["stop_s"] < STOP_BOUND_S, done
        errors = [line for line in done["lines"][0] if "error:" in line]
        assert len(errors) == 1 and "process 1 of 2 is lost" in errors[0], done["lines"][0]
        assert "latest" in errors[0] and not any("Traceback" in line or "Check failure" in line
                                                 for line in done["lines"][0])
    assert figures["kills"] >= 8 and figures["kills_in_save"] >= 1, figures
    assert figures["hung"] == 0 and figures["bit_identical"], figures
