"""Prepare a dataset once for training anywhere: `jax-uncond-prepare OUT [source flags] --resolution R`.

Reads any source train_flax.py reads, with its flags and its bad-file handling, resizes the shorter side to
--resolution (and center-crops with --center_crop), encodes every image (PNG, JPEG or raw) and writes
ArrayRecord shards and a manifest to OUT, which `train_flax.py --train_data_dir OUT` reads (docs/data.md).
Images are decoded in --dataloader_num_workers processes. Run again after a crash or a kill, the same
command keeps the finished shards and writes the others, byte for byte as an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import shutil
import signal
import sys
from typing import Any, Sequence

from tqdm import tqdm

from jax_uncond import __version__
from jax_uncond.console import setup_logging
from jax_uncond.data import arrayrecord
from jax_uncond.data.arrayrecord import MANIFEST, WORK_DIR, Manifest, Shard, Skipped
from jax_uncond.data.sources import ImageSource, load_source
from jax_uncond.data.transforms import BAD_IMAGE_ERRORS, center_cropped, decode_image, resized_rgb
from jax_uncond.errors import RunError, UsageError
from jax_uncond.run.faults import injected_at
from jax_uncond.training.config import FLAGS, TrainConfig, add_flag, validate

logger = logging.getLogger(__name__)

SOURCE_FLAGS = ("dataset_name", "dataset_config_name", "train_data_dir", "image_column", "tfds_data_dir")
"""train_flax.py's flags that name the source; the manifest records them."""
SHARED_FLAGS = SOURCE_FLAGS + ("cache_dir", "resolution", "center_crop", "dataloader_num_workers")
IMAGES_PER_SHARD = 4096
"""The default --num_shards gives shards of about this many images: a killed prepare loses at most one's work."""
DEFAULT_QUALITY = 95
PLAN = "plan.json"


@dataclasses.dataclass(frozen=True)
class Options:
    """prepare's own settings, beside the shared training flags."""

    encoding: str = "png"
    quality: int | None = None
    num_shards: int | None = None
    max_images: int | None = None


class EncodeRecord:
    """Source index -> {"record": the encoded image, empty when it cannot be decoded; "error": why, or ""}
    (a Grain map)."""

    def __init__(self, source: ImageSource, resolution: int, center_crop: bool, encoding: str, quality: int | None):
        self._source = source
        self._resolution = resolution
        self._center_crop = center_crop
        self._encoding = encoding
        self._quality = quality

    def __call__(self, index: int) -> dict[str, Any]:
        try:
            pixels = resized_rgb(decode_image(self._source[int(index)], self._resolution), self._resolution)
        except BAD_IMAGE_ERRORS as e:
            return {"record": b"", "error": f"{type(e).__name__}: {e}"}
        if self._center_crop:
            pixels = center_cropped(pixels, self._resolution)
        return {"record": arrayrecord.encode(pixels, self._encoding, self._quality), "error": ""}


def _write_json(path: str, value: Any) -> None:
    """Atomically (a reader sees the old file or the new one, never half of one)."""
    with open(f"{path}.tmp", "w") as f:
        json.dump(value, f, indent=1)
    os.replace(f"{path}.tmp", path)


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _settings(manifest: Manifest) -> dict[str, Any]:
    """What decides a prepared folder's bytes, comparable between a finished folder and an unfinished plan.
    Not the source flags themselves: the same files named by another path are the same source."""
    return json.loads(json.dumps({
        "fingerprint": manifest.fingerprint, "num_records": manifest.num_records, "resolution": manifest.resolution,
        "center_crop": manifest.center_crop, "encoding": manifest.encoding, "quality": manifest.quality,
        "max_images": manifest.max_images, "num_shards": len(manifest.shards), "tool": manifest.tool}))


def _differences(found: dict[str, Any], wanted: dict[str, Any]) -> str:
    return ", ".join(f"{k} {found.get(k)!r} there, {wanted[k]!r} here" for k in wanted if found.get(k) != wanted[k])


