"""Sample a DDPMPipeline folder with JAX: `python -m jax_uncond.sample PIPELINE_DIR --num_images N --out DIR`.

Writes sample_0000.png, sample_0001.png, ... and grid.png. The folder may come from train_flax.py,
from `python -m jax_uncond.export`, or from diffusers in PyTorch (safetensors). No PyTorch needed.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

import jax
import numpy as np
from PIL import Image

from jax_uncond import __version__, xla_flags
from jax_uncond.console import setup_logging
from jax_uncond.schedulers.samplers import SAMPLERS, checked_sampler, default_steps
from jax_uncond.run.outputs import image_grid, to_uint8


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("pipeline_dir", help="A DDPMPipeline folder (model_index.json, unet/, scheduler/).")
    parser.add_argument("--num_images", type=int, default=16, help="How many images (default: %(default)s).")
    parser.add_argument("--out", required=True, help="Folder for the PNG files (created if missing).")
    parser.add_argument("--scheduler", choices=tuple(SAMPLERS), default="ddpm",
                        help="ddpm: the folder's scheduler; the others are built from its noise schedule and "
                             "need far fewer steps (docs/sampling.md) (default: %(default)s).")
    defaults = ", ".join(f"{name} {s.default_steps}" for name, s in SAMPLERS.items() if s.default_steps)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"Denoising steps (default: the training steps for ddpm; {defaults}).")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="Images per compiled call; lower it if memory runs out (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0, help="Seeds the initial noise (default: %(default)s).")
    return parser


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`jax-uncond-sample` (`prog`: the command's name in --help and errors; default: how it was called)."""
    setup_logging()
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    xla_flags.apply()
    for name in ("num_images", "steps", "batch_size"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name} must be positive, got {value}")
    if not os.path.isfile(os.path.join(args.pipeline_dir, "model_index.json")):
        parser.error(f"{args.pipeline_dir} is not a DDPMPipeline folder (no model_index.json)")
    from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline

    pipeline, params = FlaxDDPMPipeline.from_pretrained(args.pipeline_dir)
    steps = args.steps or default_steps(args.scheduler, len(pipeline.scheduler))
    try:  # the sampler, its schedule and the step count, checked before anything compiles
        scheduler = checked_sampler(args.scheduler, pipeline.scheduler, steps)
    except ValueError as e:
        parser.error(f"--scheduler {args.scheduler} with {steps} steps: {e}")
    os.makedirs(args.out, exist_ok=True)
    key = jax.random.key(args.seed)
    chunks = []
    for index, start in enumerate(range(0, args.num_images, args.batch_size)):
        batch = min(args.batch_size, args.num_images - start)
        chunks.append(np.asarray(pipeline(params, jax.random.fold_in(key, index), batch_size=batch,
                                          num_inference_steps=steps, scheduler=scheduler, output_type="np").images))
    images = np.concatenate(chunks)
    for i, image in enumerate(to_uint8(images)):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(
            os.path.join(args.out, f"sample_{i:04d}.png"))
    image_grid(images).save(os.path.join(args.out, "grid.png"))
    print(f"{len(images)} images ({args.scheduler}, {steps} steps) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jax_uncond.sample"))
