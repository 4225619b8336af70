"""One training process for the engine's subprocess tests: `python engine_worker.py DEVICES OUT_NPZ [FLAGS]`.

Runs the loop on DEVICES CPU devices (of this process) with the tiny UNet and in-memory data, then
writes the final state (process 0) to OUT_NPZ. `--signal_at kill:N[:K]` SIGKILLs itself when
fetching batch N once checkpoint K is complete; `--signal_at term:N` sends itself SIGTERM there.
"""

import os
import sys

devices, out_path, flags = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import signal  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from engine_parts import ArrayLoader, RecordingOutputs, build_parts, host_state, tiny_config  # noqa: E402
from jax_uncond.run import checkpoint as ckpt  # noqa: E402
from jax_uncond.run import distributed, metrics, pretrained  # noqa: E402
from jax_uncond.run.loop import train  # noqa: E402
from jax_uncond.training.sharding import make_mesh  # noqa: E402


class SignallingLoader(ArrayLoader):
    def __init__(self, *args, signal_at=None, output_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.signal_at = signal_at
        self.output_dir = output_dir

    def __iter__(self):
        for batch in super().__iter__():
            if self.signal_at is not None and self.position - 1 == self.signal_at[1]:
                if self.signal_at[0] == "kill":
                    wanted = ckpt.step_path(ckpt.checkpoints_dir(self.output_dir), self.signal_at[2])
                    deadline = time.time() + 120
                    while not os.path.isdir(wanted) and time.time() < deadline:
                        time.sleep(0.05)
                    os.kill(os.getpid(), signal.SIGKILL)
                else:
                    os.kill(os.getpid(), signal.SIGTERM)
            yield batch


def main():
    signal_at = None
    if "--signal_at" in flags:
        i = flags.index("--signal_at")
        kind, *numbers = flags[i + 1].split(":")
        signal_at = (kind, *map(int, numbers))
        del flags[i:i + 2]
    output_dir = flags[flags.index("--output_dir") + 1]
    config = tiny_config(output_dir, *flags)
    distributed.initialize(config)
    metrics.enable_compilation_cache()
    mesh = make_mesh()
    resume = ckpt.resolve_resume(config.resume_from_checkpoint, config.output_dir)
    config, source = pretrained.prepare(config, resume, print)  # as loop.run: --pretrained_model_name_or_path
    model, scheduler = build_parts(config)
    start = None if source is None else pretrained.load(source, model, config)
    loader = SignallingLoader(mesh, config.global_batch_size * config.gradient_accumulation_steps,
                              seed=config.seed, signal_at=signal_at, output_dir=config.output_dir)
    state = train(config, model, scheduler, mesh, loader, RecordingOutputs(), config.global_batch_size, resume, start)
    result = host_state(state)
    if jax.process_index() == 0:
        np.savez(out_path, **result)


if __name__ == "__main__":
    main()
