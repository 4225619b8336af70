"""The Grain loader: order, per-process shares, device batches, exact resume, workers."""

import json

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from jax_uncond.data.loader import TrainLoader, make_train_loader
from jax_uncond.data.transforms import TransformSpec
from jax_uncond.training.config import parse_args
from jax_uncond.training.sharding import batch_sharding, make_mesh

RES = 4


class IndexImages:
    """Image i encodes i in its red and green channels, so batches can be read back as example indices."""

    def __init__(self, n):
        self.n = n
        self.reads = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        image = np.zeros((RES, RES, 3), np.uint8)
        image[..., 0], image[..., 1] = i % 256, i // 256
        image[..., 2] = np.arange(RES) * 60  # a horizontal ramp shows flips
        return Image.fromarray(image)

    def describe(self, i):
        return f"index image {i}"


def ids(images):
    """Example indices of a batch of IndexImages."""
    levels = np.rint((np.asarray(images)[:, :, 0, 0] + 1) / 2 * 255).astype(int)
    return levels[:, 0] + 256 * levels[:, 1]


def make(n=42, batch=8, seed=0, shards=(0, 1), spec=TransformSpec(RES, random_flip=True), **kwargs):
    return TrainLoader(IndexImages(n), spec, global_batch_size=batch, seed=seed,
                       shard_options=grain.sharding.ShardOptions(*shards), **kwargs)


def host_ids(loader, count, start=0):
    it = loader.iter_host(start)
    out = [ids(next(it)["images"]) for _ in range(count)]
    it.close()
    return out


def test_epochs_are_permutations_cut_at_the_last_full_batch():
    loader = make(n=42, batch=8)
    assert (loader.num_examples, loader.steps_per_epoch) == (42, 5)
    batches = host_ids(loader, 15)
    epochs = [np.concatenate(batches[5 * e:5 * e + 5]) for e in range(3)]
    for order in epochs:
        assert len(set(order)) == 40 and set(order) <= set(range(42))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], np.arange(40))


def test_order_depends_on_seed_only():
    assert all(np.array_equal(a, b) for a, b in zip(host_ids(make(seed=3), 7), host_ids(make(seed=3), 7)))
    assert not all(np.array_equal(a, b) for a, b in zip(host_ids(make(seed=3), 7), host_ids(make(seed=4), 7)))


@pytest.mark.parametrize("processes", [2, 4])
def test_process_shares_make_up_the_global_batch(processes):
    single = host_ids(make(n=50, batch=8), 9)  # crosses an epoch boundary (6 steps per epoch)
    shares = [host_ids(make(n=50, batch=8, shards=(p, processes)), 9) for p in range(processes)]
    for k in range(9):
        parts = [shares[p][k] for p in range(processes)]
        assert all(len(part) == 8 // processes for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), single[k])  # union, in order, no overlap


def flips(images):
    ramp = np.asarray(images)[:, 2, 0, :]
    return ramp[:, 0] > ramp[:, -1]


def test_augmentation_depends_on_seed_epoch_and_example():
    def draws(loader, batches):
        it = loader.iter_host()
        out = {}
        for k in range(batches):
            images = next(it)["images"]
            out.update({(k // loader.steps_per_epoch, i): f for i, f in zip(ids(images), flips(images))})
        it.close()
        return out

    first = draws(make(n=16, batch=8), 8)
    assert 0 < sum(first.values()) < len(first)  # drawn per example
    assert any(first[(0, i)] != first[(e, i)] for e in (1, 2, 3) for i in range(16))  # and per epoch
    assert draws(make(n=16, batch=8), 8) == first
    assert draws(make(n=16, batch=4, shards=(1, 2)), 8).items() <= first.items()  # not from the position
    assert draws(make(n=16, batch=8, seed=1), 8) != first


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(jax.devices())


def test_device_batches_are_global_and_sharded(mesh):
    loader = make(n=42, batch=16, mesh=mesh)
    batch = next(loader)
    images = batch["images"]
    assert isinstance(images, jax.Array) and images.shape == (16, 3, RES, RES) and images.dtype == np.float32
    assert images.sharding.is_equivalent_to(batch_sharding(mesh), 4)
    assert -1 <= float(images.min()) and float(images.max()) <= 1
    np.testing.assert_array_equal(ids(images), host_ids(make(n=42, batch=16), 1)[0])
    loader.close()


def test_batches_arrive_under_a_transfer_guard(mesh):
    with make(n=42, batch=8, mesh=mesh) as loader, jax.transfer_guard("disallow"):
        batch = next(loader)  # the host-to-device copy is explicit, in the prefetch thread
    assert batch["images"].shape == (8, 3, RES, RES)


def test_resume_yields_exactly_the_next_batches_without_rereading(mesh):
    reference = make(n=42, batch=8, mesh=mesh)
    expected = [ids(next(reference)["images"]) for _ in range(12)]
    reference.close()

    first = make(n=42, batch=8, mesh=mesh)
    for _ in range(7):  # into the second epoch
        next(first)
    state = json.loads(json.dumps(first.get_state()))
    first.close()
    assert state["batches"] == 7

    resumed = make(n=42, batch=8, mesh=mesh)
    resumed.set_state(state)
    reads_before = resumed.source.reads
    got = [ids(next(resumed)["images"]) for _ in range(5)]
    resumed.close()
    for a, b in zip(got, expected[7:]):
        np.testing.assert_array_equal(a, b)
    # 5 batches consumed plus at most a few read ahead; nothing of the 7 earlier batches is re-read
    assert resumed.source.reads - reads_before <= (5 + 6) * 8
    assert resumed.get_state()["batches"] == 12 and resumed.epoch == 2


def test_set_state_refuses_another_configuration():
    loader = make(n=42, batch=8)
    state = loader.get_state()
    with pytest.raises(ValueError, match="global_batch_size=8"):
        make(n=42, batch=4).set_state(state)
    with pytest.raises(ValueError, match="num_examples=42"):
        make(n=43, batch=8).set_state(state)


def test_fewer_images_than_a_global_batch_names_both_numbers():
    with pytest.raises(ValueError, match=r"has 5 usable images, fewer than one global batch of 8"):
        make(n=5, batch=8)


def test_worker_processes_deliver_the_same_stream():
    expected = host_ids(make(n=42, batch=8), 6)
    got = host_ids(make(n=42, batch=8, num_workers=2), 4, start=2)  # workers take alternate batches
    for a, b in zip(got, expected[2:]):
        np.testing.assert_array_equal(a, b)


def test_builtin_dataset_from_the_flags(mesh):
    config = parse_args(["--resolution", "8", "--center_crop"])
    loader = make_train_loader(config, mesh, batch_size=16)
    images = np.asarray(next(loader)["images"])
    loader.close()
    assert images.shape == (16, 3, 8, 8)
    # plain background and one shape: every image has a few distinct colours, not noise
    for image in images:
        colours = np.unique(np.rint((image.reshape(3, -1).T + 1) * 127.5), axis=0)
        assert 2 <= len(colours) <= 40
    again = make_train_loader(config, mesh, batch_size=16)
    np.testing.assert_array_equal(np.asarray(next(again)["images"]), images)
    again.close()
