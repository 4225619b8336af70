"""Images per second the data loader delivers, beside PyTorch's DataLoader and the train step's appetite;
with --pod, start-up, images/s and host memory of an image folder against the same images prepared.

An image folder of JPEGs (made here, in a temporary folder) is read at 64x64 and 128x128 with 0, 1
and 2 worker processes by:
  - jax_uncond's Grain loader, up to global `jax.Array` batches on the devices (what training sees);
  - the PyTorch script's way: `torch.utils.data.DataLoader(shuffle=True, num_workers=W)` over the same
    `datasets` imagefolder with the same transforms (torchvision itself does not import beside the CPU
    torch here, so its PIL-based transforms run as the equivalent PIL calls).
The train step's consumption rate comes from `train_step_images_per_second` (the quickstart UNet).

    python benchmarks/bench_data.py [--images 384] [--batch_size 32] [--batches 24]

--pod (docs/benchmarks.md, "Prepared datasets"): --jpegs 512x512 JPEGs in a folder, prepared by
jax-uncond-prepare at 64 px (center crop, PNG); each of the loader's sides in a fresh process: the
seconds from `make_train_loader` to the first global batch on the device (the folder cold, with a
fresh `datasets` cache, and warm), images/s at 64 px with --workers, and the resident memory of the
process and its workers; then the start-up on synthetic prepared folders of up to --records tiny records.

    python benchmarks/bench_data.py --pod [--jpegs 50000] [--records 1000000] [--workers 0 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import sides  # noqa: E402

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


def _write_jpegs(root: str, indices: range, width: int, height: int) -> None:
    """Photo-like JPEGs (smooth gradients plus noise), image i from its own seed."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = [(np.sin(x / (20 + 7 * c) + y / 31), np.cos(x / (20 + 7 * c) + y / 31)) for c in range(3)]
    for i in indices:
        rng = np.random.default_rng([0, i])
        phase = rng.uniform(0, 6.28, 3)  # sin(a + p) = sin a cos p + cos a sin p: the waves are computed once
        image = np.stack([128 + 100 * (s * np.cos(p) + c * np.sin(p)) for (s, c), p in zip(waves, phase)], axis=-1)
        image += rng.standard_normal(image.shape, dtype=np.float32) * 12
        path = os.path.join(root, f"class_{i % 2}", f"{i}.jpg")
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_jpeg_folder(root: str, count: int, width: int = 320, height: int = 256, processes: int = 1) -> str:
    """`count` photo-like JPEGs of width x height in two nested folders, written by `processes` processes."""
    for c in range(2):
        os.makedirs(os.path.join(root, f"class_{c}"), exist_ok=True)
    parts = [range(p, count, processes) for p in range(processes)]
    if processes == 1:
        _write_jpegs(root, parts[0], width, height)
    else:
        with multiprocessing.get_context("spawn").Pool(processes) as pool:
            pool.starmap(_write_jpegs, [(root, part, width, height) for part in parts])
    return root


def loader_figures(flags: list[str], workers: int, batch_size: int, batches: int) -> dict[str, float]:
    """jax_uncond's loader on train_flax.py's data `flags`, global device batches included: the seconds from
    `make_train_loader` to the first batch (`startup_s`), images/s over `batches` after one more warm-up batch,
    and the resident memory of this process and its workers at the end (`resident_mb`)."""
    import jax

    from jax_uncond.data import make_train_loader
    from jax_uncond.training.config import parse_args
    from jax_uncond.training.sharding import make_mesh

    config = parse_args([*flags, "--dataloader_num_workers", str(workers)])
    mesh = make_mesh(jax.devices())
    start = time.perf_counter()
    loader = make_train_loader(config, mesh, batch_size=batch_size)
    next(loader)["images"].block_until_ready()
    startup = time.perf_counter() - start
    next(loader)["images"].block_until_ready()
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)["images"].block_until_ready()
    rate = batches * batch_size / (time.perf_counter() - start)
    memory = resident_mb()
    loader.close()
    return {"startup_s": startup, "images_per_s": rate, "resident_mb": memory}


