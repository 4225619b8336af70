"""FID and KID in JAX: `python -m jax_uncond.evaluate (PIPELINE_DIR | --images DIR) --reference (DIR | FILE.npz)`.

Scores either a DDPMPipeline folder (it samples --num_samples images itself, over every device) or a
folder of image files (e.g. samples written by PyTorch), against a folder of images, an `.npz` of
statistics (`mu`, `sigma`: pytorch-fid's format), or the training data given by train_flax.py's data
flags. The number equals pytorch-fid's on the same images (docs/evaluation.md). Progress goes to stderr;
the last line of stdout is one JSON object. No PyTorch needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import jax

from jax_uncond import __version__, xla_flags
from jax_uncond.console import say, setup_logging
from jax_uncond.errors import UsageError
from jax_uncond.evaluation.features import InceptionFeatures
from jax_uncond.evaluation.inception import BLOCK_INDEX_BY_DIM, FEATURE_DIM
from jax_uncond.evaluation.statistics import FeatureStatistics
from jax_uncond.schedulers.samplers import SAMPLERS, checked_sampler, default_steps
from jax_uncond.training.config import FLAGS, TrainConfig, add_flag

DATA_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "cache_dir", "resolution", "center_crop",
              "preserve_input_precision", "image_column", "tfds_data_dir")
"""train_flax.py's flags that name the reference dataset (no flip: every image once, as training crops it)."""
SHARED_FLAGS = DATA_FLAGS + ("inception_weights", "coordinator_address", "num_processes", "process_id")
PER_DEVICE_BATCH = 16


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("pipeline_dir", nargs="?", default=None,
                        help="A DDPMPipeline folder to sample and score (or give --images).")
    parser.add_argument("--images", default=None, help="A folder of image files to score instead of a pipeline.")
    parser.add_argument("--reference", default=None,
                        help="A folder of images or an .npz with `mu` and `sigma`. Default: the dataset of the data "
                             "flags below (the built-in dataset without them).")
    parser.add_argument("--num_samples", type=int, default=10000, help="Images to sample (default: %(default)s).")
    parser.add_argument("--scheduler", choices=tuple(SAMPLERS), default="ddim",
                        help="The sampler, built from the folder's noise schedule (default: %(default)s).")
    parser.add_argument("--steps", type=int, default=None,
                        help="Denoising steps (default: the sampler's usual count, 50 for ddim; the training steps "
                             "for ddpm).")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"Images per compiled call over all devices, a multiple of their count (default: "
                             f"{PER_DEVICE_BATCH} per device).")
    parser.add_argument("--dims", type=int, choices=tuple(BLOCK_INDEX_BY_DIM), default=FEATURE_DIM,
                        help="Inception features: 2048 (pool3, the standard) or an earlier block's, as pytorch-fid's "
                             "--dims (default: %(default)s).")
    parser.add_argument("--seed", type=int, default=0,
                        help="Seeds the noise (and random crops) (default: %(default)s).")
    parser.add_argument("--save_stats", default=None, metavar="FILE.npz",
                        help="Write the statistics of what was scored (mu, sigma: pytorch-fid's format; features).")
    shared = parser.add_argument_group("shared with train_flax.py")
    for flag in FLAGS:
        if flag.name in SHARED_FLAGS:
            add_flag(shared, flag)
    parser.set_defaults(resolution=None)
    return parser


def _config(args: argparse.Namespace, resolution: int) -> Any:
    """The TrainConfig of the shared flags (data, weights, processes), as the training helpers take it."""
    values = {name: getattr(args, name) for name in SHARED_FLAGS}
    return TrainConfig(**{**values, "resolution": resolution, "seed": args.seed, "random_flip": False})


def _check(args: argparse.Namespace) -> None:
    if (args.pipeline_dir is None) == (args.images is None):
        raise UsageError("give exactly one of a pipeline folder (to sample) and --images DIR")
    for name in ("num_samples", "steps", "batch_size", "resolution"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} must be positive, got {value}")
    if args.pipeline_dir is not None and args.num_samples < 2:
        raise UsageError(f"--num_samples {args.num_samples}: FID needs at least 2 images")
    if args.save_stats is not None and not args.save_stats.endswith(".npz"):
        raise UsageError(f"--save_stats {args.save_stats}: the file name must end in .npz")
    if args.reference is not None and any(getattr(args, name) not in (None, False) for name in DATA_FLAGS):
        raise UsageError("--reference and the data flags (--dataset_name, --train_data_dir, ...) both name the "
                         "reference; give one")


