"""The run: resolve the model, build the mesh, state and loader, then step, log, checkpoint and export.

`run(config)` is what `train_flax.py` calls. `train(...)` is the loop itself, given its parts, so
tests can drive it with a tiny model and in-memory data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jax_uncond.console import say
from jax_uncond.errors import RunError, UsageError
from jax_uncond.run import checkpoint as ckpt
from jax_uncond.run import agreement, distributed, metrics, peers, pretrained, run_lock
from jax_uncond.run.profiling import StepProfiler
from jax_uncond.training import sharding
from jax_uncond.training.config import TrainConfig, to_dict
from jax_uncond.training.program import train_program
from jax_uncond.training.state import TrainState
from jax_uncond.training.step import compile_train_step

if TYPE_CHECKING:
    from jax_uncond.evaluation.fid import FidEvaluator

SEED_UNET_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (128, 128, 256, 256, 512, 512),
    "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
}
"""diffusers' train_unconditional.py UNet (sample_size = --resolution)."""

COMPUTE_DTYPES = {"no": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


class NonFiniteError(RunError):
    """Too many consecutive steps had a non-finite loss or gradient; the run stopped (one line, exit code 1)."""


def unet_config(config: Any) -> dict[str, Any]:
    """The UNet2DModel config: the preset's `unet`, --model_config_name_or_path, else the seed example's."""
    if config.unet is not None:
        return dict(config.unet)
    if config.model_config_name_or_path is None:
        return {**SEED_UNET_CONFIG, "sample_size": config.resolution}
    path = config.model_config_name_or_path
    if os.path.isdir(path):
        candidates = [os.path.join(path, "config.json"), os.path.join(path, "unet", "config.json")]
        found = [c for c in candidates if os.path.isfile(c)]
        if not found:
            raise UsageError(f"--model_config_name_or_path {path}: no config.json (or unet/config.json) in it")
        path = found[0]
    elif not os.path.isfile(path):
        import huggingface_hub

        path = huggingface_hub.hf_hub_download(path, "config.json", cache_dir=config.cache_dir)
    with open(path) as f:
        return json.load(f)


def attention_implementation(config: TrainConfig, mesh: Mesh | None = None) -> str | None:
    """`--enable_xformers_memory_efficient_attention`: cuDNN flash attention where it runs (NVIDIA GPUs,
    bfloat16), else XLA's attention; None (the flag off) leaves the choice to the devices of the program that
    runs the model (`sharding.attention_on`: XLA's, blocked on CPUs). The PyTorch script's xformers is likewise
    opt-in."""
    if not config.enable_xformers_memory_efficient_attention:
        return None
    if mesh is not None and sharding.platform(mesh) == "gpu" and config.mixed_precision == "bf16":
        return "cudnn"
    say("--enable_xformers_memory_efficient_attention: cuDNN flash attention needs NVIDIA GPUs and "
        "--mixed_precision bf16; using these devices' usual attention")
    return None


def build_model(config: TrainConfig, mesh: Mesh | None = None) -> Any:
    """The Flax UNet in the run's compute dtype (parameters stay float32), its attention as the flag asks for
    `mesh`'s devices; a bad config is a usage error."""
    from jax_uncond.models.unet_2d import FlaxUNet2DModel

    try:
        model = FlaxUNet2DModel.from_config(unet_config(config), dtype=COMPUTE_DTYPES[config.mixed_precision],
                                            gradient_checkpointing=config.gradient_checkpointing,
                                            attention_implementation=attention_implementation(config, mesh))
    except ValueError as e:
        raise UsageError(f"the UNet config ({config.model_config_name_or_path or 'preset or default'}): {e}") from e
    return model


def build_scheduler(config: Any) -> Any:
    """The training noise scheduler, configured as the PyTorch script's DDPMScheduler (on top of a pretrained
    pipeline's scheduler config when there is one)."""
    from jax_uncond.schedulers import FlaxDDPMScheduler

    return FlaxDDPMScheduler.from_config(config.noise_scheduler or {}, num_train_timesteps=config.ddpm_num_steps,
                                         beta_schedule=config.ddpm_beta_schedule,
                                         prediction_type=config.prediction_type)


def check_resolution(config: Any, model: Any) -> None:
    """The UNet halves its input once per down block but the last: --resolution must divide."""
    factor = 2 ** (len(model.config["block_out_channels"]) - 1)
    if config.resolution % factor:
        raise UsageError(f"--resolution {config.resolution} does not fit the UNet, which halves its input "
                         f"{factor.bit_length() - 1} times: use a multiple of {factor}")


def global_batch_size(config: Any, mesh: Mesh) -> int:
    """Images per micro-batch over all devices: --global_batch_size, else --train_batch_size per device."""
    devices = sharding.data_parallel_size(mesh)
    size = config.global_batch_size or config.train_batch_size * devices
    if size % devices:
        raise UsageError(f"--global_batch_size {size} is not divisible by the {devices} devices; "
                         f"use a multiple of {devices}")
    return size


def run(config: TrainConfig) -> None:
    """Train as `config` says: the whole run of `train_flax.py`, holding the output folder's lock; with several
    processes, under the watchdog that stops them all when one is lost or fails (`peers.py`)."""
    joined = distributed.initialize(config)
    with peers.watching() as watch, run_lock.hold(config.output_dir) as lock:
        if lock is not None:
            watch.at_stop(lock.release)
        _run(config, joined, watch)


def _run(config: TrainConfig, joined: str, watch: peers.Watch) -> None:
    cache_dir = metrics.enable_compilation_cache()
    from jax_uncond.data.loader import make_train_loader
    from jax_uncond.run.outputs import RunOutputs

    agreement.same_flags(config)
    mesh = sharding.make_mesh()
    resume = ckpt.resume_point(config)  # process 0 decides (and rolls back) before anything compiles
    with agreement.all_or_none("start-up"):  # a flag, file or token only one process finds bad stops them all
        config, source = pretrained.prepare(config, resume, say)
        model = build_model(config, mesh)
        start = None if source is None else pretrained.load(source, model, config)
        # Checkpoints record the resolved UNet config, so `jax_uncond.export` needs no other file.
        config = dataclasses.replace(config, unet=model.config, model_config_name_or_path=None)
        check_resolution(config, model)
        scheduler = build_scheduler(config)
        batch = global_batch_size(config, mesh)
        outputs = RunOutputs(config, model, scheduler, mesh)
        loader = make_train_loader(config, mesh, batch_size=batch * config.gradient_accumulation_steps)
    watch.at_stop(outputs.end_uploads)
    say(f"{joined}; {jax.device_count()} devices ({jax.devices()[0].device_kind}); compilation cache {cache_dir}")
    try:
        from jax_uncond.evaluation.fid import FidEvaluator

        fid = FidEvaluator(config, model, scheduler, mesh, batch, loader.source) if config.fid_epochs else None
        train(config, model, scheduler, mesh, loader, outputs, batch, resume, start, fid)
    except BaseException:
        outputs.end_uploads()  # however the run ends, queued uploads are waited for or named
        raise
    finally:
        loader.close()


@dataclasses.dataclass
class _Preemption:
    """SIGTERM (single process) or JAX's preemption sync point (multi-process) asks the run to stop."""

    requested: bool = False

    def install(self) -> Any:
        if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
            return None  # multi-process: JAX's preemption service owns SIGTERM and syncs the step
        return signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True

    def reached(self, manager: ckpt.Checkpoints, step: int) -> bool:
        if jax.process_count() > 1:
            return manager.manager.reached_preemption(step)
        return self.requested


def _fetch(pending: list[tuple[int, dict[str, jax.Array]]]) -> list[tuple[int, dict[str, float]]]:
    """Host values of the metrics of every pending step (their async copies are usually done)."""
    out = [(step, {k: float(np.asarray(v)) for k, v in m.items()}) for step, m in pending]
    pending.clear()
    return out


def train(config: Any, model: Any, scheduler: Any, mesh: Mesh, loader: Any, outputs: Any,
          batch_size: int, resume: tuple[str, int] | None, start: pretrained.FineTune | None = None,
          fid: FidEvaluator | None = None) -> TrainState:
    """The training loop over global batches of `batch_size` x accumulation steps; returns the final state.

    `resume` is `checkpoint.resolve_resume`'s answer: the (directory, step) to restore, or None for fresh;
    with `latest`, an older checkpoint when that one cannot be restored (`checkpoint.restore_resume`).
    A fresh state starts from `start`'s pretrained weights when given, else from the init.
    `fid` scores the samples at the epochs it says (--fid_epochs), if given.
    """
    jax.config.update("jax_threefry_partitionable", True)  # random bits independent of the sharding
    k = config.gradient_accumulation_steps
    steps_per_epoch = loader.steps_per_epoch
    if steps_per_epoch < 1:
        raise UsageError(f"the dataset has {loader.num_examples} images, fewer than one batch of "
                         f"{batch_size * k}; lower --train_batch_size or --gradient_accumulation_steps")
    max_steps = config.max_train_steps or config.num_epochs * steps_per_epoch
    num_epochs = math.ceil(max_steps / steps_per_epoch)
    program = train_program(config, model, scheduler, mesh, max_steps)
    checkpoints = ckpt.Checkpoints(ckpt.checkpoints_dir(config.output_dir), config.checkpointing_steps,
                                   config.checkpoints_total_limit)
    if resume is None:
        state = program.fresh_state(None if start is None else start.weights)
        why = ("no checkpoint in the output folder yet" if config.resume_from_checkpoint == "latest"
               else "--resume_from_checkpoint not given")
        say(start.line if start is not None else f"start: fresh initialisation (seed {config.seed}; {why})")
    else:
        source, resume_step, (state, loader_state, _) = ckpt.restore_resume(
            resume, config.resume_from_checkpoint, checkpoints, program.abstract_state())
        loader.set_state(loader_state)
        say(f"start: resuming from {source.path(resume_step)} at step {resume_step} "
            f"(epoch {resume_step // steps_per_epoch}, {resume_step % steps_per_epoch} batches into it)")
    start = int(jax.device_get(state.step))
    if start >= max_steps:
        say(f"nothing to do: the checkpoint is at step {start}, and the run ends at step {max_steps}")

    iterator: Iterator = iter(loader)
    images_per_step = batch_size * k
    say(f"{loader.num_examples} images, {steps_per_epoch} steps/epoch of {images_per_step} images "
        f"({batch_size} x {k} accumulated) over {sharding.data_parallel_size(mesh)} devices; "
        f"{max_steps} optimizer steps ({num_epochs} epochs)")

    preemption = _Preemption()
    previous_handler = preemption.install()
    profiler = StepProfiler(config.profile_steps, os.path.join(config.output_dir, config.logging_dir))
    compiled = None
    throughput = None
    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last: dict[str, float] = {}
    window = (start, time.perf_counter())
    aside = 0.0  # seconds spent saving and sampling, kept out of the throughput figures
    figures: dict[str, float] = {}
    bar = tqdm(total=max_steps, initial=start, disable=jax.process_index() != 0, dynamic_ncols=True)

    def take(done: list[tuple[int, dict[str, float]]]) -> None:
        """Fetched steps: the non-finite stop checked for each, the metrics of logged ones logged and shown."""
        nonlocal last
        for done_step, values in done:
            _check_finite(values, done_step, config.max_nonfinite_steps)
            if len(values) > 1:  # a logged step's metrics, not the non-finite counter alone
                last = values
                outputs.log(done_step, values)
                bar.set_postfix(epoch=(done_step - 1) // steps_per_epoch, step=done_step,
                                loss=f"{values['loss']:.4g}", lr=f"{values['lr']:.3g}",
                                img_s=f"{figures.get('images_per_s', 0):.1f}", refresh=False)

    step = start
    try:
        while step < max_steps:
            batch = next(iterator)
            if compiled is None:
                compiled, compile_s, lowered = compile_train_step(program.step, state, batch, mesh)
                throughput = metrics.Throughput(images_per_step, metrics.step_flops(lowered, mesh.size, k),
                                                mesh.devices.flat[0])
                figures["compile_s"] = compile_s
                say(f"train step compiled in {compile_s:.1f}s")
            # Metrics come back every --logging_steps; the non-finite counter every step (a read of one number).
            due = (step + 1) % config.logging_steps == 0 or step + 1 == max_steps
            profiler.before(step)
            # An implicit host<->device copy in the call is a bug; the call is alike every step, so checking
            # logged steps suffices (the guard costs as much as a small step's other host work).
            with jax.transfer_guard("disallow") if due else contextlib.nullcontext():
                state, step_metrics = compiled(state, batch)
            step += 1
            fetched = step_metrics if due else {"nonfinite_run": step_metrics["nonfinite_run"]}
            for value in fetched.values():
                value.copy_to_host_async()
            done = _fetch(pending)
            pending.append((step, fetched))
            take(done)
            if step == start + 2:
                window, aside = (step, time.perf_counter()), 0.0  # from here on: compile and warm-up excluded
            elif step > start + 2 and due:
                figures.update(throughput.report(step - window[0], time.perf_counter() - window[1] - aside))
                outputs.log(step, figures)
            bar.update(1)
            if (line := profiler.after(step, state)) is not None:
                say(line)

            paused = time.perf_counter()
            preempted = preemption.reached(checkpoints, step)
            if checkpoints.should_save(step) or step == max_steps or preempted:
                checkpoints.save(step, state, loader.get_state(), to_dict(config))
            if step % steps_per_epoch == 0 or step == max_steps:
                epoch = (step - 1) // steps_per_epoch
                weights = sharding.gathered(state.ema_params if config.use_ema else state.params, mesh)
                if fid is not None and fid.due(epoch, step == max_steps):  # before the card
                    outputs.log(step, fid(weights, step))
                    outputs.card_metrics.update(fid.card_metrics())
                outputs.epoch_end(epoch, weights, last=step == max_steps, step=step)
            aside += time.perf_counter() - paused
            if preempted:
                checkpoints.wait()
                say(f"stopped by SIGTERM at step {step}: checkpoint saved in {checkpoints.path(step)}; "
                    "rerun with --resume_from_checkpoint latest to continue")
                break
        if (line := profiler.stop(state)) is not None:  # the run ended inside the window
            say(line)
        take(_fetch(pending))
    finally:
        profiler.stop()
        bar.close()
        checkpoints.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    summary = {"step": step, "loss": last.get("loss", math.nan), "nonfinite_steps": int(last.get("nonfinite_total", 0)),
               **figures, "skipped_files": loader.skipped_files, **(fid.summary() if fid is not None else {})}
    outputs.close(summary)
    return state


def _check_finite(values: dict[str, float], step: int, limit: int) -> None:
    run = int(values["nonfinite_run"])
    if run and run >= limit:
        raise NonFiniteError(
            f"{run} consecutive steps up to step {step} had a non-finite loss or gradient (skipped); stopping. "
            "The last checkpoint holds the last good weights: lower --learning_rate, try --mixed_precision bf16 "
            "or no, and resume with --resume_from_checkpoint latest")
