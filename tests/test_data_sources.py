"""Sources from the flags: image folders (with bad files), `datasets` folders, TFDS, start-up errors."""

import io
import logging
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from jax_uncond.data import make_train_loader
from jax_uncond.training.config import parse_args
from jax_uncond.training.sharding import make_mesh

RES = 8


@pytest.fixture(scope="module")
def mesh():
    return make_mesh(jax.devices()[:1])


def _rgb(seed, width=12, height=10):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Every kind of image that must load, nested, plus a non-image, an empty and a truncated file."""
    root = tmp_path_factory.mktemp("folder")
    (root / "a" / "b").mkdir(parents=True)
    _rgb(0).save(root / "rgb.png")
    _rgb(1).convert("L").save(root / "a" / "gray.png")
    _rgb(2).convert("P").save(root / "a" / "palette.png")
    _rgb(3).convert("RGBA").save(root / "a" / "b" / "rgba.png")
    _rgb(4).convert("CMYK").save(root / "a" / "b" / "cmyk.jpg")
    Image.fromarray(np.arange(120, dtype=np.uint16).reshape(10, 12) * 500).save(root / "a" / "deep16.png")
    _rgb(5, 5, 3).save(root / "tiny.png")  # smaller than --resolution
    _rgb(6, 40, 30).save(root / "big.jpg")
    (root / "notes.txt").write_text("not an image, and not an image extension: ignored like imagefolder does")
    (root / "a" / "garbage.jpg").write_bytes(b"this is not a jpeg")
    (root / "a" / "b" / "empty.png").write_bytes(b"")
    buffer = io.BytesIO()
    _rgb(7, 64, 64).save(buffer, format="JPEG")
    (root / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # header fine, data cut
    return root


def _config(*args):
    return parse_args(["--resolution", str(RES), *args])


def test_image_folder_skips_bad_files_with_one_warning_each(image_folder, mesh, tmp_path, caplog):
    config = _config("--train_data_dir", str(image_folder), "--cache_dir", str(tmp_path), "--center_crop")
    with caplog.at_level(logging.WARNING):
        loader = make_train_loader(config, mesh, batch_size=3)
    assert loader.num_examples == 9  # 8 good + the truncated one (its header reads; its data fails later)
    assert loader.skipped_files == 2
    with caplog.at_level(logging.WARNING):
        for _ in range(3 * loader.steps_per_epoch):  # three epochs
            images = np.asarray(next(loader)["images"])
            assert images.shape == (3, 3, RES, RES) and np.all(np.abs(images) <= 1)
    loader.close()
    assert loader.skipped_files == 3
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in ("garbage.jpg", "empty.png", "truncated.jpg"):
        assert sum(name in message for message in warned) == 1, warned
    assert not any("notes.txt" in message for message in warned)


@pytest.mark.parametrize("content", ["missing", "empty", "text_only", "all_bad"])
def test_unusable_folders_fail_at_start_up(content, tmp_path, mesh):
    folder = tmp_path / "data"
    if content != "missing":
        folder.mkdir()
    if content == "text_only":
        (folder / "a.txt").write_text("x")
    if content == "all_bad":
        (folder / "x.png").write_bytes(b"")
        (folder / "y.jpg").write_bytes(b"nope")
    message = {"missing": "no such folder", "empty": "no image files", "text_only": "no image files",
               "all_bad": "none of its 2 image files can be read"}[content]
    with pytest.raises(ValueError, match=message):
        make_train_loader(_config("--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "c")), mesh, 2)


def test_every_image_truncated_fails_at_start_up(tmp_path, mesh):
    buffer = io.BytesIO()
    _rgb(0, 64, 64).save(buffer, format="JPEG")
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="none of the 3 images of the dataset can be decoded"):
        make_train_loader(_config("--train_data_dir", str(tmp_path), "--cache_dir", str(tmp_path / "c")), mesh, 2)


def test_too_few_images_for_the_global_batch(image_folder, tmp_path, mesh):
    config = _config("--train_data_dir", str(image_folder), "--cache_dir", str(tmp_path))
    with pytest.raises(ValueError, match="has 9 usable images, fewer than one global batch of 16"):
        make_train_loader(config, mesh, batch_size=16)


@pytest.fixture(scope="module")
def saved_dataset(tmp_path_factory):
    import datasets

    path = tmp_path_factory.mktemp("hf") / "saved"
    features = datasets.Features({"label": datasets.Value("int32"), "picture": datasets.Image()})
    data = {"label": list(range(6)), "picture": [_rgb(i, 16 + i, 12) for i in range(6)]}
    datasets.Dataset.from_dict(data, features=features).save_to_disk(str(path))
    return path


def test_saved_datasets_folder_uses_the_first_image_column(saved_dataset, mesh):
    loader = make_train_loader(_config("--dataset_name", str(saved_dataset), "--center_crop"), mesh, batch_size=3)
    assert loader.num_examples == 6 and loader.steps_per_epoch == 2
    assert np.asarray(next(loader)["images"]).shape == (3, 3, RES, RES)
    loader.close()


def test_saved_dataset_dict_reads_its_train_split(saved_dataset, tmp_path, mesh):
    import datasets

    train = datasets.load_from_disk(str(saved_dataset))
    path = tmp_path / "dict"
    datasets.DatasetDict({"train": train, "test": train.select(range(2))}).save_to_disk(str(path))
    loader = make_train_loader(_config("--dataset_name", str(path)), mesh, batch_size=3)
    assert loader.num_examples == 6


def test_image_column_errors_list_the_columns(saved_dataset, tmp_path, mesh):
    import datasets

    with pytest.raises(ValueError, match=r"'photo' is not a column.*\['label', 'picture'\]"):
        make_train_loader(_config("--dataset_name", str(saved_dataset), "--image_column", "photo"), mesh, 2)
    plain = tmp_path / "plain"
    datasets.Dataset.from_dict({"label": [1, 2], "caption": ["a", "b"]}).save_to_disk(str(plain))
    with pytest.raises(ValueError, match=r"no Image column.*--image_column.*\['label', 'caption'\]"):
        make_train_loader(_config("--dataset_name", str(plain)), mesh, 2)


def test_img_column_of_arrays(tmp_path, mesh):
    import datasets

    path = tmp_path / "arrays"
    images = [np.asarray(_rgb(i)) for i in range(4)]
    datasets.Dataset.from_dict({"img": images, "label": [0, 1, 0, 1]}).save_to_disk(str(path))
    loader = make_train_loader(_config("--dataset_name", str(path), "--center_crop"), mesh, batch_size=2)
    assert np.asarray(next(loader)["images"]).shape == (2, 3, RES, RES)
    loader.close()


def test_tfds_without_the_package_gives_an_install_hint(monkeypatch, mesh):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        make_train_loader(_config("--dataset_name", "tfds:mnist"), mesh, 2)


def test_tfds_data_source(tmp_path, mesh):
    tfds = pytest.importorskip("tensorflow_datasets", reason="TFDS is an optional extra: pip install "
                                                                "tensorflow-datasets (no TensorFlow needed)")

    class TinyShapesForTest(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"label": tfds.features.ClassLabel(num_classes=2),
                 "image": tfds.features.Image(shape=(None, None, 3))}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(0, 6), "test": self._generate_examples(6, 2)}

        def _generate_examples(self, start, count):
            for i in range(start, start + count):
                buffer = io.BytesIO()  # encoded bytes: encoding arrays would need TensorFlow
                _rgb(i).save(buffer, format="PNG")
                buffer.seek(0)
                yield i, {"label": i % 2, "image": buffer}

    TinyShapesForTest(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    config = _config("--dataset_name", "tfds:tiny_shapes_for_test", "--tfds_data_dir", str(tmp_path), "--center_crop")
    loader = make_train_loader(config, mesh, batch_size=3)
    assert loader.num_examples == 6
    images = np.asarray(next(loader)["images"])
    loader.close()
    assert images.shape == (3, 3, RES, RES)
    config = _config("--dataset_name", "tfds:tiny_shapes_for_test:test", "--tfds_data_dir", str(tmp_path))
    assert make_train_loader(config, mesh, batch_size=2).num_examples == 2
