"""Sampling throughput: FlaxDDPMPipeline vs diffusers' scheduler + UNet2DModel loop, every sampler.

One UNet2DModel (random weights, written by diffusers as a DDPMPipeline folder) is loaded by both
sides; each generates the same batch with the same number of steps with every sampler of the table
(schedulers/samplers.py: ddpm, ddim, dpmsolver++, sde-dpmsolver++, unipc, euler, euler_ancestral), each
built from the folder's DDPM config. JAX runs its one compiled sampler over all local devices; PyTorch
runs diffusers' loop as its pipelines do (initial sigma, scale_model_input, unet, step) on CUDA if
present, else the CPU. Each side runs in its own process (the two runtimes' CPU thread pools slow each
other down). Prints images/s of each, the ratio JAX / PyTorch, and JAX's compile time (first call minus
a steady call).

    python benchmarks/bench_sampling.py                  # small CPU config (a few minutes)
    python benchmarks/bench_sampling.py --preset seed64  # diffusers' 64x64 example UNet, batch 64 (GPU)
    python benchmarks/bench_sampling.py --samplers ddim dpmsolver++ --steps 50
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
from jax_uncond.schedulers.samplers import SAMPLERS, make_sampler  # noqa: E402
from jax_uncond.run.loop import SEED_UNET_CONFIG  # noqa: E402
from sides import report, run_side  # noqa: E402

PRESETS = {
    "cpu": dict(unet={"in_channels": 3, "out_channels": 3, "layers_per_block": 1, "block_out_channels": (32, 64),
                      "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
                      "up_block_types": ("AttnUpBlock2D", "UpBlock2D"), "norm_num_groups": 8},
                resolution=32, batch=8, steps=20),
    "seed64": dict(unet=dict(SEED_UNET_CONFIG), resolution=64, batch=64, steps=50),
}  # fmt: skip
PRECISIONS = ("fp32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu")
    parser.add_argument("--batch_size", type=int, help="images per call (default: the preset's)")
    parser.add_argument("--steps", type=int, help="denoising steps per call, every sampler (default: the preset's)")
    parser.add_argument("--samplers", nargs="+", choices=tuple(SAMPLERS), default=tuple(SAMPLERS))
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="UNet compute dtype on both sides")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per measurement (median)")
    parser.add_argument("--torch_threads", type=int,
                        help="PyTorch CPU threads (default: PyTorch's choice; on a shared, busy CPU 1 is fairer: "
                             "its OpenMP threads spin and stall there)")  # fmt: skip
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_jax(args: argparse.Namespace, batch: int, steps: int) -> dict:
    """Per sampler: images/s of the compiled pipeline and its compile time."""
    import jax
    import jax.numpy as jnp

    from jax_uncond import FlaxDDPMPipeline

    dtype = {"fp32": jnp.float32, "bf16": jnp.bfloat16}[args.precision]
    pipeline, params = FlaxDDPMPipeline.from_pretrained(args.folder, dtype=dtype)
    results = {"where": f"{len(jax.local_devices())} x {jax.local_devices()[0].device_kind}, JAX {jax.__version__}"}
    for name in args.samplers:
        scheduler = make_sampler(name, pipeline.scheduler.config)

        def run() -> None:
            pipeline(params, jax.random.key(0), batch_size=batch, num_inference_steps=steps, scheduler=scheduler,
                     output_type="np")  # fmt: skip

        start = time.perf_counter()
        run()
        first = time.perf_counter() - start
        seconds = median_seconds(run, args.repeats)
        results[name] = {"images_per_s": batch / seconds, "compile_s": first - seconds}
    return results


def measure_torch(args: argparse.Namespace, batch: int, steps: int) -> dict:
    """Per sampler: images/s of diffusers' loop over the same UNet (what its pipelines run)."""
    import torch
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        UNet2DModel,
        UniPCMultistepScheduler,
    )

    classes = {cls.__name__: cls for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,
                                             EulerAncestralDiscreteScheduler, EulerDiscreteScheduler,
                                             UniPCMultistepScheduler)}  # fmt: skip
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.precision]
    unet = UNet2DModel.from_pretrained(args.folder, subfolder="unet").to(device=device, dtype=dtype).eval()
    train_config = DDPMScheduler.from_pretrained(args.folder, subfolder="scheduler").config
    results = {"where": f"{device} ({torch.get_num_threads()} threads), PyTorch {torch.__version__}"}
    for name in args.samplers:
        ours = make_sampler(name, train_config)  # the same config keys, in diffusers' class of the same name
        scheduler = classes[ours.diffusers_class].from_config(ours.config)
        generator = torch.Generator(device).manual_seed(0)
        shape = (batch, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
        extra = {"eta": 0.0} if name == "ddim" else {"generator": generator} if name != "unipc" else {}

        def run(n: int = steps) -> None:
            scheduler.set_timesteps(n)
            x = torch.randn(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
            with torch.no_grad():
                for t in scheduler.timesteps:
                    out = unet(scheduler.scale_model_input(x, t), t).sample
                    x = scheduler.step(out, t, x, **extra).prev_sample
            (x / 2 + 0.5).clamp(0, 1).float().cpu().numpy()
            if device == "cuda":
                torch.cuda.synchronize()

        run(2)  # warm-up (kernels, allocator)
        results[name] = {"images_per_s": batch / median_seconds(run, args.repeats)}
    return results


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    batch, steps = args.batch_size or preset["batch"], args.steps or preset["steps"]
    if args.side:  # a child: one side, all samplers
        measure = measure_jax if args.side == "jax" else measure_torch
        report(measure(args, batch, steps))
        return
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**preset["unet"], sample_size=preset["resolution"]).eval()
    folder = tempfile.mkdtemp(prefix="bench_sampling_")
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)
    results = {}
    for side in ("jax", "torch"):
        results[side] = run_side([sys.executable, __file__, *(argv or sys.argv[1:]), "--side", side, "--folder", folder])
    print(f"JAX on {results['jax']['where']}; PyTorch on {results['torch']['where']}")
    print(f"UNet {preset['unet']['block_out_channels']} at {preset['resolution']}x{preset['resolution']}, "
          f"batch {batch}, {steps} steps, {args.precision}")  # fmt: skip
    for name in args.samplers:
        ours, theirs = results["jax"][name], results["torch"][name]
        print(f"{name:>16}: jax {ours['images_per_s']:8.2f} img/s   diffusers {theirs['images_per_s']:8.2f} img/s   "
              f"ratio {ours['images_per_s'] / theirs['images_per_s']:5.2f}x   (jax compile {ours['compile_s']:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"preset": args.preset, "batch": batch, "steps": steps, "precision": args.precision, **results},
                      f, indent=2)


if __name__ == "__main__":
    main()