def _reference(args: argparse.Namespace, config: Any, extractor: InceptionFeatures,
               weights_sha256: str) -> FeatureStatistics:
    """--reference (a folder or an .npz), else the dataset of the data flags (the built-in one without them)."""
    from jax_uncond.evaluation.reference import dataset_features, reference_statistics

    if args.reference is not None:
        return reference_statistics(args.reference, config, extractor, weights_sha256, flag="--reference")[0]
    if not any(getattr(args, name) for name in ("dataset_name", "train_data_dir")):
        say("reference: the built-in dataset (no --reference, --dataset_name or --train_data_dir)", file=sys.stderr)
    from jax_uncond.data.sources import load_source

    return FeatureStatistics.from_features(dataset_features(load_source(config)[0], config, extractor))


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Scores what `args` name; returns the JSON-able result (on process 0; {} on the others)."""
    from jax_uncond.evaluation.fid import sample_features
    from jax_uncond.evaluation.inception_weights import load_inception_weights
    from jax_uncond.evaluation.reference import ImageFolder
    from jax_uncond.evaluation.statistics import scores
    from jax_uncond.training import sharding
    from jax_uncond.run import distributed

    _check(args)
    try:
        distributed.initialize(_config(args, 0))
    except ValueError as e:  # the process flags do not go together
        raise UsageError(str(e)) from e
    jax.config.update("jax_threefry_partitionable", True)  # the same images whatever the device count
    mesh = sharding.make_mesh()
    if args.pipeline_dir is not None:  # the cheap checks of what is scored come before any computation
        from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline

        try:
            pipeline, params = FlaxDDPMPipeline.from_pretrained(args.pipeline_dir)
        except (OSError, ValueError) as e:
            raise UsageError(f"{args.pipeline_dir}: not a loadable DDPMPipeline folder ({e})") from e
        size = pipeline.unet.sample_size
        resolution = size if isinstance(size, int) else size[0]
        steps = args.steps or default_steps(args.scheduler, len(pipeline.scheduler))
        try:
            scheduler = checked_sampler(args.scheduler, pipeline.scheduler, steps)
        except ValueError as e:
            raise UsageError(f"--scheduler {args.scheduler} with {steps} steps: {e}") from e
    else:
        scored = ImageFolder.scan(args.images, "--images")
        resolution = scored.shapes[0][0]
    weights = load_inception_weights(args.inception_weights)
    if weights.note():
        say(weights.note(), file=sys.stderr)
    batch_size = args.batch_size or PER_DEVICE_BATCH * sharding.data_parallel_size(mesh)
    extractor = InceptionFeatures(weights.params, mesh, batch_size, args.dims)
    reference = _reference(args, _config(args, args.resolution or resolution), extractor, weights.sha256)
    result: dict[str, Any] = {}
    if args.pipeline_dir is not None:
        params = sharding.put_replicated(params, mesh)
        features = sample_features(pipeline, params, scheduler, steps, args.num_samples, extractor, args.seed)
        result.update(scheduler=args.scheduler, steps=steps, seed=args.seed)
    else:
        features = scored.features(extractor, desc="images")
    if jax.process_index() != 0:
        return {}
    samples = FeatureStatistics.from_features(features)
    if args.save_stats is not None:
        samples.save(args.save_stats)
    return {**scores(samples, reference), "num_samples": samples.num_images, "num_reference": reference.num_images,
            "dims": args.dims, **result, "inception_weights_sha256": weights.sha256}


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`python -m jax_uncond.evaluate` (`prog`: the command's name in --help and errors; default: how it was
    called). Returns 0, or 2 (one line on stderr) for a bad invocation."""
    setup_logging()
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    xla_flags.apply()
    try:
        result = evaluate(args)
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    if result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jax_uncond.evaluate"))
