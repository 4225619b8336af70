"""Images per second the data loader delivers, beside PyTorch's DataLoader and the train step's appetite.

An image folder of JPEGs (made here, in a temporary folder) is read at 64x64 and 128x128 with 0, 1
and 2 worker processes by:
  - jax_uncond's Grain loader, up to global `jax.Array` batches on the devices (what training sees);
  - the PyTorch script's way: `torch.utils.data.DataLoader(shuffle=True, num_workers=W)` over the same
    `datasets` imagefolder with the same transforms (torchvision itself does not import beside the CPU
    torch here, so its PIL-based transforms run as the equivalent PIL calls).
The train step's consumption rate comes from `train_step_images_per_second` (the quickstart UNet).

    python benchmarks/bench_data.py [--images 384] [--batch_size 32] [--batches 24]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jax_uncond import xla_flags  # noqa: E402

xla_flags.apply()  # as train_flax.py does, before the backend starts

RESOLUTIONS = (64, 128)
WORKERS = (0, 1, 2)


def train_step_images_per_second(resolution: int, batch_size: int) -> float:
    """Images/s the engine's compiled train step consumes on this machine, for the quickstart preset's UNet
    (the CPU training config) at `resolution` and global batch `batch_size`: the rate the loader must beat."""
    from bench_train import bench_config, jax_runner

    from jax_uncond.training.config import load_preset

    unet = load_preset(os.path.join(ROOT, "configs", "quickstart.yaml"))["unet"]
    run, _ = jax_runner(bench_config({"unet": unet, "precision": "no"}, resolution, batch_size))
    steps = 4
    run(steps)  # warm-up
    return steps * batch_size / min(run(steps) for _ in range(2))


def make_jpeg_folder(root: str, count: int) -> str:
    """`count` 320x256 photo-like JPEGs (smooth gradients plus noise) in two nested folders."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:256, 0:320].astype(np.float32)
    for i in range(count):
        folder = os.path.join(root, f"class_{i % 2}")
        os.makedirs(folder, exist_ok=True)
        phase = rng.uniform(0, 6.28, 3)
        image = np.stack([128 + 100 * np.sin(x / (20 + 7 * c) + y / 31 + phase[c]) for c in range(3)], axis=-1)
        image += rng.normal(0, 12, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i}.jpg"), quality=90)
    return root


def grain_rate(data_dir: str, cache_dir: str, resolution: int, workers: int, batch_size: int, batches: int) -> float:
    """Images/s of jax_uncond's loader, global device batches included, after two warm-up batches."""
    import jax

    from jax_uncond.data import make_train_loader
    from jax_uncond.training.config import parse_args
    from jax_uncond.training.sharding import make_mesh

    config = parse_args(["--train_data_dir", data_dir, "--cache_dir", cache_dir, "--resolution", str(resolution),
                         "--random_flip", "--dataloader_num_workers", str(workers)])
    loader = make_train_loader(config, make_mesh(jax.devices()), batch_size=batch_size)
    for _ in range(2):
        next(loader)["images"].block_until_ready()
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)["images"].block_until_ready()
    elapsed = time.perf_counter() - start
    loader.close()
    return batches * batch_size / elapsed


class _TorchImageFolder:
    """The PyTorch script's dataset: `datasets` imagefolder, transformed per item (a map-style torch dataset)."""

    def __init__(self, data_dir: str, cache_dir: str, resolution: int):
        import datasets

        from jax_uncond.data.transforms import TransformSpec

        self.dataset = datasets.load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir, split="train")
        self.spec = TransformSpec(resolution, random_flip=True)
        self.rng = np.random.default_rng()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        import torch

        from jax_uncond.data.transforms import transform_image

        image = self.dataset[index]["image"].convert("RGB")
        return torch.from_numpy(transform_image(image, self.spec, self.rng))


def torch_rate(data_dir: str, cache_dir: str, resolution: int, workers: int, batch_size: int, batches: int) -> float:
    """Images/s of `torch.utils.data.DataLoader(shuffle=True, num_workers=workers)` over the same folder.

    Workers are spawned (as Grain's are): forking a process that runs JAX's threads can deadlock.
    """
    import torch

    loader = torch.utils.data.DataLoader(_TorchImageFolder(data_dir, cache_dir, resolution), batch_size=batch_size,
                                         shuffle=True, num_workers=workers, drop_last=True,
                                         persistent_workers=workers > 0,
                                         multiprocessing_context="spawn" if workers else None)
    it = iter(loader)
    done = 0
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    while done < batches:
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            continue
        done += 1
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch DataLoader baseline")
    parser.add_argument("--resolutions", type=int, nargs="+", default=RESOLUTIONS)
    parser.add_argument("--workers", type=int, nargs="+", default=WORKERS, help="worker processes to try")
    parser.add_argument("--no_step", action="store_true", help="skip the train step's consumption rate")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_jpeg_folder(os.path.join(tmp, "jpegs"), args.images)
        cache_dir = os.path.join(tmp, "cache")
        print(f"{args.images} JPEGs of 320x256, batch {args.batch_size}, {args.batches} timed batches, "
              f"{os.cpu_count()} CPUs")
        print(f"{'res':>4} {'workers':>7} {'grain img/s':>12} {'torch img/s':>12} {'ratio':>6} {'step img/s':>11}")
        for resolution in args.resolutions:
            step = None if args.no_step else train_step_images_per_second(resolution, args.batch_size)
            for workers in args.workers:
                ours = grain_rate(data_dir, cache_dir, resolution, workers, args.batch_size, args.batches)
                theirs = None if args.no_torch else torch_rate(data_dir, cache_dir, resolution, workers,
                                                              args.batch_size, args.batches)
                print(f"{resolution:>4} {workers:>7} {ours:>12.0f} "
                      f"{'-' if theirs is None else f'{theirs:.0f}':>12} "
                      f"{'-' if theirs is None else f'{ours / theirs:.2f}':>6} "
                      f"{'-' if step is None else f'{step:.0f}':>11}", flush=True)
                rows.append({"resolution": resolution, "workers": workers, "jax_images_per_s": ours,
                             "torch_images_per_s": theirs, "step_images_per_s": step})
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"images": args.images, "batch_size": args.batch_size, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
