"""`--profile_steps START:END`: a `jax.profiler` trace of a window of optimizer steps.

The trace goes to the run's TensorBoard folder (`{output_dir}/{logging_dir}/plugins/profile/<time>/`),
where TensorBoard's profile plugin finds it, with a `perfetto_trace.json.gz` beside it for
https://ui.perfetto.dev. Off (no window) it costs one comparison per step.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from jax_uncond.training.config import profile_window


class StepProfiler:
    """Traces optimizer steps START .. END-1 (0-based: the step run when `step` of them are done)."""

    def __init__(self, spec: str | None, logdir: str):
        self.start, self.end = profile_window(spec) if spec is not None else (-1, -1)
        self.logdir = logdir
        self.active = False
        self._annotation: Any = None

    def before(self, step: int) -> None:
        """Call before running step number `step` (0-based)."""
        if self.start <= step < self.end and not self.active:
            os.makedirs(self.logdir, exist_ok=True)
            jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
            self.active = True
        if self.active:
            self._annotation = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self._annotation.__enter__()

    def after(self, step: int, state: Any) -> str | None:
        """Call once `step` steps are done (after dispatching the last); returns a line to print when the trace
        was written."""
        if not self.active:
            return None
        self._annotation.__exit__(None, None, None)
        if step < self.end:
            return None
        return self.stop(state)

    def stop(self, state: Any = None) -> str | None:
        """End the trace, after the traced steps have finished on the devices when `state` (their output) is
        given; returns the line to print, or None when no trace was running."""
        if not self.active:
            return None
        if state is not None:
            jax.block_until_ready(state)
        jax.profiler.stop_trace()
        self.active = False
        return (f"profile of steps {self.start}-{self.end - 1} written to {self.logdir} (tensorboard --logdir "
                f"{self.logdir}, Profile tab; or perfetto_trace.json.gz in ui.perfetto.dev)")
