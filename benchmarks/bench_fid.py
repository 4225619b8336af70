"""FID feature extraction throughput: this project's Flax Inception vs pytorch-fid's `InceptionV3([3])`.

Both sides take the same uint8 images (default 64x64, resized to 299x299 inside as pytorch-fid does) and
the same weights file (random weights of the right shapes unless --inception_weights names the real
one; speed does not depend on the values), and return the 2048 pool3 features. JAX runs its compiled
network over all local devices; PyTorch runs pytorch-fid's model on CUDA if present, else the CPU.
Each side runs in its own process (their CPU thread pools slow each other down), alternately
(jax, torch, jax, torch, ...); the best round of each counts. Prints images/s, the ratio and JAX's
compile time.

    python benchmarks/bench_fid.py                         # CPU: batch 8, 64x64 (a few minutes)
    python benchmarks/bench_fid.py --batch 200 --batches 10  # a GPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from jax_uncond import xla_flags  # noqa: E402

xla_flags.apply()  # as jax-uncond-evaluate does: the project's XLA:CPU options, before the backend starts
import numpy as np  # noqa: E402
from sides import report, run_side  # noqa: E402


def images(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


def jax_side(args: argparse.Namespace) -> dict:
    import jax

    from jax_uncond.evaluation.features import InceptionFeatures
    from jax_uncond.evaluation.inception_weights import load_inception_weights
    from jax_uncond.training.sharding import batch_sharding, make_mesh

    mesh = make_mesh(jax.local_devices())
    extractor = InceptionFeatures(load_inception_weights(args.inception_weights).params, mesh, args.batch)
    batch = jax.device_put(images(args.batch, args.size), batch_sharding(mesh))
    start = time.perf_counter()
    jax.block_until_ready(extractor(batch))
    first = time.perf_counter() - start

    def run() -> float:
        start = time.perf_counter()
        for _ in range(args.batches):
            out = extractor(batch)
        jax.block_until_ready(out)
        return time.perf_counter() - start

    seconds = min(run() for _ in range(args.rounds))
    return {"images_per_s": args.batches * args.batch / seconds, "compile_s": first - seconds / args.batches,
            "where": f"{jax.local_device_count()} x {jax.local_devices()[0].device_kind}"}


def torch_side(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from fid_parts import pytorch_inception

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = pytorch_inception(args.inception_weights).to(device)
    # What pytorch-fid's get_activations feeds: ToTensor (/255, CHW), batched.
    batch = torch.from_numpy(images(args.batch, args.size).transpose(0, 3, 1, 2).copy()).to(device).float().div(255)

    def run() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for _ in range(args.batches):
                out = model(batch)[0]
            out.cpu()
        return time.perf_counter() - start

    run()  # warm-up
    seconds = min(run() for _ in range(args.rounds))
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    return {"images_per_s": args.batches * args.batch / seconds, "where": where}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per call (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=3, help="calls per timed round (default: %(default)s)")
    parser.add_argument("--size", type=int, default=64, help="input image size (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per process; the best counts")
    parser.add_argument("--processes", type=int, default=2, help="processes per side, alternating (default: 2)")
    parser.add_argument("--inception_weights", help="a weights file (default: random weights of the right shapes)")
    parser.add_argument("--torch_threads", type=int, help="PyTorch CPU threads (default: PyTorch's choice)")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(jax_side(args) if args.side == "jax" else torch_side(args))
        return
    argv = sys.argv[1:]
    if args.inception_weights is None:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from fid_parts import weights_files

        argv += ["--inception_weights", weights_files()["zip"]]
    results: dict[str, list[dict]] = {"jax": [], "torch": []}
    for _ in range(args.processes):
        for side in results:
            results[side].append(run_side([sys.executable, __file__, *argv, "--side", side]))
    best = {side: max(runs, key=lambda r: r["images_per_s"]) for side, runs in results.items()}
    print(f"Inception features of {args.size}x{args.size} uint8 images, batch {args.batch}, float32")
    print(f"jax:   {best['jax']['images_per_s']:.2f} images/s on {best['jax']['where']} "
          f"(compile {best['jax']['compile_s']:.1f}s; rounds {[round(r['images_per_s'], 2) for r in results['jax']]})")
    print(f"torch: {best['torch']['images_per_s']:.2f} images/s on {best['torch']['where']} "
          f"(rounds {[round(r['images_per_s'], 2) for r in results['torch']]})")
    print(f"ratio jax/torch: {best['jax']['images_per_s'] / best['torch']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
