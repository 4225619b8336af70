"""The training loader: a Grain pipeline per process, global `jax.Array` batches, an exact position.

The stream is a pure function of (seed, position). Epoch e visits the examples in Grain's global
shuffle for (seed, e) and ends after its last full global batch (the remainder of the epoch is
dropped, as multi-device training needs). Global batch k is stream positions [k*B, (k+1)*B); process
p of P decodes only positions [k*B + p*B/P, k*B + (p+1)*B/P), so the union of the shares is the global
batch, in order, whatever the number of processes. Augmentation draws from (seed, epoch, example).

The position is "global batches consumed"; every source is random access, so a resumed loader
starts at that batch directly (Grain slices the index space) and re-reads nothing.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import sys
from typing import Any, Iterator

import grain
import jax
import numpy as np
from absl import flags as absl_flags
from jax.sharding import Mesh

from jax_uncond.data.sources import ImageSource, load_source
from jax_uncond.data.transforms import BAD_IMAGE_ERRORS, TransformSpec, decode_image, transform_image
from jax_uncond.errors import UsageError
from jax_uncond.training.sharding import batch_sharding, data_parallel_size

logger = logging.getLogger(__name__)

STATE_VERSION = 1
WORKER_READ_THREADS = 1
"""Grain reader threads in each worker process, so a worker decodes while its last batch is being sent.
In-process (no workers) Grain reads synchronously: the device-prefetch thread already runs it in the
background, and extra threads only fought for the cores in the measurements (benchmarks/bench_data.py)."""


def _shuffle_seed(seed: int) -> int:
    """A 32-bit shuffle seed mixed from --seed, so runs with neighbouring seeds share no epoch orders."""
    return int(np.random.SeedSequence([seed, 0x0D47A]).generate_state(1)[0])


def iterate(dataset: grain.MapDataset, num_workers: int) -> Iterator[Any]:
    """`dataset`'s elements in order, its maps run in this process (`num_workers` 0) or in Grain worker processes."""
    threads = WORKER_READ_THREADS if num_workers > 0 else 0
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, 1)))
    if num_workers > 0:
        if not absl_flags.FLAGS.is_parsed():
            # Grain's mp_prefetch reads absl flags, which only absl.app parses; use their defaults.
            absl_flags.FLAGS.mark_as_parsed()
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=2))
    return iter(stream)


class ExampleAt(grain.transforms.Map):
    """Stream position -> [epoch, example index]: each epoch a Grain global shuffle, cut at its last full batch."""

    def __init__(self, num_examples: int, examples_per_epoch: int, seed: int):
        self._num_examples = num_examples
        self._per_epoch = examples_per_epoch
        self._order = grain.MapDataset.range(num_examples).shuffle(seed=_shuffle_seed(seed))

    def map(self, position: int) -> np.ndarray:
        epoch, offset = divmod(int(position), self._per_epoch)
        # Grain's shuffle reshuffles per epoch for indices past the first epoch (seed + epoch).
        return np.asarray([epoch, self._order[epoch * self._num_examples + offset]], dtype=np.int64)


class LoadExample(grain.transforms.Map):
    """[epoch, example] -> {"images": (3, R, R) float32 in [-1, 1], "bad": the example index if it was unreadable}.

    An unreadable example is replaced by the next readable one in source order (so batches keep their
    size and the stream stays deterministic) and reported through "bad", -1 otherwise.
    """

    def __init__(self, source: ImageSource, spec: TransformSpec, seed: int):
        self._source = source
        self._spec = spec
        self._seed = seed

    def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
        epoch, index = int(element[0]), int(element[1])
        size = len(self._source)
        for step in range(size):
            candidate = (index + step) % size
            rng = np.random.default_rng([self._seed, epoch, index])
            try:
                image = transform_image(decode_image(self._source[candidate], self._spec.resolution), self._spec, rng)
            except BAD_IMAGE_ERRORS:
                continue
            return {"images": image, "bad": np.int64(index if step else -1)}
        raise ValueError(f"none of the {size} images of the dataset can be decoded")


class _DevicePrefetch:
    """Places host batches on the devices in one background thread, `depth` batches ahead of the consumer."""

    def __init__(self, host: Iterator[dict[str, np.ndarray]], place: Any, depth: int):
        self._host = host
        self._place = place
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jax_uncond-data")
        self._pending = collections.deque(self._pool.submit(self._fetch) for _ in range(max(depth, 1)))

    def _fetch(self) -> tuple[np.ndarray, Any]:
        batch = next(self._host)
        return batch["bad"], self._place(batch["images"])

    def next(self) -> tuple[np.ndarray, Any]:
        done = self._pending.popleft()
        self._pending.append(self._pool.submit(self._fetch))
        return done.result()

    def close(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True)
        close = getattr(self._host, "close", None)
        if close is not None:
            close()


