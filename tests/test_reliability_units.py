"""The reliability pieces without a model: checkpoint file lists, fallback and quarantine, failed saves,
the output-folder lock, fault injection, the log filters and Hub upload retries (docs/reliability.md)."""

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_uncond import console
from jax_uncond.run import checkpoint as ckpt
from jax_uncond.run import checkpoint_files, faults, run_lock, uploads
from jax_uncond.training import sharding
from jax_uncond.training.sharding import make_mesh, replicated


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(jax.devices()[:1])


def state_of(mesh, value):
    return {"w": jax.device_put(jnp.full((64, 32), value), replicated(mesh)),
            "step": jax.device_put(jnp.asarray(int(value)), replicated(mesh))}


def target(mesh):
    return sharding.abstract_state(jax.eval_shape(lambda: state_of(mesh, 0.0)), mesh)


def save(directory, steps, mesh, keep=None):
    checkpoints = ckpt.Checkpoints(directory, 1, keep)
    for s in steps:
        checkpoints.save(s, state_of(mesh, float(s)), {"position": s}, {"seed": 0})
    checkpoints.close()


def largest_file(folder):
    files = [os.path.join(root, n) for root, _, names in os.walk(folder) for n in names
             if n not in checkpoint_files.UNLISTED]
    return max(files, key=os.path.getsize)


def warnings_of(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("jax_uncond")]


@pytest.fixture
def saved(tmp_path, mesh):
    """checkpoints 1, 2, 3 of a small state, in a run's output folder."""
    directory = ckpt.checkpoints_dir(tmp_path)
    save(directory, [1, 2, 3], mesh)
    return directory


# --- checkpoint file lists


def test_every_save_lists_its_files_and_a_good_checkpoint_verifies(saved):
    for step in (1, 2, 3):
        folder = ckpt.step_path(saved, step)
        with open(os.path.join(folder, checkpoint_files.MANIFEST)) as f:
            listed = json.load(f)["files"]
        assert any(name.startswith("state/") for name in listed) and "loader/metadata" in listed
        assert checkpoint_files.verify(folder) is True


@pytest.mark.parametrize("fault,message", [
    ("truncate", "truncated"), ("flip", "CRC-32 mismatch"), ("delete", "is missing"), ("manifest", "unreadable")])
def test_a_damaged_checkpoint_names_the_file(saved, fault, message):
    folder = ckpt.step_path(saved, 3)
    path = largest_file(folder)
    if fault == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    elif fault == "flip":  # bytes changed in place: Orbax itself restores these silently
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            f.write(b"\xff\x00\xff\x00")
    elif fault == "delete":
        os.remove(path)
    else:
        with open(os.path.join(folder, checkpoint_files.MANIFEST), "w") as f:
            f.write("{not json")
    with pytest.raises(checkpoint_files.ChecksumError, match=message):
        checkpoint_files.verify(folder)


def test_without_a_file_list_orbax_errors_are_one_line(saved, mesh):
    """Checkpoints of older versions have no file list: Orbax's own failure, condensed to its first line."""
    folder = ckpt.step_path(saved, 3)
    os.remove(os.path.join(folder, checkpoint_files.MANIFEST))
    assert checkpoint_files.verify(folder) is False
    os.truncate(largest_file(folder), 10)
    with pytest.raises(ckpt.CheckpointError, match="could not restore") as info:
        ckpt.Checkpoints(saved, 1, read_only=True).restore(3, target(mesh))
    line = str(info.value)
    assert "\n" not in line and "tensorstore_spec" not in line and len(line) < 500, line


def test_first_line_unwraps_orbax_and_drops_the_tensorstore_spec():
    inner = ValueError('OUT_OF_RANGE: Error reading "w/0" [tensorstore_spec=\'{"driver": "zarr"}\']\nmore')
    try:
        try:
            raise inner
        except ValueError as e:
            raise Exception("Encountered error while reading array index") from e  # Orbax's wrapper
    except Exception as wrapper:  # noqa: BLE001 - the shape Orbax raises
        assert ckpt.first_line(wrapper) == 'ValueError: OUT_OF_RANGE: Error reading "w/0"'
        assert ckpt._storage_error(wrapper, ckpt.READ_ERRORS)
    assert not ckpt._storage_error(RuntimeError("a bug"), ckpt.READ_ERRORS)


