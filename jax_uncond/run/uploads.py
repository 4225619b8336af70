"""Hub uploads of the output folder in one background thread, each retried with backoff, never fatal.

The Hub or the network failing must not cost a training run: a failed upload is retried after
`RETRY_DELAYS_S` (one warning per failed attempt); when the run is about to rewrite the folder, a
retry still waiting is dropped, since the next upload carries the newer files; an upload that fails
every attempt is reported with the command that uploads the folder by hand. However the run ends
(normally, by SIGTERM or by an error), it waits up to `FINAL_WAIT_S` for the uploads still queued, and
names in one line those that did not complete, with that command: nothing is dropped silently. The
thread is a daemon, so an upload that hangs never keeps the process from exiting.
"""

from __future__ import annotations

import logging
import queue
import shlex
import threading
from typing import Sequence

from jax_uncond.run.faults import fail_if_injected

RETRY_DELAYS_S = (5.0, 30.0, 120.0)
"""Seconds to wait before the 2nd, 3rd and 4th attempt of an upload."""
FINAL_WAIT_S = 60.0
"""How long the end of a run waits for the uploads still queued (below JAX's shutdown timeout, which the other
processes of a multi-host run wait in meanwhile; `distributed.SHUTDOWN_TIMEOUT_S`)."""

logger = logging.getLogger(__name__)


class HubUploads:
    """`upload_folder` of one folder to one repository, one upload at a time, in the background."""

    def __init__(self, repo_id: str, folder: str, token: str, ignore_patterns: Sequence[str]):
        self.repo_id = repo_id
        self.folder = folder
        self._token = token
        self._ignore_patterns = list(ignore_patterns)
        self._queue: queue.Queue[str] = queue.Queue()
        self._unfinished: list[str] = []  # submitted, neither uploaded nor given up yet
        self._idle = threading.Condition()
        self._superseded = threading.Event()
        self.failed: list[str] = []
        self._closed = False
        threading.Thread(target=self._work, name="jax_uncond-upload", daemon=True).start()

    def command(self) -> str:
        """The command that uploads the folder by hand, as the run does (checkpoints and hidden files left out)."""
        excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in self._ignore_patterns)
        return f"hf upload {self.repo_id} {shlex.quote(self.folder)} {excludes}".strip()

    def submit(self, message: str) -> None:
        """Starts uploading the folder as a commit with `message`; returns at once."""
        self._superseded.clear()
        with self._idle:
            self._unfinished.append(message)
        self._queue.put(message)

    def _work(self) -> None:
        while True:
            message = self._queue.get()
            self._upload(message)
            with self._idle:
                self._unfinished.remove(message)
                self._idle.notify_all()

    def _upload(self, message: str) -> None:
        import huggingface_hub
        from huggingface_hub.errors import HTTPError

        attempts = len(RETRY_DELAYS_S) + 1
        for attempt, delay in enumerate((0.0, *RETRY_DELAYS_S), start=1):
            if delay and self._superseded.wait(delay):
                return  # the folder changed: the next upload carries it
            try:
                fail_if_injected("upload")
                huggingface_hub.upload_folder(repo_id=self.repo_id, folder_path=self.folder, commit_message=message,
                                              ignore_patterns=self._ignore_patterns, token=self._token)
                return
            except (HTTPError, OSError) as e:
                cause = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if attempt < attempts:
                    logger.warning("upload %r to the Hub repository %s failed (attempt %d of %d, %s); retrying in "
                                   "%.0fs in the background", message, self.repo_id, attempt, attempts, cause,
                                   RETRY_DELAYS_S[attempt - 1])
                else:
                    self.failed.append(message)
                    logger.warning("upload %r to the Hub repository %s failed %d times (%s); the files are saved "
                                   "locally: upload them with `%s`", message, self.repo_id, attempts, cause,
                                   self.command())

    def before_change(self) -> None:
        """Call before the folder's files change: waits for an upload in progress, drops waiting retries."""
        self._superseded.set()
        with self._idle:
            self._idle.wait_for(lambda: not self._unfinished)

    def close(self, timeout_s: float = FINAL_WAIT_S) -> list[str]:
        """Waits up to `timeout_s` for every upload, retries included; returns those not uploaded (failed, or still
        queued), named in one warning with the command that uploads the folder later. Idempotent."""
        if self._closed:
            return []
        self._closed = True
        with self._idle:
            self._idle.wait_for(lambda: not self._unfinished, timeout=timeout_s)
            pending = list(self._unfinished)
        missing = [*self.failed, *pending]
        if missing:
            named = [f"{m!r} (failed)" for m in self.failed] + [f"{m!r} (not done after {timeout_s:.0f}s)"
                                                               for m in pending]
            logger.warning("not uploaded to the Hub repository %s: %s; the output folder holds the files: upload them "
                           "later with `%s`", self.repo_id, ", ".join(named), self.command())
        return missing
