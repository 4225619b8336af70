"""Faults a user meets, end to end with `train_flax.py` (docs/reliability.md): a broken newest checkpoint,
a second run on the same output folder, a failed save, failed side writes, a rollback to an older checkpoint.

One uninterrupted reference run (tiny UNet, 8x8 built-in images, one CPU device, checkpoints at 10,
20, 30) is copied and damaged for each case; every run shares its compilation cache, so only the
reference compiles. Exit-code-2 cases stop before compiling and run in this process.
"""

import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import run_parts
from jax_uncond.run import checkpoint as ckpt
from jax_uncond.run import checkpoint_files, faults, run_lock
from run_parts import ROOT, TINY_UNET, assert_bitwise_equal, environment, tiny_flags

pytestmark = pytest.mark.slow  # every test here needs the reference run (one compile, about 30 s on an idle CPU)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    (root / "unet.json").write_text(TINY_UNET)
    return root, environment(root / "xla_cache")  # PYTHONPATH: conftest's, the package under test


def flags(workspace, output_dir, *extra):
    return [*tiny_flags(output_dir, workspace[0] / "unet.json"), *map(str, extra)]


def command(workspace, output_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "train_flax.py"), *flags(workspace, output_dir, *extra)]


def train(workspace, output_dir, *extra, faults_env=None):
    env = dict(workspace[1])
    if faults_env:
        env[faults.FAULTS_ENV] = faults_env
    return subprocess.run(command(workspace, output_dir, *extra), env=env, capture_output=True, text=True,
                          timeout=900)


def warnings_in(text):
    return [line for line in text.splitlines() if "WARNING:" in line]


def exported(output_dir, tmp_path):
    """The EMA weights of the run's newest restorable checkpoint, through `python -m jax_uncond.export`."""
    return run_parts.exported(output_dir, tmp_path / f"export_{os.path.basename(output_dir)}")


@pytest.fixture(scope="module")
def reference(workspace, tmp_path_factory):
    """An uninterrupted run: checkpoints 10, 20, 30, and its exported weights."""
    output_dir = workspace[0] / "reference"
    done = train(workspace, output_dir)
    assert done.returncode == 0, done.stderr
    assert "absl" not in done.stderr and "Traceback" not in done.stderr, done.stderr  # no library chatter
    assert not (output_dir / run_lock.LOCK_NAME).exists()  # released at the end
    return output_dir, exported(output_dir, tmp_path_factory.mktemp("reference_export"))


def copy_run(reference, tmp_path, keep=(10, 20, 30)):
    output_dir = tmp_path / "run"
    shutil.copytree(reference[0], output_dir)
    for step in (10, 20, 30):
        if step not in keep:
            shutil.rmtree(ckpt.step_path(ckpt.checkpoints_dir(output_dir), step))
    return output_dir


def data_file(checkpoint):
    files = [os.path.join(root, n) for root, _, names in os.walk(os.path.join(checkpoint, "state")) for n in names]
    return max(files, key=os.path.getsize)


def main_in_process(workspace, output_dir, capsys, caplog, *extra):
    """train_flax.py's main() in this process, for runs that stop before compiling: (exit code, stdout,
    stderr, the package's warnings; pytest takes logging records away from stderr)."""
    from jax_uncond.train import main

    with caplog.at_level(logging.WARNING):
        code = main(flags(workspace, output_dir, *extra), prog="train_flax.py")
    out, err = capsys.readouterr()
    warned = [r.getMessage() for r in caplog.records
              if r.levelno >= logging.WARNING and r.name.startswith("jax_uncond")]
    return code, out, err, warned


