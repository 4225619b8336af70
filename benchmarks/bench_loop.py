"""Host-loop overhead: the real `train()` loop against the bare compiled step, per step.

A UNet small enough that its step takes about a millisecond on a CPU trains for --steps steps in
`jax_uncond.run.loop.train` (metrics fetch, non-finite check, TensorBoard logging every
--logging_steps, progress bar, throughput report, checkpoint and epoch checks; sampling and saving
stay out: no epoch ends inside the window, checkpoints are due only after it), and then the same
compiled program runs as a bare `for` loop over the same batches. Rounds alternate (loop, bare, loop,
bare, ...). Per round: the median wall time between steps in its steady part (the first tenth left
out) and the process's CPU time per step (all threads); overhead = loop / bare - 1, the median over
rounds. On a busy shared machine both swing with the load, so the loop's own host work is measured
too: the same two loops around a stand-in step that returns at once, as main-thread CPU time per
step (loop minus bare), and shown as a share of the real step's wall time.

    python benchmarks/bench_loop.py                       # --logging_steps as the flag defaults it
    python benchmarks/bench_loop.py --logging_steps 1     # the PyTorch script's every-step logging
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_uncond import xla_flags  # noqa: E402

xla_flags.apply()  # as train_flax.py does
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jax_uncond.training import sharding  # noqa: E402

from jax_uncond.run import metrics  # noqa: E402
from jax_uncond.training.config import parse_args  # noqa: E402
from jax_uncond.run import loop as loop_module  # noqa: E402
from jax_uncond.run.loop import build_model, build_scheduler, train  # noqa: E402
from jax_uncond.training.optim import make_optimizer  # noqa: E402
from jax_uncond.run.outputs import RunOutputs  # noqa: E402
from jax_uncond.training.state import make_init_fn  # noqa: E402
from jax_uncond.training.step import StepConfig, compile_train_step, make_train_step  # noqa: E402

MICRO_UNET = {"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": (8, 8),
              "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D"),
              "norm_num_groups": 4, "sample_size": 8}
"""About a millisecond per training step at 8x8, batch 4, on a CPU core."""


class TimedLoader:
    """The loader interface over a few device-resident batches; notes when each batch is taken."""

    skipped_files = 0

    def __init__(self, batches: list[dict[str, jax.Array]], steps_per_epoch: int):
        self.batches, self.steps_per_epoch = batches, steps_per_epoch
        self.num_examples = steps_per_epoch * batches[0]["images"].shape[0]
        self.position, self.marks = 0, []

    def get_state(self) -> dict:
        return {"position": self.position}

    def set_state(self, state: dict) -> None:
        self.position = state["position"]

    def __iter__(self):
        while True:
            self.marks.append(clocks())
            batch = self.batches[self.position % len(self.batches)]
            self.position += 1
            yield batch


class NoEpochOutputs(RunOutputs):
    """RunOutputs with the end-of-run sample grid and pipeline folder left out (not per-step work)."""

    def epoch_end(self, epoch: int, params, last: bool, step: int | None = None) -> None:
        return None


class InstantStep:
    """A stand-in for the compiled step that returns at once: the state unchanged and fresh metric arrays,
    so that what remains of a loop's time per step is its own host work."""

    def __init__(self, metrics: dict[str, jax.Array], steps: int):
        host = {k: np.asarray(v) for k, v in metrics.items()}
        self.outputs = iter([{k: jax.device_put(v) for k, v in host.items()} for _ in range(steps + 1)])

    def __call__(self, state, batch):
        return state, next(self.outputs)


def clocks() -> tuple[float, float, float]:
    """(wall, process CPU, this thread's CPU) seconds."""
    return time.perf_counter(), time.process_time(), time.thread_time()


