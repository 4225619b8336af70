"""Hub uploads of the output folder in one background thread, each retried with backoff, never fatal.

The Hub or the network failing must not cost a training run: a failed upload is retried after
`RETRY_DELAYS_S` (one warning per failed attempt); when the run is about to rewrite the folder, a
retry still waiting is dropped, since the next upload carries the newer files; an upload that fails
every attempt is reported with the command that uploads the folder by hand.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Sequence

from jax_uncond.run.faults import fail_if_injected

RETRY_DELAYS_S = (5.0, 30.0, 120.0)
"""Seconds to wait before the 2nd, 3rd and 4th attempt of an upload."""

logger = logging.getLogger(__name__)


class HubUploads:
    """`upload_folder` of one folder to one repository, one upload at a time, in the background."""

    def __init__(self, repo_id: str, folder: str, token: str, ignore_patterns: Sequence[str]):
        self.repo_id = repo_id
        self.folder = folder
        self._token = token
        self._ignore_patterns = list(ignore_patterns)
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jax_uncond-upload")
        self._pending: list[concurrent.futures.Future] = []
        self._superseded = threading.Event()
        self.failed: list[str] = []

    def submit(self, message: str) -> None:
        """Starts uploading the folder as a commit with `message`; returns at once."""
        self._superseded.clear()
        self._pending.append(self._pool.submit(self._upload, message))

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
                                   "locally: upload them with `hf upload %s %s`", message, self.repo_id, attempts,
                                   cause, self.repo_id, self.folder)

    def before_change(self) -> None:
        """Call before the folder's files change: waits for an upload in progress, drops waiting retries."""
        self._superseded.set()
        self._wait()

    def _wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def close(self) -> None:
        """Waits for every upload, retries included."""
        self._wait()
        self._pool.shutdown(wait=True)
