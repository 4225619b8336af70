"""One run per output folder: a lock file that a second run on the same `--output_dir` stops at.

`{output_dir}/.jax_uncond_run.lock` holds the holder's host, process id, start time and a heartbeat
that a background thread refreshes every `HEARTBEAT_S` seconds. It is created with O_CREAT|O_EXCL
(atomic on local disks and NFS), by process 0 only in a multi-host run; the other processes learn the
outcome from it. A run that finds the lock held stops before it writes anything, with one line naming
the holder (exit code 2). A lock whose holder is gone is taken over with one line: on the same host
when its process no longer exists (or is this very process id, left over from a container restart),
on another host when its heartbeat is older than `STALE_AFTER_S` (hosts' clocks are assumed to agree
within seconds); a lock whose heartbeat is merely late is waited on until it is fresh again or stale.
The lock is released when the run ends, also by an exception or SIGTERM; after SIGKILL the next run
takes it over. `python -m jax_uncond.export` and `jax_uncond.sample` only read, and take no lock.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_uncond.errors import UsageError
from jax_uncond.run.outputs import output_dir_check

LOCK_NAME = ".jax_uncond_run.lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0
"""A lock from another host whose heartbeat is older than this is taken over."""

logger = logging.getLogger(__name__)


class OutputDirLocked(UsageError):
    """Another run holds the output folder: one line naming it, exit code 2."""


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _describe(holder: dict[str, Any], now: float) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}, "
            f"last heartbeat {now - float(holder.get('heartbeat', 0)):.0f}s ago")


class RunLock:
    """The lock file of one output folder, held by this process once `acquire` returns."""

    def __init__(self, output_dir: str, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.token = uuid.uuid4().hex
        self._started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "started": self._started, "heartbeat": time.time(),
                "token": self.token}

    def _read(self) -> dict[str, Any] | None:
        """The lock's content; None when there is no lock file. A file being written reads as {}."""
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self._record(), f)
        return True

    def _why_stale(self, holder: dict[str, Any], now: float) -> str | None:
        """Why the holder is gone, or None while it may still be running."""
        age = now - float(holder.get("heartbeat", 0))
        if holder.get("host") == self.host:
            pid = int(holder.get("pid", -1))
            if pid == self.pid or not _process_exists(pid):
                return "its process no longer exists"
        if age > self.stale_after_s:
            return f"it has sent no heartbeat for {age:.0f}s (more than {self.stale_after_s:.0f}s)"
        return None

    def acquire(self) -> None:
        """Takes the lock, takes over a stale one (one line), or raises OutputDirLocked naming the holder."""
        output_dir_check(self.output_dir)
        os.makedirs(self.output_dir, exist_ok=True)
        waited = False
        while not self._create():
            holder = self._read()
            if holder is None:
                continue  # released between our two calls: try again
            now = time.time()
            if not holder:  # being written right now, or left empty by a crash: judge it by its age
                holder = {"heartbeat": os.path.getmtime(self.path)}
            why = self._why_stale(holder, now)
            if why is not None:
                if self._read() == holder or holder.keys() == {"heartbeat"}:
                    logger.warning("taking over the lock of --output_dir %s from a run that is gone (%s): %s",
                                   self.output_dir, _describe(holder, now), why)
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(self.path)
                continue
            late = now - float(holder.get("heartbeat", 0)) > 3 * self.heartbeat_s
            if holder.get("host") != self.host and late:
                if not waited:
                    logger.warning("--output_dir %s is locked by a run whose heartbeat is late (%s); waiting up to "
                                   "%.0fs for it to resume or go stale", self.output_dir, _describe(holder, now),
                                   self.stale_after_s)
                    waited = True
                time.sleep(min(self.heartbeat_s, 5.0))
                continue
            raise OutputDirLocked(f"--output_dir {self.output_dir} is in use by another run ({_describe(holder, now)}; "
                                  f"lock file {self.path}): wait for it to finish, or use another --output_dir")
        self._thread = threading.Thread(target=self._beat, name="jax_uncond-run-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Refreshes the heartbeat until released; stops (with one warning) if another run took the lock."""
        while not self._stop.wait(self.heartbeat_s):
            holder = self._read()
            if holder is None or holder.get("token") != self.token:
                logger.warning("the lock of --output_dir %s was taken over by another run (%s); two runs may now "
                               "write there", self.output_dir, "no lock file" if holder is None
                               else _describe(holder, time.time()))
                return
            temporary = f"{self.path}.{self.token}"
            try:
                with open(temporary, "w") as f:
                    json.dump(self._record(), f)
                os.replace(temporary, self.path)
            except OSError as e:  # a full disk or a network file system hiccup: try again next beat
                logger.debug("lock heartbeat not written: %s", e)

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._read()
        if holder and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def hold(output_dir: str) -> Iterator[RunLock | None]:
    """Holds the lock of `output_dir` for the block (process 0 takes it; every process stops with
    OutputDirLocked if it is held). Until the training loop installs its own handler, SIGTERM ends the
    run through SystemExit, so the lock is released on the way out."""
    lock = RunLock(output_dir) if jax.process_index() == 0 else None
    error: UsageError | None = None
    if lock is not None:
        try:
            lock.acquire()
        except UsageError as e:
            error = e
    if jax.process_count() > 1:
        ok = bool(multihost_utils.broadcast_one_to_all(np.asarray(int(error is None), np.int32)))
        if error is None and not ok:
            error = OutputDirLocked(f"--output_dir {output_dir}: process 0 could not take its lock (see its message)")
    if error is not None:
        raise error
    previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        yield lock
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()
