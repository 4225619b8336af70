"""Prepared datasets: images resized once into ArrayRecord shards and a manifest, read at random access.

`jax-uncond-prepare` (`jax_uncond/prepare.py`) writes a folder of `data-SSSSS-of-NNNNN.array_record`
shards and `jax_uncond_manifest.json`; training reads it through Grain's ArrayRecord source, with
`--train_data_dir FOLDER` (recognised by its manifest) or `--dataset_name arrayrecord:FOLDER`.

Record i is image i of the source, in the source's own order, so the loader's shuffle and per-process
shares are the source's: a run on the prepared folder sees the images a run on the source sees, in the
same order. An image that could not be decoded while preparing keeps its place as an empty record (the
loader replaces it by the next usable image, as it does reading the source) and is named in the
manifest with its reason, as are the files the source left out at start-up.

Records are PNG, JPEG or binary PPM files (8-bit RGB, "raw": a 15-byte header and the pixels), all
read by `transforms.decode_image`. Start-up reads only the manifest and each shard's index (its footer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
from typing import Any

import numpy as np
from PIL import Image

from jax_uncond import __version__
from jax_uncond.errors import UsageError

PREFIX = "arrayrecord:"
MANIFEST = "jax_uncond_manifest.json"
WORK_DIR = ".prepare"
"""An unfinished prepare's plan and finished-shard notes; removed when the manifest is written."""
FORMAT = "jax_uncond prepared images"
VERSION = 1
ENCODINGS = {"png": "PNG", "jpeg": "JPEG", "raw": "PPM"}
"""--format -> the PIL format of the records."""
WRITER_OPTIONS = "group_size:1,uncompressed"
"""One record per chunk (what Grain's random access wants); no zstd on top of PNG/JPEG."""
READER_OPTIONS = "readahead_buffer_size:0"
"""Grain's own reader options for random access (no read-ahead)."""


def shard_name(index: int, count: int) -> str:
    return f"data-{index:05d}-of-{count:05d}.array_record"


def shard_ranges(num_records: int, num_shards: int) -> list[tuple[int, int]]:
    """Shard s holds records [start, end): consecutive, equal up to one record."""
    bounds = [num_records * s // num_shards for s in range(num_shards + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def encode(pixels: np.ndarray, encoding: str, quality: int | None) -> bytes:
    """An HWC uint8 RGB array as the bytes of one record (deterministic: equal pixels give equal bytes)."""
    buffer = io.BytesIO()
    options = {"quality": quality} if encoding == "jpeg" else {}
    Image.fromarray(pixels).save(buffer, format=ENCODINGS[encoding], **options)
    return buffer.getvalue()


@dataclasses.dataclass(frozen=True)
class Shard:
    file: str
    records: int
    bytes: int


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A source file the prepared folder lacks: `record` is the empty record standing in for it, or None when the
    source left it out at start-up (its header was unreadable or declared too many pixels)."""

    path: str
    reason: str
    record: int | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What a prepared folder holds and where it came from (`jax_uncond_manifest.json`)."""

    num_records: int
    resolution: int
    center_crop: bool
    encoding: str
    quality: int | None
    source: dict[str, Any]
    """The source flags given to prepare (--dataset_name, --train_data_dir, ...)."""
    fingerprint: str
    """The source's fingerprint (`ImageSource.fingerprint`): which files or rows, in which versions."""
    max_images: int | None
    shards: tuple[Shard, ...]
    skipped: tuple[Skipped, ...]
    tool: str = f"jax_uncond {__version__}"

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Raises ValueError when `data` is not a manifest of this version."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT!r} manifest")
        if data.get("version") != VERSION:
            raise ValueError(f"manifest version {data.get('version')}, this jax_uncond reads version {VERSION}")
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(fields - set(data))
        if missing:
            raise ValueError(f"missing keys: {', '.join(missing)}")
        values = {k: data[k] for k in fields}
        try:
            values["shards"] = tuple(Shard(**s) for s in data["shards"])
            values["skipped"] = tuple(Skipped(**s) for s in data["skipped"])
        except TypeError as e:
            raise ValueError(f"malformed shards or skipped entries ({e})") from e
        if data["encoding"] not in ENCODINGS or sum(s.records for s in values["shards"]) != data["num_records"]:
            raise ValueError("its encoding or record counts are inconsistent")
        return cls(**values)


