"""Inception features over a mesh: uint8 images split over the data axis, weights replicated, one compiled
network per (mesh, batch size) whatever the image size (the resize to 299x299 is its own small program).

Images come either as global `jax.Array`s already on the mesh (samples from the compiled sampler) or
from the host, each process reading only the rows of its own devices. Features come back to every
process as numpy, in image order, padding removed.
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
from typing import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm import tqdm

from jax_uncond.errors import UsageError
from jax_uncond.evaluation.inception import BLOCK_INDEX_BY_DIM, FEATURE_DIM, FIDInceptionV3, preprocess
from jax_uncond.run.outputs import host_params
from jax_uncond.training.sharding import batch_sharding, data_parallel_size, put_replicated, replicated

ReadRows = Callable[[np.ndarray], np.ndarray]
"""Image indices -> their uint8 NHWC pixels (one shape for the batch)."""


@functools.lru_cache(maxsize=8)
def programs(mesh: Mesh, dims: int) -> tuple[Callable, Callable]:
    """The jitted preprocessing and network for `mesh` (cached, so every caller shares the compilations)."""
    batch, whole = batch_sharding(mesh), replicated(mesh)
    network = jax.jit(lambda params, x: FIDInceptionV3(dims).apply({"params": params}, x),
                      in_shardings=(whole, batch), out_shardings=batch)
    return jax.jit(preprocess, in_shardings=batch, out_shardings=batch), network


class InceptionFeatures:
    """Inception features (`dims`: 2048 pool3, or pytorch-fid's 64/192/768) of uint8 NHWC images on `mesh`,
    `batch_size` images per call (a multiple of its devices)."""

    def __init__(self, params: dict, mesh: Mesh, batch_size: int, dims: int = FEATURE_DIM):
        devices = data_parallel_size(mesh)
        if batch_size < 1 or batch_size % devices:
            raise UsageError(f"the FID batch size {batch_size} (--fid_batch_size, or evaluate's --batch_size) must be "
                             f"a positive multiple of the {devices} devices")
        if dims not in BLOCK_INDEX_BY_DIM:
            raise UsageError(f"feature dimension {dims}: choose one of {', '.join(map(str, BLOCK_INDEX_BY_DIM))}")
        self.mesh = mesh
        self.batch_size = batch_size
        self.dims = dims
        self.params = put_replicated(params, mesh)
        self._preprocess, self._network = programs(mesh, dims)

    def __call__(self, images: jax.Array) -> jax.Array:
        """(batch_size, H, W, 1 or 3) uint8 on the mesh -> (batch_size, dims) float32 on the mesh."""
        return self._network(self.params, self._preprocess(images))

    def of_batches(self, batches: Iterator[jax.Array], num_images: int, desc: str = "Inception features") -> np.ndarray:
        """Features of a stream of global batches holding `num_images` images in all (the last batch padded):
        (num_images, dims) on every process. Batch k is fetched while the devices compute batch k + 1."""
        out = np.empty((num_images, self.dims), np.float32)
        previous: tuple[int, jax.Array] | None = None
        with tqdm(total=num_images, desc=desc, unit="img", disable=jax.process_index() != 0) as bar:
            for start in range(0, num_images, self.batch_size):
                current = (start, self(next(batches)))
                if previous is not None:
                    bar.update(self._collect(out, *previous))
                previous = current
            if previous is not None:
                bar.update(self._collect(out, *previous))
        return out

    def _collect(self, out: np.ndarray, start: int, features: jax.Array) -> int:
        rows = min(self.batch_size, len(out) - start)
        out[start:start + rows] = host_params(features)[:rows]
        return rows

    def of_host_images(self, num_images: int, shape_of: Callable[[int], tuple[int, ...]], read: ReadRows,
                       desc: str = "Inception features") -> np.ndarray:
        """Features of images 0..num_images-1 read on the host: each process reads only its devices' rows.

        `shape_of(i)` is image i's (H, W, C) (images of one shape are batched together, in order);
        `read(indices)` returns their pixels. Returns (num_images, dims) on every process.
        """
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(num_images):
            groups.setdefault(tuple(shape_of(i)), []).append(i)
        out = np.empty((num_images, self.dims), np.float32)
        for shape, indices in groups.items():
            index = np.asarray(indices)
            out[index] = self.of_batches(self._host_batches(index, shape, read), len(index), desc)
        return out

    def _host_batches(self, indices: np.ndarray, shape: tuple[int, ...], read: ReadRows) -> Iterator[jax.Array]:
        sharding = batch_sharding(self.mesh)
        global_shape = (self.batch_size, *shape)
        for start in range(0, len(indices), self.batch_size):
            rows = indices[start:start + self.batch_size]

            def shard(slices: tuple[slice, ...], rows: np.ndarray = rows) -> np.ndarray:
                wanted = np.arange(global_shape[0])[slices[0]]
                pixels = np.zeros((len(wanted), *shape), np.uint8)  # padding rows stay black and are dropped
                real = wanted < len(rows)
                if real.any():
                    pixels[real] = read(rows[wanted[real]])
                return pixels

            yield jax.make_array_from_callback(global_shape, sharding, shard)


def parallel_rows(decode: Callable[[int], np.ndarray]) -> ReadRows:
    """A `ReadRows` that decodes its images in threads (PIL and NumPy release the GIL while they work)."""

    def read(indices: np.ndarray) -> np.ndarray:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            return np.stack(list(pool.map(decode, indices.tolist())))

    return read