def per_step(marks: list[tuple[float, float, float]]) -> np.ndarray:
    """[median wall seconds between steps, process CPU seconds per step, main-thread CPU seconds per step]
    over the steady part of a round (the first tenth, compilation and warm-up, left out)."""
    steady = np.asarray(marks[len(marks) // 10:])
    return np.array([np.median(np.diff(steady[:, 0])), *((steady[-1, 1:] - steady[0, 1:]) / (len(steady) - 1))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--logging_steps", type=int, help="the loop's --logging_steps (default: the flag's)")
    args = parser.parse_args()
    out_dir = tempfile.mkdtemp(prefix="bench_loop_")
    metrics.enable_compilation_cache(os.path.join(out_dir, "xla"))  # later rounds' compiles are cache hits
    flags = ["--resolution", "8", "--global_batch_size", str(args.batch), "--use_ema", "--max_train_steps",
             str(args.steps), "--checkpointing_steps", str(10 * args.steps), "--output_dir", out_dir]
    if args.logging_steps:
        flags += ["--logging_steps", str(args.logging_steps)]
    config = dataclasses.replace(parse_args(flags), unet=dict(MICRO_UNET))
    mesh = sharding.make_mesh(jax.local_devices()[:1])
    rng = np.random.default_rng(0)
    batches = [{"images": jax.device_put(rng.uniform(-1, 1, (args.batch, 3, 8, 8)).astype(np.float32),
                                         sharding.batch_sharding(mesh))} for _ in range(4)]
    model, scheduler = build_model(config), build_scheduler(config)
    optimizer, schedule = make_optimizer(config, args.steps, model)
    init_key, step_key = jax.random.split(jax.random.key(config.seed))
    step_fn = make_train_step(model, scheduler, scheduler.create_state(), optimizer, schedule,
                              StepConfig.from_config(config), step_key, mesh)
    state = jax.jit(make_init_fn(config, model, optimizer, init_key), out_shardings=sharding.replicated(mesh))()
    compiled, _, lowered = compile_train_step(step_fn, state, batches[0], mesh)
    holder = {"state": state}
    _, sample_metrics = compiled(jax.tree.map(jax.numpy.copy, state), batches[0])

    def loop_round(name: str, instant: bool) -> np.ndarray:
        round_config = dataclasses.replace(config, output_dir=os.path.join(out_dir, name))
        loader = TimedLoader(batches, steps_per_epoch=10 * args.steps)
        if instant:
            loop_module.compile_train_step = lambda *_: (InstantStep(sample_metrics, args.steps), 0.0, lowered)
        try:
            train(round_config, model, scheduler, mesh, loader,
                  NoEpochOutputs(round_config, model, scheduler, mesh), args.batch, None)
        finally:
            loop_module.compile_train_step = compile_train_step
        return per_step(loader.marks)

    def bare_round(instant: bool) -> np.ndarray:
        call = InstantStep(sample_metrics, args.steps) if instant else compiled
        marks = []
        for i in range(args.steps):
            marks.append(clocks())
            holder["state"], out = call(holder["state"], batches[i % len(batches)])
        jax.block_until_ready(out)
        return per_step(marks)

    results = {(kind, instant): [] for kind in ("loop", "bare") for instant in (False, True)}
    for index in range(args.rounds):
        for instant in (False, True):
            results["loop", instant].append(loop_round(f"round{index}{'i' * instant}", instant))
            results["bare", instant].append(bare_round(instant))
    median = {key: np.median(np.stack(values), axis=0) for key, values in results.items()}
    print(f"micro UNet {MICRO_UNET['block_out_channels']} at 8x8, batch {args.batch}, EMA on, "
          f"--logging_steps {config.logging_steps}; {args.rounds} rounds of {args.steps} steps on "
          f"{jax.local_devices()[0].device_kind}; medians over rounds")
    bare, loop = median["bare", False], median["loop", False]
    for i, what in enumerate(("wall time", "CPU time (process)")):
        overheads = [lo[i] / ba[i] - 1 for lo, ba in zip(results["loop", False], results["bare", False])]
        print(f"{what:>18} per step: bare step {1e3 * bare[i]:.3f} ms, train() loop {1e3 * loop[i]:.3f} ms: "
              f"overhead {100 * np.median(overheads):+.1f}% (rounds: {', '.join(f'{100 * o:+.1f}%' for o in overheads)})")
    host = median["loop", True][2] - median["bare", True][2]
    print(f"the loop's own host work (main-thread CPU time, instant step): {1e6 * host:.1f} us per step = "
          f"{100 * host / bare[0]:.1f}% of the bare step's wall time")


if __name__ == "__main__":
    main()