# --- fallback, quarantine, exit codes


def test_latest_falls_back_and_moves_the_broken_one_aside(saved, mesh, caplog):
    os.truncate(largest_file(ckpt.step_path(saved, 3)), 100)
    run_checkpoints = ckpt.Checkpoints(saved, 1)
    resume = ckpt.resolve_resume("latest", os.path.dirname(saved))
    assert resume == (saved, 3)
    with caplog.at_level(logging.WARNING):
        source, step, (state, loader, _) = ckpt.restore_resume(resume, "latest", run_checkpoints, target(mesh))
    assert source is run_checkpoints and step == 2 and loader == {"position": 2}
    np.testing.assert_array_equal(np.asarray(state["w"]), np.full((64, 32), 2.0))
    (warning,) = warnings_of(caplog)
    assert "checkpoint_3" in warning and "truncated" in warning and "checkpoint_3.broken" in warning
    assert sorted(os.listdir(saved)) == ["checkpoint_1", "checkpoint_2", "checkpoint_3.broken"]
    assert run_checkpoints.all_steps() == [1, 2]
    run_checkpoints.save(3, state_of(mesh, 3.0), {"position": 3}, {})  # the step is saved again, the broken one kept
    run_checkpoints.close()
    assert sorted(os.listdir(saved)) == ["checkpoint_1", "checkpoint_2", "checkpoint_3", "checkpoint_3.broken"]


def test_explicit_broken_checkpoint_and_all_broken_are_usage_errors(saved, mesh):
    os.truncate(largest_file(ckpt.step_path(saved, 3)), 100)
    run_checkpoints = ckpt.Checkpoints(saved, 1)
    explicit = ckpt.resolve_resume(ckpt.step_path(saved, 3), "elsewhere")
    with pytest.raises(ckpt.UnrestorableCheckpointError, match="checkpoint_3: ChecksumError"):
        ckpt.restore_resume(explicit, ckpt.step_path(saved, 3), run_checkpoints, target(mesh))
    for step in (1, 2):
        os.remove(os.path.join(ckpt.step_path(saved, step), "state", "_METADATA"))
    with pytest.raises(ckpt.UnrestorableCheckpointError, match="none of the 3 checkpoints") as info:
        ckpt.restore_resume((saved, 3), "latest", run_checkpoints, target(mesh))
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(saved)) == ["checkpoint_1", "checkpoint_2", "checkpoint_3"]  # nothing moved or deleted


def test_latest_with_only_broken_checkpoints_never_starts_fresh(saved):
    for step in (1, 2, 3):
        os.rename(ckpt.step_path(saved, step), ckpt.step_path(saved, step) + ckpt.BROKEN_SUFFIX)
    with pytest.raises(ckpt.UnrestorableCheckpointError, match="only checkpoints that could not be restored"):
        ckpt.resolve_resume("latest", os.path.dirname(saved))


# --- failed saves


def test_a_failed_save_keeps_the_last_good_checkpoint_even_with_a_limit_of_one(tmp_path, mesh, monkeypatch):
    directory = str(tmp_path / "checkpoints")
    checkpoints = ckpt.Checkpoints(directory, 1, max_to_keep=1)
    checkpoints.save(1, state_of(mesh, 1.0), {"position": 1}, {})
    monkeypatch.setenv(faults.FAULTS_ENV, "save:2")
    checkpoints.save(2, state_of(mesh, 2.0), {"position": 2}, {})  # fails inside Orbax's commit, in the background
    with pytest.raises(ckpt.CheckpointSaveError, match="saving checkpoint 2 .* failed .*No space left") as info:
        checkpoints.wait()
    assert "\n" not in str(info.value) and "--resume_from_checkpoint latest" in str(info.value)
    checkpoints.close()  # after a failure: lets go without raising again
    assert ckpt.resolve_resume("latest", str(tmp_path)) == (os.path.abspath(directory), 1)
    state, loader, _ = ckpt.Checkpoints(directory, 1, read_only=True).restore(1, target(mesh))
    assert loader == {"position": 1} and float(state["w"][0, 0]) == 1.0


