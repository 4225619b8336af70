"""The processes of a multi-host run watching each other, so that none waits forever for one that is gone.

Each process runs a watchdog thread that writes a heartbeat into the key-value store of JAX's
coordination service every BEAT_S seconds and reads the others'. It stops this process with one line
and exit code 1 when another process
- is lost: its heartbeat has not changed for LOST_AFTER_S (SIGKILL, a crash, a host gone), or
- stops with an error of its own, which it writes into the store before it leaves.
A process whose main thread fails writes its error there the same way, for the others to follow.

Why a thread of our own: JAX notices a lost process only after its heartbeat timeout, and then ends every
other process from native code (SIGABRT, a stack trace, no word of which process was lost). A process
that stops leaves through os._exit, because JAX's exit handler would wait in a shutdown barrier for the
processes that are gone and then abort. Process 0 hosts JAX's coordination service, so it leaves last,
once the others have said they are leaving or are lost. When process 0 itself dies, JAX ends the others at
once from native code, which no Python hook can prevent (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Iterator

import jax

from jax_uncond.errors import RunError, UsageError
from jax_uncond.run import distributed

BEAT_S = 2.0
LOST_AFTER_S = 20.0
"""A process whose heartbeat has not changed for this long is lost; JAX's own heartbeat timeout is 3x longer."""
MAIN_GRACE_S = 10.0
"""How long a stopping process waits for its main thread to print its error line before it leaves anyway."""
SETTLE_S = 1.0
"""Process 0's pause between the others saying they leave and its own exit (which ends JAX's service)."""
KEY = "jax_uncond/peers/"
AFTERWARDS = "the completed checkpoints are intact: restart every process with --resume_from_checkpoint latest"

logger = logging.getLogger(__name__)