def is_prepared(folder: str) -> bool:
    """Whether `folder` is the output of jax-uncond-prepare (finished or not)."""
    return os.path.isfile(os.path.join(folder, MANIFEST)) or os.path.isdir(os.path.join(folder, WORK_DIR))


def read_manifest(folder: str, origin: str) -> Manifest:
    """The manifest of the prepared `folder`; a UsageError naming `origin` (the flag) when there is none or it
    is unreadable."""
    if not os.path.isdir(folder):
        raise UsageError(f"{origin}: no such folder")
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        unfinished = os.path.isdir(os.path.join(folder, WORK_DIR))
        raise UsageError(f"{origin}: " + ("an unfinished jax-uncond-prepare (no manifest yet); run the same "
                                          "jax-uncond-prepare command again to finish it" if unfinished else
                                          f"no {MANIFEST}; write the folder with jax-uncond-prepare"))
    try:
        with open(path) as f:
            return Manifest.from_json(json.load(f))
    except (OSError, ValueError) as e:
        raise UsageError(f"{origin}: {MANIFEST} is unreadable ({e}); prepare the folder again") from e


def check_shards(folder: str, manifest: Manifest, origin: str) -> None:
    """Each shard of the manifest is there with its size and record count (its index is read, not its records)."""
    from array_record.python.array_record_module import ArrayRecordReader

    for shard in manifest.shards:
        path = os.path.join(folder, shard.file)
        problem = None
        if not os.path.isfile(path):
            problem = "is missing"
        elif (size := os.path.getsize(path)) != shard.bytes:
            problem = f"has {size} bytes, the manifest says {shard.bytes}"
        else:
            try:
                reader = ArrayRecordReader(path, READER_OPTIONS)
                count = reader.num_records()
                reader.close()
            except (OSError, RuntimeError, ValueError) as e:
                count, problem = None, f"is unreadable ({e})"
            if count is not None and count != shard.records:
                problem = f"holds {count} records, the manifest says {shard.records}"
        if problem is not None:
            raise UsageError(f"{origin}: shard {shard.file} {problem}; the folder does not match its manifest, "
                             "prepare it again")


class ArrayRecordSource:
    """The records of a prepared folder, undecoded (PNG, JPEG or PPM bytes; empty for an image that failed)."""

    def __init__(self, folder: str, manifest: Manifest):
        import grain

        self.folder = folder
        self.manifest = manifest
        # Slices give each shard's record count, so Grain opens no file until it reads from it.
        paths = [f"{os.path.join(folder, s.file)}[0:{s.records}]" for s in manifest.shards if s.records]
        self._records = grain.sources.ArrayRecordDataSource(paths)
        self._failed = {s.record: s for s in manifest.skipped if s.record is not None}

    def __len__(self) -> int:
        return self.manifest.num_records

    def __getitem__(self, index: int) -> bytes:
        return self._records[index]

    def describe(self, index: int) -> str:
        failed = self._failed.get(index)
        where = f"record {index} of {self.folder}"
        return where if failed is None else f"{failed.path} ({where}, not decodable when prepared: {failed.reason})"

    def fingerprint(self) -> str:
        shards = [(s.file, s.records, s.bytes) for s in self.manifest.shards]
        digest = hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16]
        return f"prepared shards sha256 {digest}, from {self.manifest.fingerprint}"


def load_prepared(folder: str, origin: str, resolution: int, preserve_input_precision: bool
                  ) -> tuple[ArrayRecordSource, list[str]]:
    """The prepared `folder` as a source, checked at start-up against the training flags, and the files its source
    left out at start-up (counted as the loader's skipped files, as reading the source would)."""
    manifest = read_manifest(folder, origin)
    if manifest.resolution < resolution:
        raise UsageError(f"{origin} was prepared at resolution {manifest.resolution}, below --resolution "
                         f"{resolution}; train at --resolution {manifest.resolution} or lower, or prepare again at "
                         f"{resolution}")
    if preserve_input_precision:
        raise UsageError(f"{origin} holds 8-bit RGB images: --preserve_input_precision needs the original source")
    check_shards(folder, manifest, origin)
    if manifest.num_records == 0:
        raise UsageError(f"{origin}: the prepared folder holds no images")
    return ArrayRecordSource(folder, manifest), [s.path for s in manifest.skipped if s.record is None]