class TrainLoader:
    """Endless iterator of global batches {"images": jax.Array (B, 3, R, R)} sharded over the mesh's data axis."""

    def __init__(self, source: ImageSource, spec: TransformSpec, *, global_batch_size: int, seed: int,
                 mesh: Mesh | None = None, num_workers: int = 0,
                 shard_options: grain.sharding.ShardOptions | None = None, prefetch: int = 2,
                 skipped_paths: tuple[str, ...] = ()):
        if shard_options is None:
            shard_options = grain.sharding.ShardByJaxProcess(drop_remainder=True)
        num_examples = len(source)
        if num_examples < global_batch_size:
            raise UsageError(f"the dataset has {num_examples} usable images, fewer than one global batch of "
                             f"{global_batch_size}; use a smaller --train_batch_size/--global_batch_size or "
                             "more images")
        if global_batch_size % shard_options.shard_count:
            raise UsageError(f"the global batch of {global_batch_size} does not split evenly over "
                             f"{shard_options.shard_count} processes")
        if seed < 0:
            raise UsageError(f"--seed must be non-negative for the data order, got {seed}")
        self.source = source
        self.spec = spec
        self.seed = seed
        self.mesh = mesh
        self.num_workers = num_workers
        self.shard_options = shard_options
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // shard_options.shard_count
        self.num_examples = num_examples
        self.steps_per_epoch = num_examples // global_batch_size
        self.prefetch = prefetch
        self._position = 0
        self._skipped_at_start = len(skipped_paths)
        self._bad_examples: set[int] = set()
        self._device: _DevicePrefetch | None = None
        LoadExample(source, spec, seed).map(np.asarray([0, 0]))  # fails now if no image can be decoded

    # --- the Grain pipeline of this process

    def host_dataset(self) -> grain.MapDataset:
        """This process's share of every global batch, as a Grain MapDataset: element k = share of batch k."""
        per_epoch = self.steps_per_epoch * self.global_batch_size
        stream = (grain.MapDataset.range(0, sys.maxsize)
                  .map(ExampleAt(self.num_examples, per_epoch, self.seed))
                  .map(LoadExample(self.source, self.spec, self.seed))
                  .batch(self.local_batch_size, drop_remainder=True))  # integer length: batches of 1 too
        return stream[self.shard_options.shard_index :: self.shard_options.shard_count]

    def iter_host(self, start: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """NumPy batches of this process from global batch `start` on: {"images": (B/P, 3, R, R), "bad": (B/P,)}."""
        return iterate(self.host_dataset()[start:], self.num_workers)

    # --- the training-side iterator

    def _place(self, images: np.ndarray) -> jax.Array:
        if self.shard_options.shard_count != jax.process_count():
            raise UsageError(f"the loader was built for {self.shard_options.shard_count} processes but JAX runs "
                             f"{jax.process_count()}; iterate `iter_host()` to read a simulated share")
        shape = (self.global_batch_size, *images.shape[1:])
        return jax.make_array_from_process_local_data(batch_sharding(self.mesh), images, shape)

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, Any]:
        if self._device is None:
            self._device = _DevicePrefetch(self.iter_host(self._position), self._place, self.prefetch)
        bad, images = self._device.next()
        self._position += 1
        self._note_bad(bad)
        return {"images": images}

    def _note_bad(self, bad: np.ndarray) -> None:
        for index in bad[bad >= 0].tolist():
            if index not in self._bad_examples:
                self._bad_examples.add(index)
                logger.warning("skipping %s: not a usable image (undecodable or too large; replaced by the next "
                               "usable one)", self.source.describe(index))

    @property
    def skipped_files(self) -> int:
        """Unreadable files skipped so far by this process (at start-up and while reading)."""
        return self._skipped_at_start + len(self._bad_examples)

    @property
    def epoch(self) -> int:
        """The epoch of the next batch."""
        return self._position // self.steps_per_epoch

    # --- position

    def get_state(self) -> dict[str, int]:
        """The exact position as a JSON-able dict: global batches consumed, plus what it is only valid for."""
        return {"version": STATE_VERSION, "batches": self._position, "seed": self.seed,
                "num_examples": self.num_examples, "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict[str, int]) -> None:
        """Continue at the position `get_state` gave; the next batch is the one an uninterrupted run gets next."""
        for key in ("seed", "num_examples", "global_batch_size"):
            if state[key] != getattr(self, key):
                raise UsageError(f"the saved data position belongs to a run with {key}={state[key]}, but this run "
                                 f"has {key}={getattr(self, key)}; resume with the same data, --seed and batch size")
        self.close()
        self._position = int(state["batches"])

    def close(self) -> None:
        """Stop the prefetch thread and Grain's worker processes."""
        if self._device is not None:
            self._device.close()
            self._device = None

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def transform_spec(config: Any) -> TransformSpec:
    """The augmentation flags of `config`."""
    return TransformSpec(config.resolution, config.center_crop, config.random_flip, config.preserve_input_precision)


def make_train_loader(config: Any, mesh: Mesh | None, batch_size: int, *,
                      shard_options: grain.sharding.ShardOptions | None = None, prefetch: int = 2) -> TrainLoader:
    """Validate the data flags' source at start-up and build the loader of global batches of `batch_size`."""
    if mesh is not None and batch_size % data_parallel_size(mesh):
        raise UsageError(f"the global batch of {batch_size} does not split evenly over the mesh's "
                         f"{data_parallel_size(mesh)} data-parallel devices")
    source, skipped = load_source(config)
    return TrainLoader(source, transform_spec(config), global_batch_size=batch_size, seed=config.seed, mesh=mesh,
                       num_workers=config.dataloader_num_workers, shard_options=shard_options, prefetch=prefetch,
                       skipped_paths=tuple(skipped))
