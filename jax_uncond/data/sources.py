"""Random-access image sources, chosen by the training script's flags.

Every source has `len(source)`, `source[i]` (an undecoded record that `transforms.decode_image`
reads) and `source.describe(i)` (the file or row, for warnings). They are Grain random-access data
sources, so the loader can shuffle globally, shard per process and resume at any position.

- `--dataset_name NAME`: a `datasets` dataset, a local `save_to_disk` folder or a Hub id (split "train").
- `--train_data_dir DIR`: `datasets`' imagefolder over DIR (nested folders included); files whose
  header PIL cannot read, or that declare more pixels than the resolution needs (`pixel_limit`),
  are dropped at start-up with one warning each.
- `--dataset_name tfds:NAME[/CONFIG][:SPLIT]`: TensorFlow Datasets through `tfds.data_source`.
- `--dataset_name arrayrecord:DIR`, or `--train_data_dir DIR` holding a prepare manifest: a folder written
  by `jax-uncond-prepare` (`arrayrecord.py`).
- neither: the built-in shapes dataset (`builtin.py`).

`source.fingerprint()` names the source's content (which files or rows, in which versions) for the
manifest of a prepared folder.
"""

from __future__ import annotations

import concurrent.futures
import functools
import hashlib
import logging
import os
from typing import Any, Protocol, Sequence

import numpy as np
from PIL import Image

from jax_uncond.data.arrayrecord import PREFIX as ARRAYRECORD_PREFIX
from jax_uncond.data.arrayrecord import is_prepared, load_prepared
from jax_uncond.data.builtin import BuiltinShapes
from jax_uncond.errors import UsageError
from jax_uncond.data.transforms import BAD_IMAGE_ERRORS, check_image_size

logger = logging.getLogger(__name__)

TFDS_PREFIX = "tfds:"
TFDS_INSTALL_HINT = "pip install tensorflow-datasets array_record  (TensorFlow itself is not needed)"
DEFAULT_IMAGE_COLUMNS = ("image", "img")


class ImageSource(Protocol):
    """What the loader needs from a source."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...

    def describe(self, index: int) -> str: ...

    def fingerprint(self) -> str: ...


class DatasetsSource:
    """One image column of a `datasets.Dataset`, undecoded (bytes or path); `rows` selects the usable rows."""

    def __init__(self, dataset: Any, column: str, origin: str, rows: np.ndarray | None = None):
        import datasets

        if isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        self._dataset = dataset.select_columns([column])
        self._column = column
        self._origin = origin
        self._rows = np.arange(len(dataset)) if rows is None else np.asarray(rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> Any:
        return self._dataset[int(self._rows[index])][self._column]

    def describe(self, index: int) -> str:
        record = self[index]
        if isinstance(record, dict) and record.get("path"):
            return record["path"]
        return f"{self._origin} row {int(self._rows[index])}"

    def fingerprint(self) -> str:
        """`datasets`' fingerprint (for an image folder it follows the files' times) and the rows used."""
        rows = hashlib.sha256(np.ascontiguousarray(self._rows, dtype=np.int64).tobytes()).hexdigest()[:16]
        return f"datasets {self._dataset._fingerprint}, rows {len(self._rows)} sha256 {rows}"


class TFDSSource:
    """One image feature of a `tfds.data_source` (records come decoded, as HWC uint8 arrays)."""

    def __init__(self, source: Any, key: str, origin: str):
        self._source = source
        self._key = key
        self._origin = origin

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        return self._source[index][self._key]

    def describe(self, index: int) -> str:
        return f"{self._origin} example {index}"

    def fingerprint(self) -> str:
        return f"tfds {self._source.dataset_info.full_name} {self._origin}, {len(self)} examples"


def choose_image_column(features: dict[str, Any], requested: str | None, origin: str) -> str:
    """--image_column, else the first Image feature, else `image`/`img`; otherwise an error naming the columns."""
    import datasets

    columns = list(features)
    if requested is not None:
        if requested not in features:
            raise UsageError(f"--image_column {requested!r} is not a column of {origin}; its columns: {columns}")
        return requested
    for name, feature in features.items():
        if isinstance(feature, datasets.Image):
            return name
    for name in DEFAULT_IMAGE_COLUMNS:
        if name in features:
            return name
    raise UsageError(f"{origin} has no Image column and none named {' or '.join(DEFAULT_IMAGE_COLUMNS)}; "
                     f"pick one with --image_column. Its columns: {columns}")


def _image_extensions() -> frozenset[str]:
    from datasets.packaged_modules.imagefolder.imagefolder import ImageFolder

    return frozenset(ext.lower() for ext in ImageFolder.EXTENSIONS)


def _header_error(path: str, resolution: int) -> str | None:
    """Why `path` cannot be used (reads the header only: not an image, or too large), or None."""
    try:
        with Image.open(path) as image:
            check_image_size(image, resolution)
            return None
    except BAD_IMAGE_ERRORS as e:
        return f"{type(e).__name__}: {e}"


def _readable_rows(paths: Sequence[str], resolution: int) -> tuple[np.ndarray, list[str]]:
    """Indices of the files whose header PIL reads, and the others' paths (each warned about once)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        errors = list(pool.map(functools.partial(_header_error, resolution=resolution), paths))
    bad = []
    for path, error in zip(paths, errors):
        if error is not None:
            logger.warning("skipping %s: not a usable image (%s)", path, error)
            bad.append(path)
    return np.asarray([i for i, error in enumerate(errors) if error is None], dtype=np.int64), bad