def resident_mb() -> float:
    """Resident memory (VmRSS, Linux) of this process and its child processes (Grain's workers), in MB."""
    total_kb = 0
    for pid in [os.getpid(), *(child.pid for child in multiprocessing.active_children())]:
        with open(f"/proc/{pid}/status") as f:
            total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return total_kb / 1024


def grain_rate(data_dir: str, cache_dir: str, resolution: int, workers: int, batch_size: int, batches: int) -> float:
    """Images/s of jax_uncond's loader on the folder, global device batches included."""
    flags = ["--train_data_dir", data_dir, "--cache_dir", cache_dir, "--resolution", str(resolution), "--random_flip"]
    return loader_figures(flags, workers, batch_size, batches)["images_per_s"]


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


def side_figures(flags: list[str], workers: int, batch_size: int, batches: int) -> dict[str, float]:
    """`loader_figures` in a fresh process (a clean start-up and memory figure; run with this file's `--side`)."""
    request = json.dumps({"flags": flags, "workers": workers, "batch_size": batch_size, "batches": batches})
    return sides.run_side([sys.executable, os.path.abspath(__file__), "--side", request], env=_clone_env())


def _clone_env() -> dict[str, str]:
    """The environment of a side process that imports this clone's jax_uncond."""
    return dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))