def test_fault_injection_reads_one_variable(monkeypatch):
    monkeypatch.setenv(faults.FAULTS_ENV, "save:30, grid")
    assert faults.injected("save", 30) and not faults.injected("save", 20) and not faults.injected("save")
    assert faults.injected("grid") and not faults.injected("upload")
    with pytest.raises(OSError, match="injected"):
        faults.fail_if_injected("grid")
    survivor = faults.Survivor()
    assert survivor.attempt("grid", "a grid", lambda: None) is False
    monkeypatch.delenv(faults.FAULTS_ENV)
    written = []
    assert survivor.attempt("grid", "a grid", lambda: written.append(1)) is True and written == [1]
    assert survivor.failures == {"grid": 1}


# --- the output-folder lock


def write_lock(folder, **holder):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": "then", "heartbeat": time.time(),
              "token": "other"}
    record.update(holder)
    (folder / run_lock.LOCK_NAME).write_text(json.dumps(record))


def test_lock_is_taken_refreshed_and_released(tmp_path):
    lock = run_lock.RunLock(str(tmp_path / "run"), heartbeat_s=0.05)
    lock.acquire()
    path = tmp_path / "run" / run_lock.LOCK_NAME
    first = json.loads(path.read_text())
    assert first["pid"] == os.getpid() and first["host"] == socket.gethostname()
    deadline = time.monotonic() + 60
    while json.loads(path.read_text())["heartbeat"] == first["heartbeat"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert json.loads(path.read_text())["heartbeat"] > first["heartbeat"]
    lock.release()
    assert not (tmp_path / "run" / run_lock.LOCK_NAME).exists()


def test_a_live_holder_stops_the_second_run_with_its_name(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(tmp_path, pid=holder.pid)
        with pytest.raises(run_lock.OutputDirLocked, match=f"in use by another run .*pid {holder.pid}"):
            run_lock.RunLock(str(tmp_path)).acquire()
        write_lock(tmp_path, host="another-host")  # another host, fresh heartbeat
        with pytest.raises(run_lock.OutputDirLocked, match="host another-host"):
            run_lock.RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()
        holder.wait()
    assert json.loads((tmp_path / run_lock.LOCK_NAME).read_text())["token"] == "other"  # untouched


@pytest.mark.parametrize("holder", ["dead_pid", "own_pid", "other_host_stale"])
def test_a_stale_lock_is_taken_over_with_one_line(tmp_path, caplog, holder):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    write_lock(tmp_path, **{"dead_pid": {"pid": int(gone.stdout)}, "own_pid": {},
                            "other_host_stale": {"host": "another-host", "heartbeat": time.time() - 1000}}[holder])
    lock = run_lock.RunLock(str(tmp_path))
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    lock.release()
    (line,) = warnings_of(caplog)
    assert "taking over the lock" in line and ("no heartbeat" in line if holder == "other_host_stale"
                                               else "no longer exists" in line)


def test_a_late_heartbeat_from_another_host_is_waited_for(tmp_path, caplog):
    write_lock(tmp_path, host="another-host", heartbeat=time.time() - 1.0)
    lock = run_lock.RunLock(str(tmp_path), heartbeat_s=0.2, stale_after_s=5.0)
    with caplog.at_level(logging.WARNING):
        lock.acquire()  # late (> 3 beats) but not stale: waits until it is
    lock.release()
    messages = warnings_of(caplog)
    assert len(messages) == 2 and "waiting up to" in messages[0] and "taking over" in messages[1]


def test_hold_releases_on_sigterm_and_restores_the_handler(tmp_path):
    import signal

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as info:
        with run_lock.hold(str(tmp_path)):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # interrupted by the handler
    assert info.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / run_lock.LOCK_NAME).exists() and signal.getsignal(signal.SIGTERM) is previous


def test_hold_releases_on_an_exception(tmp_path):
    with pytest.raises(RuntimeError):
        with run_lock.hold(str(tmp_path)):
            assert (tmp_path / run_lock.LOCK_NAME).exists()
            raise RuntimeError("the run failed")
    assert not (tmp_path / run_lock.LOCK_NAME).exists()


# --- what reaches the terminal


def test_library_chatter_is_filtered_and_our_warnings_are_not(capsys, monkeypatch):
    monkeypatch.delenv(console.LIBRARY_LOGS_ENV, raising=False)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])
    for name in ("absl", "asyncio"):
        monkeypatch.setattr(logging.getLogger(name), "filters", [])
    console.setup_logging()
    absl = logging.getLogger("absl")
    absl.warning("Given directory is read only=/x")
    try:
        raise ValueError("RESOURCE_EXHAUSTED")
    except ValueError:
        absl.exception("Save Finalize thread failed.")  # Orbax logs what it also raises
    absl.error("Failed to json parse Metadata file: /x\nfile content ...")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    logging.getLogger("jax_uncond.run.checkpoint").warning("could not restore /x/checkpoint_30: ...")
    err = capsys.readouterr().err
    assert err.splitlines() == ["ERROR: Failed to json parse Metadata file: /x",
                                "WARNING: could not restore /x/checkpoint_30: ..."], err