def load_image_folder(data_dir: str, cache_dir: str | None, image_column: str | None, resolution: int
                      ) -> tuple[DatasetsSource, list[str]]:
    """`datasets`' imagefolder over `data_dir`, minus unreadable or too large files; also returns the skipped
    paths."""
    import datasets

    if not os.path.isdir(data_dir):
        raise UsageError(f"--train_data_dir {data_dir}: no such folder")
    extensions = _image_extensions()
    has_images = any(os.path.splitext(name)[1].lower() in extensions
                     for _, _, names in os.walk(data_dir) for name in names)
    if not has_images:
        raise UsageError(f"--train_data_dir {data_dir}: no image files (.png, .jpg, .webp, ... any extension "
                         "PIL reads) in it or its subfolders")
    dataset = datasets.load_dataset("imagefolder", data_dir=data_dir, cache_dir=cache_dir, split="train")
    column = choose_image_column(dataset.features, image_column, f"--train_data_dir {data_dir}")
    source = DatasetsSource(dataset, column, data_dir)
    paths = [record["path"] for record in source._dataset[column]]
    rows, bad = _readable_rows(paths, resolution)
    if len(rows) == 0:
        raise UsageError(f"--train_data_dir {data_dir}: none of its {len(paths)} image files can be read")
    return DatasetsSource(dataset, column, data_dir, rows), bad


def load_hf_dataset(name: str, config_name: str | None, cache_dir: str | None, image_column: str | None
                    ) -> DatasetsSource:
    """A `datasets` dataset: a `save_to_disk` folder (its train split), another local folder, or a Hub id."""
    import datasets

    origin = f"--dataset_name {name}"
    if os.path.isdir(name) and (os.path.isfile(os.path.join(name, "dataset_dict.json"))
                                or os.path.isfile(os.path.join(name, "state.json"))):
        dataset = datasets.load_from_disk(name)
        if isinstance(dataset, datasets.DatasetDict):
            if "train" not in dataset:
                raise UsageError(f"{origin}: no 'train' split; its splits: {list(dataset)}")
            dataset = dataset["train"]
    else:
        try:
            dataset = datasets.load_dataset(name, config_name, cache_dir=cache_dir, split="train")
        except (FileNotFoundError, ConnectionError) as e:
            raise UsageError(f"{origin}: neither a local dataset folder nor a dataset that can be loaded from "
                             f"the Hub ({type(e).__name__}: {e})") from e
    column = choose_image_column(dataset.features, image_column, origin)
    return DatasetsSource(dataset, column, name)


def parse_tfds_name(spec: str, config_name: str | None) -> tuple[str, str]:
    """`tfds:NAME[/CONFIG][:SPLIT]` -> ("NAME[/CONFIG]", SPLIT); --dataset_config_name fills in a missing CONFIG."""
    body = spec[len(TFDS_PREFIX):]
    name, _, split = body.partition(":")
    if not name:
        raise UsageError(f"--dataset_name {spec}: expected tfds:NAME[/CONFIG][:SPLIT]")
    if config_name and "/" not in name:
        name = f"{name}/{config_name}"
    return name, split or "train"


def load_tfds(spec: str, config_name: str | None, data_dir: str | None, image_column: str | None) -> TFDSSource:
    """A TensorFlow Datasets split through its random-access `tfds.data_source` (array_record files)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"--dataset_name {spec} needs TensorFlow Datasets: {TFDS_INSTALL_HINT}") from e
    name, split = parse_tfds_name(spec, config_name)
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    features = dict(source.dataset_info.features)
    column = image_column
    if column is None:
        images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
        column = images[0] if images else next((c for c in DEFAULT_IMAGE_COLUMNS if c in features), None)
    if column not in features:
        raise UsageError(f"--dataset_name {spec}: no image feature"
                         f"{'' if image_column is None else ' ' + repr(image_column)}; pick one with --image_column. "
                         f"Its features: {list(features)}")
    return TFDSSource(source, column, spec)


def load_source(config: Any) -> tuple[ImageSource, list[str]]:
    """The source the flags name, and the files skipped at start-up as unreadable (image folders, and the ones
    a prepared folder's source skipped)."""
    if config.dataset_name is not None and config.dataset_name.startswith(ARRAYRECORD_PREFIX):
        return load_prepared(config.dataset_name[len(ARRAYRECORD_PREFIX):], f"--dataset_name {config.dataset_name}",
                             config.resolution, config.preserve_input_precision)
    if config.train_data_dir is not None and is_prepared(config.train_data_dir):
        return load_prepared(config.train_data_dir, f"--train_data_dir {config.train_data_dir}", config.resolution,
                             config.preserve_input_precision)
    if config.dataset_name is not None and config.dataset_name.startswith(TFDS_PREFIX):
        return load_tfds(config.dataset_name, config.dataset_config_name, config.tfds_data_dir,
                         config.image_column), []
    if config.dataset_name is not None:
        return load_hf_dataset(config.dataset_name, config.dataset_config_name, config.cache_dir,
                               config.image_column), []
    if config.train_data_dir is not None:
        return load_image_folder(config.train_data_dir, config.cache_dir, config.image_column, config.resolution)
    return BuiltinShapes(config.resolution), []
