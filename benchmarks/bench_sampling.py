"""Sampling throughput: FlaxDDPMPipeline vs diffusers' DDPMPipeline / DDIMPipeline on the same UNet.

One UNet2DModel (random weights, written by diffusers as a DDPMPipeline folder) is loaded by both
sides; each generates the same batch with the same number of steps, DDPM and DDIM (eta=0). JAX runs
its one compiled sampler over all local devices; PyTorch runs diffusers' pipelines on CUDA if present,
else the CPU. Prints images/s of each, the ratio JAX / PyTorch, and JAX's compile time (first call
minus a steady call), measured in the same run.

    python benchmarks/bench_sampling.py                  # small CPU config (about a minute)
    python benchmarks/bench_sampling.py --preset seed64  # diffusers' 64x64 example UNet, batch 64 (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jax_uncond import xla_flags  # noqa: E402

xla_flags.apply()  # as `python -m jax_uncond.sample` does, before the backend starts
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from jax_uncond import FlaxDDIMScheduler, FlaxDDPMPipeline  # noqa: E402
from jax_uncond.training.loop import SEED_UNET_CONFIG  # noqa: E402

PRESETS = {
    "cpu": dict(unet={"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": (32, 64),
                      "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                      "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8},
                resolution=32, batch=8, steps=20),
    "seed64": dict(unet=dict(SEED_UNET_CONFIG), resolution=64, batch=64, steps=50),
}  # fmt: skip
DTYPES = {"fp32": (jnp.float32, torch.float32), "bf16": (jnp.bfloat16, torch.bfloat16)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--batch_size", type=int, help="images per call (default: the preset's)")
    parser.add_argument("--steps", type=int, help="denoising steps per call (default: the preset's)")
    parser.add_argument("--samplers", nargs="+", default=["ddpm", "ddim"],
                        help="ddpm, ddim, or NAME:STEPS to give one its own step count (e.g. ddim:50 ddpm:1000)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--precision", choices=DTYPES, default="fp32", help="UNet compute dtype on both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--torch_threads", type=int,
                        help="PyTorch CPU threads (default: PyTorch's choice; on a shared, busy CPU 1 is fairer: "
                             "its OpenMP threads spin and stall there)")  # fmt: skip
    return parser.parse_args(argv)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    batch = args.batch_size or preset["batch"]
    jax_dtype, torch_dtype = DTYPES[args.precision]
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    torch.manual_seed(0)
    unet = UNet2DModel(**preset["unet"], sample_size=preset["resolution"]).eval()
    folder = tempfile.mkdtemp(prefix="bench_sampling_")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    pipeline, params = FlaxDDPMPipeline.from_pretrained(folder, dtype=jax_dtype)
    torch_pipelines = {
        "ddpm": DDPMPipeline(unet=unet, scheduler=DDPMScheduler.from_config(pipeline.scheduler.config)),
        "ddim": DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(pipeline.scheduler.config)),
    }
    jax_schedulers = {"ddpm": pipeline.scheduler, "ddim": FlaxDDIMScheduler.from_config(pipeline.scheduler.config)}

    print(f"JAX {jax.__version__} on {len(jax.local_devices())} x {jax.local_devices()[0].device_kind}; "
          f"PyTorch {torch.__version__} on {device} ({torch.get_num_threads()} CPU threads)")  # fmt: skip
    print(f"UNet {preset['unet']['block_out_channels']} at {preset['resolution']}x{preset['resolution']}, "
          f"batch {batch}, {args.precision}")  # fmt: skip
    results = []
    for sampler in args.samplers:
        name, _, own_steps = sampler.partition(":")
        steps = int(own_steps or args.steps or preset["steps"])
        key = jax.random.key(0)

        def run_jax() -> None:
            pipeline(params, key, batch_size=batch, num_inference_steps=steps, scheduler=jax_schedulers[name],
                     output_type="np")  # fmt: skip

        start = time.perf_counter()
        run_jax()
        first = time.perf_counter() - start
        jax_s = median_seconds(run_jax, args.repeats)

        torch_pipeline = torch_pipelines[name].to(device)
        if torch_dtype != torch.float32:
            torch_pipeline = torch_pipeline.to(dtype=torch_dtype)
        torch_pipeline.set_progress_bar_config(disable=True)
        generator = torch.Generator(device).manual_seed(0)

        def run_torch(n: int = steps) -> None:
            torch_pipeline(batch_size=batch, generator=generator, num_inference_steps=n, output_type="np")
            if device == "cuda":
                torch.cuda.synchronize()

        run_torch(2)  # warm-up (kernels, allocator)
        torch_s = median_seconds(run_torch, args.repeats)
        print(f"{name} ({steps} steps): jax {batch / jax_s:8.2f} img/s   diffusers {batch / torch_s:8.2f} img/s   "
              f"ratio {torch_s / jax_s:5.2f}x   (jax compile {first - jax_s:.1f} s)")  # fmt: skip
        results.append({"sampler": name, "steps": steps, "jax_images_per_s": batch / jax_s,
                        "torch_images_per_s": batch / torch_s, "ratio": torch_s / jax_s, "jax_compile_s": first - jax_s})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": batch, "precision": args.precision, "device": device,
                       "jax_device": jax.local_devices()[0].device_kind, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
