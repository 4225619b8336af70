"""Training throughput: this JAX engine vs the PyTorch step of diffusers' train_unconditional.py.

Both sides train the same UNet2DModel config on the same batch of random images: JAX runs the
engine's compiled step (noise/timesteps drawn inside, clip, AdamW, EMA, state donated) on all local
devices; PyTorch runs the script's loop body over diffusers' UNet2DModel + DDPMScheduler + AdamW
(+ EMAModel), with autocast for bf16. Prints images/s of each, the ratio, JAX's MFU and compile time.

    python benchmarks/bench_train.py                      # small CPU config (a couple of minutes)
    python benchmarks/bench_train.py --preset seed64      # diffusers' 64x64 example, bf16, batch 64 (GPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_uncond import xla_flags  # noqa: E402

xla_flags.apply()  # as train_flax.py does: the project's XLA:CPU options, before the backend starts
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jax_uncond.training import sharding  # noqa: E402

from jax_uncond.run import metrics  # noqa: E402
from jax_uncond.training.config import parse_args  # noqa: E402
from jax_uncond.run.loop import SEED_UNET_CONFIG, build_model, build_scheduler  # noqa: E402
from jax_uncond.training.optim import make_optimizer  # noqa: E402
from jax_uncond.training.state import make_init_fn  # noqa: E402
from jax_uncond.training.step import StepConfig, compile_train_step, make_train_step  # noqa: E402
from sides import SideFailed, report, run_side  # noqa: E402


PRESETS = {
    "cpu": dict(unet={"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": (32, 64),
                      "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                      "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8},
                resolution=32, batch=16, precision="no", steps=8),
    "seed64": dict(unet=dict(SEED_UNET_CONFIG), resolution=64, batch=64, precision="bf16", steps=30),
}


def bench_config(preset: dict, resolution: int, batch: int):
    """The TrainConfig of a preset's UNet at `resolution` and global `batch`, EMA on."""
    config = parse_args(["--resolution", str(resolution), "--global_batch_size", str(batch),
                         "--mixed_precision", preset["precision"], "--use_ema"])
    return dataclasses.replace(config, unet={**preset["unet"], "sample_size": resolution})


def jax_runner(config):
    """(run(n) -> seconds for n steps, figures): the engine's compiled step on every local device."""
    mesh = sharding.make_mesh(jax.local_devices())
    model, scheduler = build_model(config), build_scheduler(config)
    optimizer, schedule = make_optimizer(config, 10_000, model)
    key = jax.random.key(0)
    state = jax.jit(make_init_fn(config, model, optimizer, key),
                    out_shardings=sharding.replicated(mesh))()
    shape = (config.global_batch_size, 3, config.resolution, config.resolution)
    images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32),
                            sharding.batch_sharding(mesh))
    batch = {"images": images}
    step_fn = make_train_step(model, scheduler, scheduler.create_state(), optimizer, schedule,
                              StepConfig.from_config(config), key, mesh)
    compiled, compile_s, lowered = compile_train_step(step_fn, state, batch, mesh)
    holder = {"state": state}

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            holder["state"], out = compiled(holder["state"], batch)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    figures = {"compile_s": compile_s, "flops": metrics.step_flops(lowered, mesh.size), "device": mesh.devices.flat[0],
               "compiled": compiled}
    return run, figures


def torch_runner(config, unet_config: dict):
    """run(n) -> seconds for n steps of the PyTorch script's loop body."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    model = UNet2DModel(sample_size=config.resolution, **unet_config).to(device)
    noise_scheduler = DDPMScheduler(num_train_timesteps=config.ddpm_num_steps, beta_schedule=config.ddpm_beta_schedule,
                                    prediction_type=config.prediction_type)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=10_000)
    ema = EMAModel(model.parameters(), decay=config.ema_max_decay, use_ema_warmup=True,
                   inv_gamma=config.ema_inv_gamma, power=config.ema_power) if config.use_ema else None
    if ema is not None:
        ema.to(device)
    shape = (config.global_batch_size, 3, config.resolution, config.resolution)
    clean_images = torch.rand(shape, device=device) * 2 - 1
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=config.mixed_precision == "bf16")

    def one_step():
        noise = torch.randn(clean_images.shape, device=device)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (shape[0],), device=device).long()
        noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
        with autocast:
            model_output = model(noisy_images, timesteps).sample
        loss = F.mse_loss(model_output.float(), noise.float())
        loss.backward()
        with torch.profiler.record_function("optimizer"):  # a label for profile_train.py; no cost otherwise
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            if ema is not None:
                ema.step(model.parameters())

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            one_step()
        sync()
        return time.perf_counter() - start

    return run, device


def memory_figures(compiled, device) -> dict[str, int | None]:
    """The step's buffers by kind (XLA's memory analysis) and the device's memory limit, in bytes."""
    analysis = compiled.memory_analysis()
    out = {key: getattr(analysis, f"{key}_size_in_bytes", None) for key in ("temp", "argument", "output", "alias")}
    out["device_limit"] = (device.memory_stats() or {}).get("bytes_limit")
    return out