def write_synthetic_prepared(out: str, count: int) -> str:
    """A prepared folder of `count` records (one 8x8 PNG, repeated) in jax-uncond-prepare's default shards, with its
    manifest: what start-up reads of a large prepared dataset, written in seconds."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from jax_uncond.data import arrayrecord
    from jax_uncond.prepare import IMAGES_PER_SHARD

    os.makedirs(out, exist_ok=True)
    record = arrayrecord.encode(np.full((8, 8, 3), 128, np.uint8), "png", None)
    num_shards = -(-count // IMAGES_PER_SHARD)
    shards = []
    for s, (start, end) in enumerate(arrayrecord.shard_ranges(count, num_shards)):
        name = arrayrecord.shard_name(s, num_shards)
        writer = ArrayRecordWriter(os.path.join(out, name), arrayrecord.WRITER_OPTIONS)
        for _ in range(end - start):
            writer.write(record)
        writer.close()
        shards.append(arrayrecord.Shard(name, end - start, os.path.getsize(os.path.join(out, name))))
    manifest = arrayrecord.Manifest(num_records=count, resolution=8, center_crop=True, encoding="png", quality=None,
                                    source={}, fingerprint="synthetic", max_images=None, shards=tuple(shards),
                                    skipped=())
    with open(os.path.join(out, arrayrecord.MANIFEST), "w") as f:
        json.dump(manifest.to_json(), f)
    return out


def folder_mb(folder: str) -> float:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(folder) for name in names) / 1e6


def pod(args: argparse.Namespace, tmp: str) -> dict:
    """The --pod measurements (module docstring), printed as they come; returns them."""
    figures: dict = {"jpegs": args.jpegs, "batch_size": args.batch_size, "cpus": os.cpu_count(), "load_before":
                     os.getloadavg()[0]}
    start = time.perf_counter()
    folder = make_jpeg_folder(os.path.join(tmp, "jpegs"), args.jpegs, 512, 512, processes=os.cpu_count() or 1)
    figures["make_jpegs_s"] = time.perf_counter() - start
    figures["folder_mb"] = folder_mb(folder)
    print(f"{args.jpegs} JPEGs of 512x512 ({figures['folder_mb']:.0f} MB) written in {figures['make_jpegs_s']:.0f} s; "
          f"{os.cpu_count()} CPUs, load average {figures['load_before']:.1f}", flush=True)
    cache = os.path.join(tmp, "cache")
    common = ["--resolution", "64", "--center_crop", "--random_flip", "--cache_dir", cache]
    timed = (args.batch_size, args.batches)
    figures["folder_cold"] = side_figures(["--train_data_dir", folder, *common], 0, *timed)
    print(f"folder, cold start (a fresh datasets cache): {figures['folder_cold']['startup_s']:.1f} s", flush=True)

    start = time.perf_counter()
    prepared = os.path.join(tmp, "prepared")
    sides.run([sys.executable, "-m", "jax_uncond.prepare", prepared, "--train_data_dir", folder, "--cache_dir", cache,
               "--resolution", "64", "--center_crop", "--dataloader_num_workers", str(os.cpu_count() or 1)],
              env=_clone_env())
    figures["prepare_s"] = time.perf_counter() - start
    figures["prepared_mb"] = folder_mb(prepared)
    print(f"jax-uncond-prepare at 64 px, PNG, {os.cpu_count()} workers: {figures['prepare_s']:.0f} s "
          f"({args.jpegs / figures['prepare_s']:.0f} images/s), {figures['prepared_mb']:.0f} MB", flush=True)

    print(f"{'workers':>7} {'source':>9} {'start-up s':>10} {'img/s':>7} {'memory MB':>9} {'img/s ratio':>11}")
    for workers in args.workers:
        row = {name: side_figures(["--train_data_dir", data, *common], workers, *timed)
               for name, data in (("folder", folder), ("prepared", prepared))}
        row["ratio"] = row["prepared"]["images_per_s"] / row["folder"]["images_per_s"]
        figures[f"workers_{workers}"] = row
        for name in ("folder", "prepared"):
            f = row[name]
            ratio = f"{row['ratio']:.2f}x" if name == "prepared" else "1.00x"
            print(f"{workers:>7} {name:>9} {f['startup_s']:>10.2f} {f['images_per_s']:>7.0f} {f['resident_mb']:>9.0f} "
                  f"{ratio:>11}", flush=True)

    print(f"start-up on synthetic prepared folders (8x8 PNG records, shards of the default size, batch "
          f"{args.batch_size} at 8 px)")
    counts = [c for c in (10_000, 100_000, 1_000_000) if c < args.records] + [args.records]
    for count in counts:
        start = time.perf_counter()
        synthetic = write_synthetic_prepared(os.path.join(tmp, f"synthetic_{count}"), count)
        written = time.perf_counter() - start
        for workers in sorted({0, max(args.workers)}) if count == args.records else [0]:
            f = side_figures(["--train_data_dir", synthetic, "--resolution", "8"], workers, *timed)
            figures[f"synthetic_{count}_workers_{workers}"] = {**f, "written_s": written}
            print(f"{count:>9} records, {workers} workers: start-up {f['startup_s']:.2f} s, memory "
                  f"{f['resident_mb']:.0f} MB (written in {written:.1f} s)", flush=True)
        shutil.rmtree(synthetic)
    figures["load_after"] = os.getloadavg()[0]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=384)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--no_torch", action="store_true", help="skip the PyTorch DataLoader baseline")
    parser.add_argument("--resolutions", type=int, nargs="+", default=RESOLUTIONS)
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help=f"worker processes to try (default: {' '.join(map(str, WORKERS))}; with --pod, 0 2)")
    parser.add_argument("--no_step", action="store_true", help="skip the train step's consumption rate")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--pod", action="store_true", help="the image folder against the same images prepared")
    parser.add_argument("--jpegs", type=int, default=50_000, help="with --pod: 512x512 JPEGs to make")
    parser.add_argument("--records", type=int, default=1_000_000, help="with --pod: the largest synthetic prepared set")
    parser.add_argument("--tmp", default=None, help="with --pod: the folder for the data (default: a temporary one)")
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        sides.report(loader_figures(**json.loads(args.side)))
        return
    args.workers = args.workers or ((0, 2) if args.pod else WORKERS)
    if args.pod:
        with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
            figures = pod(args, tmp)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
        return
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
