"""Reference statistics, from one of: an `.npz` (`mu`, `sigma`: pytorch-fid's format), a folder of image files
(read as pytorch-fid reads them), or the training data through the project's own loader (the training
resize and crop, no flip, every image once), cached next to the run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jax_uncond.data.sources import ImageSource
from jax_uncond.data.transforms import BAD_IMAGE_ERRORS
from jax_uncond.errors import UsageError
from jax_uncond.evaluation.features import InceptionFeatures, parallel_rows
from jax_uncond.evaluation.statistics import FeatureStatistics

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")
"""pytorch-fid's `IMAGE_EXTENSIONS` (lower case, as its glob matches them)."""


def image_files(folder: str, flag: str) -> list[str]:
    """The files pytorch-fid scores in `folder`: `*.<ext>` for its extensions, not recursive, sorted."""
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder}: no such folder")
    names = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if os.path.splitext(name)[1][1:] in IMAGE_EXTENSIONS and os.path.isfile(os.path.join(folder, name)))
    if not names:
        raise UsageError(f"{flag} {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in the folder")
    return names


@dataclasses.dataclass(frozen=True)
class ImageFolder:
    """The readable image files of a folder (header read; PIL cannot open the others) and their (H, W, 3)."""

    paths: list[str]
    shapes: list[tuple[int, int, int]]

    @classmethod
    def scan(cls, folder: str, flag: str) -> ImageFolder:
        """Lists `folder` as pytorch-fid does; unreadable files are skipped, one line each; fewer than 2 is an error."""
        from PIL import Image

        paths, shapes = [], []
        for path in image_files(folder, flag):
            try:
                with Image.open(path) as image:
                    shapes.append((image.height, image.width, 3))
            except BAD_IMAGE_ERRORS as e:  # as the training loader: every error a broken file raises in PIL
                logger.warning("skipping %s: not a readable image (%s)", path, e)
                continue
            paths.append(path)
        if len(paths) < 2:
            raise UsageError(f"{flag} {folder}: {len(paths)} readable image(s); FID needs at least 2")
        return cls(paths, shapes)

    def features(self, extractor: InceptionFeatures, desc: str) -> np.ndarray:
        """Inception features of the files, decoded as pytorch-fid does (PIL, `convert("RGB")`)."""
        from PIL import Image

        def decode(index: int) -> np.ndarray:
            with Image.open(self.paths[index]) as image:
                return np.asarray(image.convert("RGB"))

        return extractor.of_host_images(len(self.paths), self.shapes.__getitem__, parallel_rows(decode), desc=desc)


def dataset_name(config: Any) -> str:
    """A file-name-safe name of the training data: the dataset id, the image folder's name, or `builtin`."""
    if config.dataset_name is not None:
        name = config.dataset_name + (f"-{config.dataset_config_name}" if config.dataset_config_name else "")
    elif config.train_data_dir is not None:
        name = os.path.basename(os.path.normpath(os.path.abspath(config.train_data_dir)))
    else:
        name = "builtin"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")


def dataset_features(source: ImageSource, config: Any, extractor: InceptionFeatures) -> np.ndarray:
    """Features of every image of the training `source` once, as the training loader prepares it (--resolution,
    the crop of its first epoch, no flip), quantised back to uint8 (exact for 8-bit sources)."""
    from jax_uncond.data.loader import LoadExample, transform_spec
    from jax_uncond.run.outputs import to_uint8

    load = LoadExample(source, dataclasses.replace(transform_spec(config), random_flip=False), config.seed)

    def decode(index: int) -> np.ndarray:
        image = load.map(np.asarray([0, index]))["images"]  # (3, R, R) in [-1, 1]
        return to_uint8(image.transpose(1, 2, 0) * np.float32(0.5) + np.float32(0.5))

    shape = (config.resolution, config.resolution, 3)
    return extractor.of_host_images(len(source), lambda _: shape, parallel_rows(decode), desc="reference images")


def dataset_statistics(source: ImageSource, config: Any, extractor: InceptionFeatures,
                       weights_sha256: str) -> tuple[FeatureStatistics, str]:
    """The statistics of the training `source`, cached in --output_dir by dataset, resolution, crop, image count,
    Inception weights and dimension; (statistics, what they are). Process 0 decides whether the cache is used, and
    only it reads the cache (the others need no statistics)."""
    num_images = len(source)
    crop = "center" if config.center_crop else "random"
    name = (f"fid_reference-{dataset_name(config)}-{config.resolution}px-{crop}crop-{num_images}images-"
            f"inception{weights_sha256[:8]}-{extractor.dims}d.npz")
    path = os.path.join(config.output_dir, name)
    if multihost_utils.broadcast_one_to_all(np.int32(os.path.isfile(path))):
        statistics = FeatureStatistics.load(path, extractor.dims) if jax.process_index() == 0 else None
        return statistics, f"the training data ({num_images} images; statistics read from {path})"
    statistics = FeatureStatistics.from_features(dataset_features(source, config, extractor))
    if jax.process_index() == 0:
        os.makedirs(config.output_dir, exist_ok=True)
        statistics.save(path)
    return statistics, f"the training data ({num_images} images; statistics written to {path})"


def reference_statistics(reference: str | None, config: Any, extractor: InceptionFeatures, weights_sha256: str,
                         source: ImageSource | None = None,
                         flag: str = "--fid_reference") -> tuple[FeatureStatistics, str]:
    """(statistics, what they are) for `reference` (the value of `flag`): an `.npz`, a folder of images, or None:
    the training data (`source`, else the one the data flags of `config` name)."""
    if reference is None:
        if source is None:
            from jax_uncond.data.sources import load_source

            source = load_source(config)[0]
        return dataset_statistics(source, config, extractor, weights_sha256)
    if reference.endswith(".npz"):
        if not os.path.isfile(reference):
            raise UsageError(f"{flag} {reference}: no such file")
        return FeatureStatistics.load(reference, extractor.dims), reference
    if os.path.isdir(reference):
        folder = ImageFolder.scan(reference, flag)
        return FeatureStatistics.from_features(folder.features(extractor, "reference images")), reference
    raise UsageError(f"{flag} {reference}: neither a folder of images nor an .npz file of statistics")