def measure(side: str, config, unet_config: dict, steps: int, rounds: int) -> dict:
    """Best-of-`rounds` seconds for `steps` steps of one side, after a warm-up."""
    if side == "jax":
        run, figures = jax_runner(config)
        out = {"compile_s": figures["compile_s"], "memory": memory_figures(figures["compiled"], figures["device"])}
        report = metrics.Throughput(config.global_batch_size, figures["flops"], figures["device"])
    else:
        run, device = torch_runner(config, unet_config)
        import torch

        out = {"where": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"}
    run(steps)  # warm-up: compilation, autotuning, allocator
    timings = []
    for _ in range(rounds):
        cpu = time.process_time()
        timings.append((run(steps), time.process_time() - cpu))
    seconds = min(wall for wall, _ in timings)
    out["images_per_s"] = steps * config.global_batch_size / seconds
    # CPU time of this process per image (all its threads): steadier than wall time on a shared machine
    out["cpu_ms_per_image"] = 1e3 * sorted(cpu for _, cpu in timings)[len(timings) // 2] / (steps * config.global_batch_size)
    if side == "jax":
        out.update({k: v for k, v in report.report(steps, seconds).items() if k == "mfu"})
    return out


def cpu_list(spec: str) -> set[int]:
    """"0-3,6" -> {0, 1, 2, 3, 6}."""
    cpus = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def pin_cpus(spec: str, side: str) -> None:
    """Run this process (one side) on the CPUs of `spec`, before either runtime starts its threads:
    XLA sizes its pool from the affinity mask, PyTorch is told the count."""
    os.sched_setaffinity(0, cpu_list(spec))
    if side == "torch":
        import torch

        torch.set_num_threads(len(cpu_list(spec)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--batch", type=int, help="global batch (default: the preset's)")
    parser.add_argument("--steps", type=int, help="timed steps per round (default: the preset's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process; the best counts")
    parser.add_argument("--repeats", type=int, default=1,
                        help="processes per side, alternated (jax, torch, jax, ...); the medians count")
    parser.add_argument("--cpus", help="pin both sides to these CPUs, e.g. 0 or 0-1 (the same thread count on both)")
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch baseline")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--cache_dir", help="JAX's persistent compilation cache for the JAX side (default: none, so "
                                            "the compile time is a cold one; a second run with it shows a cached one)")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    batch, steps = args.batch or preset["batch"], args.steps or preset["steps"]
    unet_config = dict(preset["unet"])
    config = bench_config(preset, preset["resolution"], batch)
    if args.side:  # no persistent compilation cache unless asked: the compile time printed is a cold compile
        if args.cache_dir:
            metrics.enable_compilation_cache(args.cache_dir)
        if args.cpus:
            pin_cpus(args.cpus, args.side)
        report(measure(args.side, config, unet_config, steps, args.rounds))
        return
    # Each side runs in its own process: the two runtimes' CPU thread pools slow each other down.
    sides = ("jax",) if args.no_torch else ("jax", "torch")
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(args.repeats):
        for side in sides:
            try:
                runs[side].append(run_side([sys.executable, __file__, *sys.argv[1:], "--side", side]))
            except SideFailed as e:  # e.g. out of memory at a batch the other side fits: one line, no traceback
                raise SystemExit(f"{side} side failed ({e})") from None
    results = {side: {**rs[0], **{key: statistics.median(r[key] for r in rs) for key in
                                  ("images_per_s", "cpu_ms_per_image", "compile_s", "mfu") if key in rs[0]},
                      "images_per_s_runs": [r["images_per_s"] for r in rs]} for side, rs in runs.items()}
    device = jax.local_devices()[0]
    print(f"config {args.preset}: {preset['resolution']}x{preset['resolution']}, global batch {batch}, "
          f"{preset['precision']}, EMA on; JAX on {jax.local_device_count()} x {device.device_kind}"
          + (f", CPUs {args.cpus}" if args.cpus else "") + f"; medians of {args.repeats} process(es) per side")
    jax_result = results["jax"]
    line = (f"jax:   {jax_result['images_per_s']:.1f} images/s ({jax_result['cpu_ms_per_image']:.1f} CPU-ms/image), "
            f"compile {jax_result['compile_s']:.1f}s")
    line += f", MFU {100 * jax_result['mfu']:.1f}%" if "mfu" in jax_result else ", MFU n/a (no known peak for this device)"
    print(line)
    if "torch" in results:
        torch_result = results["torch"]
        print(f"torch: {torch_result['images_per_s']:.1f} images/s ({torch_result['cpu_ms_per_image']:.1f} "
              f"CPU-ms/image) on {torch_result['where']}")
        ratios = [j / t for j, t in zip(jax_result["images_per_s_runs"], torch_result["images_per_s_runs"])]
        results["ratio"] = jax_result["images_per_s"] / torch_result["images_per_s"]
        print(f"ratio jax/torch: {results['ratio']:.2f}x" + (f" (per repeat: {', '.join(f'{r:.2f}' for r in ratios)})"
                                                             if len(ratios) > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": batch, "device": device.device_kind, **results}, f, indent=2)


if __name__ == "__main__":
    main()
