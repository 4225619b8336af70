"""jax-uncond-prepare and prepared folders: the manifest, batches equal to the source's, resume after SIGKILL,
refusals."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from jax_uncond import __version__, prepare
from jax_uncond.data.arrayrecord import MANIFEST, WORK_DIR, Manifest, shard_ranges
from jax_uncond.data.loader import make_train_loader
from jax_uncond.training.config import parse_args

RES = 8


def _rgb(seed, width, height):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Images of several modes and shapes, nested, plus a non-image (left out at start-up) and a truncated PNG
    (its header reads, its data does not)."""
    root = tmp_path_factory.mktemp("source")
    (root / "nested").mkdir()
    for i in range(12):
        image = _rgb(i, 10 + i, 20 - i)
        image = {0: image, 1: image.convert("L"), 2: image.convert("P"), 3: image.convert("RGBA")}[i % 4]
        image.save(root / ("nested" if i % 2 else "") / f"img_{i:02d}.png")
    _rgb(20, 30, 12).convert("CMYK").save(root / "cmyk.jpg")
    (root / "nested" / "garbage.jpg").write_bytes(b"not a jpeg")
    buffer = io.BytesIO()
    _rgb(21, 16, 16).save(buffer, format="PNG")
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return root


def _prepare(source, out, *args, workers=0):
    code = prepare.main([str(out), "--train_data_dir", str(source), "--cache_dir", str(out.parent / "cache"),
                         "--resolution", str(RES), "--num_shards", "3", "--dataloader_num_workers", str(workers),
                         *map(str, args)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def prepared(folder, tmp_path_factory):
    """The folder prepared with --center_crop, by format."""
    root = tmp_path_factory.mktemp("prepared")
    return {fmt: _prepare(folder, root / fmt, "--center_crop", "--format", fmt) for fmt in ("png", "raw", "jpeg")}


def _manifest(out):
    with open(out / MANIFEST) as f:
        return json.load(f)


def _host_batches(args, count, shards=(0, 1)):
    loader = make_train_loader(parse_args(["--resolution", str(RES), "--seed", "5", *map(str, args)]), None, 4,
                               shard_options=grain.sharding.ShardOptions(*shards))
    it = loader.iter_host()
    batches = [next(it) for _ in range(count)]
    it.close()
    return batches, loader


def test_manifest_counts_and_names_every_skipped_file(prepared, folder):
    manifest = _manifest(prepared["png"])
    assert manifest["num_records"] == 14  # 13 images and the truncated file, whose record is empty
    assert (manifest["resolution"], manifest["center_crop"], manifest["encoding"]) == (RES, True, "png")
    assert manifest["tool"] == f"jax_uncond {__version__}"
    assert manifest["source"]["train_data_dir"] == str(folder) and manifest["fingerprint"].startswith("datasets ")
    assert [s["records"] for s in manifest["shards"]] == [b - a for a, b in shard_ranges(14, 3)]
    skipped = {os.path.basename(s["path"]): s for s in manifest["skipped"]}
    assert set(skipped) == {"garbage.jpg", "truncated.png"}
    assert skipped["garbage.jpg"]["record"] is None and "truncated" in skipped["truncated.png"]["reason"]
    assert not (prepared["png"] / WORK_DIR).exists()
    assert _manifest(prepared["jpeg"])["quality"] == prepare.DEFAULT_QUALITY


@pytest.mark.parametrize("fmt", ["png", "raw"])
def test_prepared_batches_equal_the_folders(prepared, folder, tmp_path, fmt):
    """Same images, same order, same flips, same skipped count as the folder read with --center_crop at the prepared
    resolution; over an epoch boundary (14 images, batch 4: 3 steps per epoch)."""
    common = ["--cache_dir", tmp_path, "--random_flip"]
    source, source_loader = _host_batches(["--train_data_dir", folder, "--center_crop", *common], 7)
    ours, our_loader = _host_batches(["--train_data_dir", prepared[fmt], *common], 7)
    assert our_loader.num_examples == source_loader.num_examples == 14
    assert our_loader.skipped_files == source_loader.skipped_files == 1  # the garbage file, left out at start-up
    for a, b in zip(source, ours):
        np.testing.assert_array_equal(a["images"], b["images"])
        np.testing.assert_array_equal(a["bad"], b["bad"])
    assert any((b["bad"] >= 0).any() for b in ours)  # the truncated file's record was met and replaced
    assert "truncated.png" in our_loader.source.describe(int(next(b["bad"][b["bad"] >= 0][0] for b in ours
                                                                  if (b["bad"] >= 0).any())))
    halves = [_host_batches(["--dataset_name", f"arrayrecord:{prepared[fmt]}", *common], 7, (p, 2))[0]
              for p in range(2)]  # each of 2 processes reads its half of every global batch
    for k, whole in enumerate(source):
        np.testing.assert_array_equal(np.concatenate([halves[0][k]["images"], halves[1][k]["images"]]),
                                      whole["images"])


def test_lower_resolution_and_jpeg_are_resized_as_today(prepared, tmp_path):
    batches, _ = _host_batches(["--dataset_name", f"arrayrecord:{prepared['jpeg']}", "--resolution", 4], 1)
    assert batches[0]["images"].shape == (4, 3, 4, 4) and np.abs(batches[0]["images"]).max() <= 1


def test_sigkill_then_rerun_gives_the_uninterrupted_shards(prepared, folder, tmp_path):
    """Killed (SIGKILL, one Grain worker) after 7 of 14 records, in its second shard; the rerun (no worker) keeps
    the first shard and writes the others as the uninterrupted prepare did, byte for byte."""
    out = tmp_path / "killed"
    args = [sys.executable, "-m", "jax_uncond.prepare", str(out), "--train_data_dir", str(folder), "--cache_dir",
            str(tmp_path / "cache"), "--resolution", str(RES), "--center_crop", "--num_shards", "3"]
    env = dict(os.environ, JAX_UNCOND_FAULTS="prepare_kill:7")
    killed = subprocess.run(args + ["--dataloader_num_workers", "1"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / MANIFEST).exists()
    assert sorted(p.name for p in out.glob("*.array_record")) == ["data-00000-of-00003.array_record"]
    assert (out / WORK_DIR / "data-00001-of-00003.array_record.partial").exists()
    assert prepare.main([str(out), *args[4:], "--dataloader_num_workers", "0"]) == 0
    uninterrupted = prepared["png"]
    assert _manifest(out) == _manifest(uninterrupted)
    names = sorted(p.name for p in uninterrupted.glob("*.array_record"))
    assert sorted(p.name for p in out.glob("*.array_record")) == names and len(names) == 3
    for name in names:
        assert (out / name).read_bytes() == (uninterrupted / name).read_bytes(), name
    assert not (out / WORK_DIR).exists()


def _settings(out):
    return prepare._settings(Manifest.from_json(_manifest(out)))


def test_prepare_reruns_and_refusals(prepared, folder, tmp_path, capsys):
    def run(out, *args):
        try:
            code = prepare.main([str(out), "--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "cache"),
                                 "--resolution", str(RES), "--center_crop", "--num_shards", "3",
                                 "--dataloader_num_workers", "0", *map(str, args)])
        except SystemExit as e:  # argparse's errors
            code = e.code
        captured = capsys.readouterr()
        return code, captured.out, [line for line in captured.err.splitlines() if "error" in line]

    done = shutil.copytree(prepared["png"], tmp_path / "done")
    code, out, errors = run(done)
    assert code == 0 and "nothing to do" in out and not errors
    code, _, errors = run(done, "--format", "raw")
    assert code == 2 and len(errors) == 1 and "other settings (encoding 'png' there, 'raw' here)" in errors[0]
    (tmp_path / "unfinished" / WORK_DIR).mkdir(parents=True)
    (tmp_path / "unfinished" / WORK_DIR / prepare.PLAN).write_text(json.dumps({**_settings(done), "resolution": 4}))
    code, _, errors = run(tmp_path / "unfinished")
    assert code == 2 and len(errors) == 1
    assert "unfinished prepare of other settings (resolution 4 there, 8 here)" in errors[0]
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("someone else's")
    code, _, errors = run(tmp_path / "foreign")
    assert code == 2 and len(errors) == 1 and "not empty" in errors[0]
    code, _, errors = run(tmp_path / "new", "--quality", 90)
    assert code == 2 and len(errors) == 1 and "--quality applies to --format jpeg only" in errors[0]