def _check_out(out: str, settings: dict[str, Any]) -> bool:
    """Whether `out` already holds this prepared dataset; a UsageError when it holds anything else."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"{out} is a file; give a folder for the prepared dataset")
    if os.path.isfile(os.path.join(out, MANIFEST)):
        found = _settings(arrayrecord.read_manifest(out, out))
        if found != settings:
            raise UsageError(f"{out} already holds a prepared dataset of other settings "
                             f"({_differences(found, settings)}); give another folder or remove it")
        return True
    plan = os.path.join(out, WORK_DIR, PLAN)
    if os.path.isfile(plan):
        found = _read_json(plan)
        if found != settings:
            raise UsageError(f"{out} holds an unfinished prepare of other settings ({_differences(found, settings)}); "
                             "run that command again to finish it, or remove the folder")
    elif os.path.isdir(out) and set(os.listdir(out)) - {WORK_DIR}:
        raise UsageError(f"{out} is not empty and holds no prepare; give a new or empty folder")
    return False


def _finished(out: str, name: str) -> dict[str, Any] | None:
    """The note of shard `name` when it was finished (the note is written after the shard is in place)."""
    note = os.path.join(out, WORK_DIR, f"{name}.json")
    if not os.path.isfile(note):
        return None
    done = _read_json(note)
    path = os.path.join(out, name)
    return done if os.path.isfile(path) and os.path.getsize(path) == done["bytes"] else None


def _die_as_preempted() -> None:
    """SIGKILL the Grain workers and this process, as a preempted machine loses them (JAX_UNCOND_FAULTS, tests)."""
    for child in multiprocessing.active_children():
        os.kill(child.pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _write_shard(out: str, name: str, records: Any, first: int, count: int, source: ImageSource, bar: tqdm,
                 kill_at: int | None) -> dict[str, Any]:
    """Writes `count` records from the iterator `records` as shard `name` (records first .. first+count-1), then its
    note; returns the note."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.path.join(out, name)
    partial = os.path.join(out, WORK_DIR, f"{name}.partial")
    writer = ArrayRecordWriter(partial, arrayrecord.WRITER_OPTIONS)
    skipped = []
    for index in range(first, first + count):
        element = next(records)
        writer.write(element["record"])
        if element["error"]:
            logger.warning("skipping %s: not a usable image (%s); its record is left empty",
                           source.describe(index), element["error"])
            skipped.append(dataclasses.asdict(Skipped(source.describe(index), element["error"], index)))
        bar.update(1)
        if kill_at is not None and bar.n == kill_at:
            _die_as_preempted()
    writer.close()
    with open(partial, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(partial, path)
    note = {"records": count, "bytes": os.path.getsize(path), "skipped": skipped}
    _write_json(os.path.join(out, WORK_DIR, f"{name}.json"), note)
    return note


def prepare(config: TrainConfig, out: str, options: Options) -> str:
    """Writes the prepared dataset of `config`'s source to `out` (or finishes an unfinished one); returns a one-line
    summary."""
    import grain  # here, not at the top: importing it configures logging (see jax_uncond.data)

    from jax_uncond.data.loader import iterate

    source, left_out = load_source(config)
    num_records = len(source) if options.max_images is None else min(len(source), options.max_images)
    num_shards = options.num_shards or max(1, math.ceil(num_records / IMAGES_PER_SHARD))
    quality = (options.quality or DEFAULT_QUALITY) if options.encoding == "jpeg" else None
    names = [arrayrecord.shard_name(s, num_shards) for s in range(num_shards)]
    manifest = Manifest(
        num_records=num_records, resolution=config.resolution, center_crop=config.center_crop,
        encoding=options.encoding, quality=quality,
        source={k: getattr(config, k) for k in SOURCE_FLAGS if getattr(config, k) is not None},
        fingerprint=source.fingerprint(), max_images=options.max_images,
        shards=tuple(Shard(name, 0, 0) for name in names), skipped=())
    settings = _settings(manifest)
    if _check_out(out, settings):
        return f"{out} already holds this prepared dataset ({num_records} records); nothing to do"
    try:
        os.makedirs(os.path.join(out, WORK_DIR), exist_ok=True)
        _write_json(os.path.join(out, WORK_DIR, PLAN), settings)
        ranges = arrayrecord.shard_ranges(num_records, num_shards)
        notes = {name: _finished(out, name) for name in names}
        todo = [s for s, name in enumerate(names) if notes[name] is None]
        indices = [i for s in todo for i in range(*ranges[s])]
        encode = EncodeRecord(source, config.resolution, config.center_crop, options.encoding, quality)
        records = iterate(grain.MapDataset.source(indices).map(encode), config.dataloader_num_workers if todo else 0)
        try:
            with tqdm(total=num_records, initial=num_records - len(indices), desc="prepare", unit="img") as bar:
                for s in todo:
                    start, end = ranges[s]
                    notes[names[s]] = _write_shard(out, names[s], records, start, end - start, source, bar,
                                                   injected_at("prepare_kill"))
        finally:
            getattr(records, "close", lambda: None)()  # Grain's worker processes
        skipped = [Skipped(path, "left out by the source at start-up (unreadable header or too many pixels)")
                   for path in left_out]
        skipped += [Skipped(**entry) for name in names for entry in notes[name]["skipped"]]
        manifest = dataclasses.replace(
            manifest, shards=tuple(Shard(name, notes[name]["records"], notes[name]["bytes"]) for name in names),
            skipped=tuple(skipped))
        _write_json(os.path.join(out, MANIFEST), manifest.to_json())
        shutil.rmtree(os.path.join(out, WORK_DIR))
    except OSError as e:
        raise RunError(f"writing {out} failed ({type(e).__name__}: {e}); fix it and run the same command again "
                       "(finished shards are kept)") from e
    size = sum(s.bytes for s in manifest.shards)
    return (f"{num_records} records at {config.resolution} px ({len(skipped)} source files skipped, named in "
            f"{MANIFEST}) written to {out}: {num_shards} shards, {size / 1e6:.1f} MB")


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False,
        epilog="Without --center_crop only the shorter side is resized, so training still crops at random; flips "
               "stay with training. Train from OUT with `train_flax.py --train_data_dir OUT` (docs/data.md).")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("out", metavar="OUT", help="The folder to write (new or empty, or an unfinished prepare's).")
    parser.add_argument("--format", dest="encoding", choices=tuple(arrayrecord.ENCODINGS), default="png",
                        help="How images are stored: png (lossless), jpeg (--quality) or raw 8-bit RGB (no decoding "
                             "cost, the most bytes) (default: %(default)s).")
    parser.add_argument("--quality", type=int, default=None,
                        help=f"JPEG quality, 1-100, with --format jpeg (default: {DEFAULT_QUALITY}).")
    parser.add_argument("--num_shards", type=int, default=None,
                        help=f"ArrayRecord files to write (default: one per {IMAGES_PER_SHARD} images).")
    parser.add_argument("--max_images", type=int, default=None,
                        help="Prepare only the source's first this many images (a sample).")
    shared = parser.add_argument_group("shared with train_flax.py")
    for flag in FLAGS:
        if flag.name in SHARED_FLAGS:
            add_flag(shared, flag)
    parser.set_defaults(dataloader_num_workers=os.cpu_count() or 1)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> tuple[TrainConfig, str, Options]:
    args = parser.parse_args(argv)
    options = Options(args.encoding, args.quality, args.num_shards, args.max_images)
    if options.quality is not None and options.encoding != "jpeg":
        parser.error("--quality applies to --format jpeg only")
    if options.quality is not None and not 1 <= options.quality <= 100:
        parser.error(f"--quality must be in 1..100, got {options.quality}")
    for name in ("num_shards", "max_images"):
        if getattr(options, name) is not None and getattr(options, name) <= 0:
            parser.error(f"--{name} must be positive, got {getattr(options, name)}")
    try:
        config = validate(TrainConfig(**{name: getattr(args, name) for name in SHARED_FLAGS}))
    except ValueError as e:
        parser.error(str(e))
    return config, args.out, options


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`jax-uncond-prepare` (`prog`: the command's name in --help and errors; default: how it was called)."""
    setup_logging()
    parser = build_parser(prog)
    config, out, options = _parse(parser, argv)
    try:
        print(prepare(config, out, options))
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except RunError as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jax_uncond.prepare"))