# --- Hub uploads


class FakeHub:
    def __init__(self, failures):
        self.failures = failures
        self.calls = []

    def upload_folder(self, **kwargs):
        self.calls.append(kwargs["commit_message"])
        if len(self.calls) <= self.failures:
            raise ConnectionError("the network went away")


def test_a_failed_upload_is_retried_in_the_background(monkeypatch, caplog):
    import huggingface_hub

    hub = FakeHub(failures=2)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    monkeypatch.setattr(uploads, "RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    hub_uploads = uploads.HubUploads("me/run", "/out", "token", ["checkpoints/*"])
    with caplog.at_level(logging.WARNING):
        hub_uploads.submit("Epoch 0")
        hub_uploads.close()
    assert hub.calls == ["Epoch 0"] * 3 and hub_uploads.failed == []
    assert sum("retrying" in r.getMessage() for r in caplog.records) == 2


def test_a_newer_upload_supersedes_a_waiting_retry(monkeypatch):
    import huggingface_hub

    hub = FakeHub(failures=1)
    monkeypatch.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
    monkeypatch.setattr(uploads, "RETRY_DELAYS_S", (600.0,))
    hub_uploads = uploads.HubUploads("me/run", "/out", "token", [])
    hub_uploads.submit("Epoch 0")
    while not hub.calls:
        time.sleep(0.01)
    hub_uploads.before_change()  # the pipeline folder is about to be rewritten: no 10-minute wait
    hub_uploads.submit("Epoch 1")
    hub_uploads.close()
    assert hub.calls == ["Epoch 0", "Epoch 1"] and hub_uploads.failed == []


def test_uploads_still_queued_at_the_end_are_named_with_the_command_and_never_block_the_exit(monkeypatch, caplog):
    import huggingface_hub

    release = threading.Event()
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: release.wait())
    hub_uploads = uploads.HubUploads("me/run", "/out", "token", ["checkpoints/*", ".*"])
    hub_uploads.submit("Epoch 9")
    hub_uploads.submit("End of training")
    with caplog.at_level(logging.WARNING):
        assert hub_uploads.close(timeout_s=0.2) == ["Epoch 9", "End of training"]
        assert hub_uploads.close() == []  # once
    (line,) = warnings_of(caplog)
    assert "'Epoch 9' (not done after 0s)" in line and "'End of training'" in line, line
    assert "`hf upload me/run /out --exclude 'checkpoints/*' --exclude '.*'`" in line, line
    assert all(t.daemon for t in threading.enumerate() if t.name == "jax_uncond-upload")  # the exit does not wait
    release.set()
    hub_uploads.before_change()  # both done before the fake Hub goes away


# --- processes agreeing (agreement.py) and watching each other (peers.py), simulated in this process


class FakeStore:
    """The key-value store of JAX's coordination service, as the processes of a run share it."""

    def __init__(self):
        self.values = {}

    def key_value_set(self, key, value, allow_overwrite=False):
        assert allow_overwrite or key not in self.values, key
        self.values[key] = value

    def blocking_key_value_get(self, key, timeout_ms):
        if key not in self.values:
            raise jax.errors.JaxRuntimeError(f"DEADLINE_EXCEEDED: GetKeyValue() timed out with key: {key}")
        return self.values[key]


@pytest.fixture
def two_processes(monkeypatch):
    """`as_process(i)` makes this process act as process i of 2, with its own count of exchanges."""
    import collections

    from jax_uncond.run import agreement, distributed

    store = FakeStore()
    monkeypatch.setattr(distributed, "coordination_client", lambda: store)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    counters = {0: collections.Counter(), 1: collections.Counter()}

    def as_process(i):
        monkeypatch.setattr(jax, "process_index", lambda: i)
        monkeypatch.setattr(agreement, "_uses", counters[i])

    return as_process


def test_a_start_up_error_on_one_process_stops_the_other_with_it(two_processes):
    from jax_uncond.errors import UsageError
    from jax_uncond.run import agreement

    two_processes(1)  # fails first, without waiting for process 0's answer
    with pytest.raises(UsageError, match="^no config.json$"), agreement.all_or_none("start-up"):
        raise UsageError("no config.json")
    two_processes(0)
    with pytest.raises(UsageError, match=r"^process 1 of 2: no config.json$"), agreement.all_or_none("start-up"):
        pass


def test_process_0_decides_and_the_others_follow_its_answer_or_its_refusal(two_processes):
    from jax_uncond.errors import UsageError
    from jax_uncond.run import agreement

    two_processes(0)
    assert agreement.on_process_0("resume", lambda: ["/ckpt", 20]) == ["/ckpt", 20]
    with pytest.raises(UsageError, match="newer"):
        agreement.on_process_0("resume", lambda: (_ for _ in ()).throw(UsageError("newer checkpoints (30)")))
    two_processes(1)
    assert agreement.on_process_0("resume", lambda: pytest.fail("process 1 decided")) == ["/ckpt", 20]
    with pytest.raises(UsageError, match=r"^process 0 of 2: newer checkpoints \(30\)$"):
        agreement.on_process_0("resume", lambda: pytest.fail("process 1 decided"))



def test_the_watchdog_finds_a_lost_process_and_follows_a_stopped_one():
    from jax_uncond.run import peers

    watch = peers.Watch(beat_s=2.0, lost_after_s=20.0)
    watch.index, watch.count = 0, 4
    watch._changed = {p: (None, 0.0, 0) for p in (1, 2, 3)}

    def look(now, **states):
        watch._update({int(p[1:]): s for p, s in states.items()}, now)
        return watch._judge(now)

    assert look(2.0, p1="beat 1", p2="beat 1", p3="beat 1") is None
    assert look(12.0, p1="beat 2", p2="done 2", p3="beat 2") is None  # process 2 ended and waits for the rest
    assert look(30.0, p1="beat 2", p2="done 3", p3="beat 3") is None
    why, cause = look(33.0, p1="beat 2", p2="done 4", p3="beat 4")
    assert why == cause == "process 1 of 4 is lost: no heartbeat for 21s (killed, crashed or its host is down)"
    watch._changed[1] = ("beat 4", 33.0, 4)
    assert look(34.0, p1="beat 5", p2="done 5", p3="stop saving checkpoint 30 failed") is None  # first look: wait
    assert look(36.0, p1="beat 6", p2="done 6", p3="stop saving checkpoint 30 failed") == (
        "process 3 of 4 stopped (saving checkpoint 30 failed)", "saving checkpoint 30 failed")