class Watch:
    """This process's watchdog over the others (inactive in a single-process run).

    States in the store, one key per process: `beat N` (its heartbeat), `done N` (the heartbeat of a process
    that ended normally and waits for the others to end), `stop LINE` (stopping with an error) and `gone LINE`
    (about to exit).
    """

    def __init__(self, beat_s: float = BEAT_S, lost_after_s: float = LOST_AFTER_S):
        self.index = jax.process_index()
        self.count = jax.process_count()
        self.beat_s = beat_s
        self.lost_after_s = lost_after_s
        self._client: Any = None
        self._cleanups: list[Callable[[], Any]] = []
        self._ending: tuple[int, str] | None = None  # (exit code, line) once this process stops
        self._ending_lock = threading.Lock()
        self._changed: dict[int, tuple[str | None, float, int]] = {}  # process -> (state, when it changed, changes)
        self._rounds = threading.Condition()
        self._wake = threading.Event()
        self._finished = threading.Event()
        self._done = False  # this process ended normally: its heartbeat says `done`
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    def at_stop(self, cleanup: Callable[[], Any]) -> None:
        """`cleanup()` runs when the watchdog stops this process (the last uploads, then the lock's release: the
        last registered runs first, as `with` blocks unwind)."""
        self._cleanups.append(cleanup)

    def start(self) -> None:
        if self.count == 1:
            return
        self._client = distributed.coordination_client()
        now = time.monotonic()
        self._changed = {p: (None, now, 0) for p in range(self.count) if p != self.index}
        self._publish("beat 0")
        self._thread = threading.Thread(target=self._watch, name="jax_uncond-peers", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """This process ended normally: it says so and waits for the others to end too, the watchdog still
        watching (a process lost or failed meanwhile, e.g. process 0 in its last save or upload, stops this one
        with its line, where JAX's shutdown barrier would abort it). Then the watchdog stops."""
        if not self.active:
            return
        self._done = True
        self._publish("done 0")  # now: the watchdog may stop before its next heartbeat, once the others are done
        with self._rounds:
            self._rounds.wait_for(lambda: all((state or "").startswith("done ") for state, _, _ in
                                              self._changed.values()), timeout=distributed.SHUTDOWN_TIMEOUT_S)
        self._finished.set()
        self._wake.set()
        self._thread.join()

    def failed(self, error: BaseException) -> None:
        """This process's main thread failed with `error`. Unless another process is the cause (then the
        watchdog ends this one meanwhile, with that process's line), the others learn of it, and this
        process leaves once its main thread has printed the error (exit code 2 for a usage error, else 1)."""
        if not self.active:
            return
        if not isinstance(error, UsageError):  # a start-up decision is taken by all; anything else may be a symptom
            self._await_peers()
        code = 2 if isinstance(error, UsageError) else 1
        text = str(error) if isinstance(error, (UsageError, RunError)) else f"{type(error).__name__}: {error}"
        if not self._end(code, (text.strip().splitlines() or [""])[0]):
            threading.Event().wait(MAIN_GRACE_S + self.lost_after_s)  # the watchdog is ending this process
        self._wake.set()

    def _await_peers(self) -> None:
        """Waits until every other process has beaten twice more (so this error is this process's own), or
        for the watchdog to end this process (a process lost or stopping)."""
        def alive() -> bool:
            states = [(self._changed[p][0] or "", self._changed[p][2] >= n) for p, n in wanted.items()]
            return all(beaten and not state.startswith(("stop ", "gone ")) for state, beaten in states)

        with self._rounds:
            wanted = {p: changes + 2 for p, (_, _, changes) in self._changed.items()}
            self._rounds.wait_for(alive, timeout=self.lost_after_s + 3 * self.beat_s)

    def _publish(self, state: str) -> None:
        with contextlib.suppress(Exception):  # the service gone: JAX ends this process itself
            self._client.key_value_set(f"{KEY}{self.index}", state, allow_overwrite=True)

    def _states(self) -> dict[int, str] | None:
        try:
            return {int(k.rsplit("/", 1)[1]): v for k, v in self._client.key_value_dir_get(KEY)}
        except Exception:  # noqa: BLE001 - the service unreachable: judged by how long it lasts
            return None

    def _watch(self) -> None:
        beat, contact = 0, time.monotonic()
        while True:
            self._wake.wait(self.beat_s)
            self._wake.clear()
            if self._finished.is_set():
                return
            if self._ending is not None:  # the main thread failed: leave once it has said why
                self._leave(wait_for_main=True)
            beat += 1
            self._publish(f"{'done' if self._done else 'beat'} {beat}")
            states, now = self._states(), time.monotonic()
            if states is not None:
                contact = now
                self._update(states, now)
                verdict = self._judge(now)
            elif now - contact > self.lost_after_s:
                lost = f"lost contact with process 0 (JAX's coordination service) for {now - contact:.0f}s"
                verdict = (lost, lost)
            else:
                verdict = None
            if verdict is not None:
                self._stop(*verdict)

    def _update(self, states: dict[int, str], now: float) -> None:
        """Notes which processes' states changed (their heartbeat, or a new state) since the last look."""
        with self._rounds:
            for p, (seen, _, changes) in self._changed.items():
                if states.get(p) != seen:
                    self._changed[p] = (states.get(p), now, changes + 1)
            self._rounds.notify_all()

    def _judge(self, now: float) -> tuple[str, str] | None:
        """(why this process must stop, the cause to pass on), or None while the others are well."""
        for p, (state, since, _) in self._changed.items():
            # Followed once seen at two looks: a start-up error reaches the others through `agreement` first.
            if state is not None and state.startswith(("stop ", "gone ")) and since < now:
                return f"process {p} of {self.count} stopped ({state[5:]})", state[5:]
            if now - since > self.lost_after_s:
                lost = (f"process {p} of {self.count} is lost: no heartbeat for {now - since:.0f}s (killed, crashed "
                        "or its host is down)")
                return lost, lost
        return None

    def _end(self, code: int, cause: str) -> bool:
        """Marks this process as stopping because of `cause` and tells the others; False if it already was."""
        with self._ending_lock:
            if self._ending is not None:
                return False
            self._ending = (code, cause)
        self._publish(f"stop {cause}")
        return True

    def _stop(self, why: str, cause: str) -> None:
        """Ends this process from the watchdog: one line saying `why`, the cleanups, then leave with exit code 1.
        The others learn `cause` (the lost or failed process, not this one's following it)."""
        if not self._end(1, cause):
            return
        from tqdm import tqdm

        tqdm.write(f"{os.path.basename(sys.argv[0])}: error: {why}; this process stops too; {AFTERWARDS}",
                   file=sys.stderr)
        for cleanup in reversed(self._cleanups):
            try:
                cleanup()
            except Exception as e:  # noqa: BLE001 - the process is leaving; the others still run
                logger.warning("while stopping: %s: %s", type(e).__name__, e)
        self._leave(wait_for_main=False)

    def _leave(self, wait_for_main: bool) -> None:
        """Says so in the store and exits; process 0 first waits for the others to go (or be lost)."""
        code, line = self._ending
        if wait_for_main:
            threading.main_thread().join(MAIN_GRACE_S)
        if self.index == 0:
            self._await_departures()
        else:
            self._publish(f"gone {line}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    def _await_departures(self) -> None:
        """Until every other process has left (said `gone`) or is lost, at most as long as that takes."""
        deadline = time.monotonic() + self.lost_after_s + MAIN_GRACE_S + 2 * self.beat_s
        while time.monotonic() < deadline:
            states, now = self._states(), time.monotonic()
            if states is None:
                return
            self._update(states, now)
            if all((state or "").startswith("gone ") or now - since > self.lost_after_s
                   for state, since, _ in self._changed.values()):
                time.sleep(SETTLE_S)
                return
            time.sleep(self.beat_s / 4)


@contextlib.contextmanager
def watching() -> Iterator[Watch]:
    """Runs the block under the watchdog (multi-process runs): an error in the block is reported to the others
    (`Watch.failed`), a normal end too (`Watch.finish`)."""
    watch = Watch()
    watch.start()
    try:
        yield watch
    except BaseException as e:
        watch.failed(e)
        raise
    watch.finish()