def test_truncated_newest_checkpoint_resumes_from_the_one_before_and_matches(workspace, reference, tmp_path):
    output_dir = copy_run(reference, tmp_path)
    directory = ckpt.checkpoints_dir(output_dir)
    damaged = data_file(ckpt.step_path(directory, 30))
    os.truncate(damaged, os.path.getsize(damaged) // 2)
    done = train(workspace, output_dir, "--resume_from_checkpoint", "latest")
    assert done.returncode == 0, done.stderr
    (warning,) = warnings_in(done.stderr)
    assert "checkpoint_30" in warning and "truncated" in warning, warning
    assert f"start: resuming from {ckpt.step_path(directory, 20)} at step 20" in done.stdout
    assert "absl" not in done.stderr and "Traceback" not in done.stderr
    assert sorted(os.listdir(directory)) == ["checkpoint_10", "checkpoint_20", "checkpoint_30", "checkpoint_30.broken"]
    assert_bitwise_equal(exported(output_dir, tmp_path), reference[1])


def test_deleted_metadata_resumes_from_the_one_before(workspace, reference, tmp_path, capsys, caplog):
    """The decision alone (the run to 30 is the test above): resumed at step 20 with --max_train_steps 20
    there is nothing left to train, so nothing compiles."""
    output_dir = copy_run(reference, tmp_path)
    directory = ckpt.checkpoints_dir(output_dir)
    os.remove(os.path.join(ckpt.step_path(directory, 30), "state", "_METADATA"))
    code, out, err, warned = main_in_process(workspace, output_dir, capsys, caplog, "--resume_from_checkpoint",
                                             "latest", "--max_train_steps", 20)
    assert code == 0, err
    (warning,) = warned
    assert "checkpoint_30" in warning and "_METADATA is missing" in warning, warning
    assert f"start: resuming from {ckpt.step_path(directory, 20)} at step 20" in out
    assert os.path.isdir(ckpt.step_path(directory, 30) + ckpt.BROKEN_SUFFIX)


@pytest.mark.parametrize("case", ["explicit_path", "all_broken"])
def test_unrestorable_checkpoints_are_one_line_and_exit_2(workspace, reference, tmp_path, capsys, caplog, case):
    output_dir = copy_run(reference, tmp_path)
    directory = ckpt.checkpoints_dir(output_dir)
    damaged = data_file(ckpt.step_path(directory, 30))
    os.truncate(damaged, 10)
    resume = ckpt.step_path(directory, 30)
    if case == "all_broken":
        os.remove(os.path.join(ckpt.step_path(directory, 20), "state", "_METADATA"))
        with open(data_file(ckpt.step_path(directory, 10)), "r+b") as f:
            f.write(b"\x00" * 64)
        resume = "latest"
    before = sorted(os.listdir(directory))
    code, _, err, warned = main_in_process(workspace, output_dir, capsys, caplog, "--resume_from_checkpoint", resume)
    assert code == 2 and not warned, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("train_flax.py: error: --resume_from_checkpoint"), err
    assert ("none of the 3 checkpoints" if case == "all_broken" else "checkpoint_30: ChecksumError") in lines[0]
    assert sorted(os.listdir(directory)) == before  # nothing moved or deleted: the user decides


def test_an_older_checkpoint_than_the_newest_stops_at_start_up_naming_both_ways_on(workspace, reference, tmp_path,
                                                                                   capsys, caplog):
    """Resuming checkpoint 20 while 30 exists would fail at step 30, after training: refused before anything
    compiles, one line naming the newer step, --rollback and a new --output_dir; nothing moved."""
    output_dir = copy_run(reference, tmp_path)
    directory = ckpt.checkpoints_dir(output_dir)
    code, out, err, warned = main_in_process(workspace, output_dir, capsys, caplog, "--resume_from_checkpoint",
                                             ckpt.step_path(directory, 20))
    assert code == 2 and not warned, err
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert "newer checkpoints (30)" in line and "--rollback" in line and "new --output_dir" in line, line
    assert "compiled" not in out and "start:" not in out
    assert sorted(os.listdir(directory)) == ["checkpoint_10", "checkpoint_20", "checkpoint_30"]


def test_rollback_moves_the_newer_checkpoints_aside_and_matches_the_uninterrupted_run(workspace, reference, tmp_path):
    output_dir = copy_run(reference, tmp_path)
    directory = ckpt.checkpoints_dir(output_dir)
    done = train(workspace, output_dir, "--resume_from_checkpoint", ckpt.step_path(directory, 20), "--rollback")
    assert done.returncode == 0, done.stderr
    (superseded,) = [n for n in os.listdir(directory) if n.startswith(ckpt.SUPERSEDED_PREFIX + "20-")]
    assert os.listdir(os.path.join(directory, superseded)) == ["checkpoint_30"]  # moved, never deleted
    (said,) = [line for line in done.stdout.splitlines() if line.startswith("--rollback:")]
    assert "checkpoints 30 moved to" in said and superseded in said, said
    assert f"start: resuming from {ckpt.step_path(directory, 20)} at step 20" in done.stdout
    assert ckpt.Checkpoints(directory, 1, read_only=True).all_steps() == [10, 20, 30]  # 30 saved again
    assert_bitwise_equal(exported(output_dir, tmp_path), reference[1])


def test_one_run_per_output_folder_and_takeover_after_sigkill(workspace, reference, tmp_path):
    """A second run on a running one's folder stops at once, naming it, before it writes anything; once the
    first is SIGKILLed, a new run takes the lock over, resumes, and finishes despite failing side writes."""
    output_dir = copy_run(reference, tmp_path, keep=(10, 20))
    lock_file = output_dir / run_lock.LOCK_NAME
    first = subprocess.Popen(command(workspace, output_dir, "--resume_from_checkpoint", "latest"), env=workspace[1],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (lock_file.exists() and "pid" in lock_file.read_text()):
            assert first.poll() is None, "the first run ended before taking the lock"
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # running, holding the lock, frozen wherever it is
        files = sorted(os.path.join(r, n) for r, _, names in os.walk(output_dir) for n in names)
        second = train(workspace, output_dir, "--resume_from_checkpoint", "latest")
        assert second.returncode == 2, second.stderr
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "is in use by another run" in lines[0] and f"pid {first.pid}" in lines[0], lines
        assert sorted(os.path.join(r, n) for r, _, names in os.walk(output_dir) for n in names) == files
        exported(output_dir, tmp_path)  # export only reads: it takes no lock
    finally:
        first.kill()
        first.wait()
    third = train(workspace, output_dir, "--resume_from_checkpoint", "latest", faults_env="grid,pipeline,log")
    assert third.returncode == 0, third.stderr
    takeover, *failed_writes = warnings_in(third.stderr)
    assert "taking over the lock" in takeover and f"pid {first.pid}" in takeover and "no longer exists" in takeover
    assert sorted(w.split("could not write the ")[1].split(" ")[0] for w in failed_writes) == [
        "pipeline", "sample", "tracker"], third.stderr
    assert ckpt.Checkpoints(ckpt.checkpoints_dir(output_dir), 1, read_only=True).all_steps() == [10, 20, 30]
    assert "start: resuming from" in third.stdout and "at step 20" in third.stdout
    assert "failed_log_writes=" in third.stdout and "failed_grid_writes=1" in third.stdout
    assert not lock_file.exists()
    assert_bitwise_equal(exported(output_dir, tmp_path), reference[1])


def test_failed_save_exits_1_and_the_earlier_checkpoints_still_resume(workspace, reference, tmp_path):
    output_dir = copy_run(reference, tmp_path, keep=(10, 20))
    directory = ckpt.checkpoints_dir(output_dir)
    done = train(workspace, output_dir, "--resume_from_checkpoint", "latest", "--checkpoints_total_limit", 1,
                 faults_env="save:30")
    assert done.returncode == 1, done.stderr
    lines = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert len(lines) == 1 and "saving checkpoint 30" in lines[0] and "No space left" in lines[0], done.stderr
    assert "Traceback" not in done.stderr and "absl" not in done.stderr
    assert ckpt.Checkpoints(directory, 1, read_only=True).all_steps() == [10, 20]  # the limit deleted nothing
    assert ckpt.resolve_resume("latest", str(output_dir)) == (directory, 20)
    for step in (10, 20):
        assert checkpoint_files.verify(ckpt.step_path(directory, step))
    from jax_uncond import export

    for step in (10, 20):
        export.load(ckpt.Checkpoints(directory, 1, read_only=True), step, str(output_dir), None)  # restores
