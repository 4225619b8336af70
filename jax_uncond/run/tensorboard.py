"""TensorBoard event files written in the calling thread, so a failed write is an OSError the run sees.

tensorboardX's `SummaryWriter` writes from a thread of its own: on a write error (a full disk) that
thread dies and every later event blocks once its queue of 10 is full, which hangs the training loop.
`EventWriter` has the part of SummaryWriter's interface the run uses and writes the same records
(tensorboardX's `Summary` protos, its event file name and format) synchronously, flushing every
`FLUSH_S` seconds and when asked.
"""

from __future__ import annotations

import os
import time

import numpy as np
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2
from tensorboardX.summary import image, scalar, text

FLUSH_S = 30.0


class EventWriter:
    """One `events.out.tfevents.*` file in `logdir`, as SummaryWriter names it."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self._events = EventsWriter(os.path.join(logdir, "events"))
        self._flushed = time.monotonic()

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        """Appends `summary` at `step` (raises OSError when the file cannot be written)."""
        self._events.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))
        if time.monotonic() - self._flushed > FLUSH_S:
            self.flush()

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._add(scalar(tag, value), step)

    def add_text(self, tag: str, text_string: str, step: int) -> None:
        self._add(text(tag, text_string), step)

    def add_images(self, tag: str, images: np.ndarray, step: int, dataformats: str = "NCHW") -> None:
        self._add(image(tag, images, dataformats=dataformats), step)

    def flush(self) -> None:
        self._flushed = time.monotonic()
        self._events.flush()

    def close(self) -> None:
        self._events.close()
