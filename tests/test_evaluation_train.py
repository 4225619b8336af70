"""FID during training: a tiny train_flax.py run logs `fid` and `kid` to TensorBoard and the run summary, its
reference statistics come from the training data through the loader and are cached in the output folder,
and a missing or bad weights file stops start-up with one line and exit 2, before the train step compiles."""

import os

import jax
import numpy as np
import pytest

from fid_parts import weights_files
from jax_uncond.evaluation.features import InceptionFeatures
from jax_uncond.evaluation.inception_weights import load_inception_weights
from jax_uncond.evaluation.reference import ImageFolder, dataset_statistics
from jax_uncond.training.config import parse_args
from jax_uncond.training.sharding import make_mesh
from test_e2e import common_args, train, workspace  # noqa: F401  (workspace: a fixture)
from test_outputs import read_events

FID_ARGS = ["--fid_epochs", 1, "--fid_num_samples", 64, "--fid_inference_steps", 2, "--fid_dims", 64]


def tensorboard_scalars(logdir):
    """{tag: [(step, value)]} of the run's TensorBoard events."""
    events = read_events(str(logdir))
    out = {}
    for event in events:
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


@pytest.mark.slow
def test_training_logs_fid(workspace, tmp_path):  # noqa: F811
    output_dir = tmp_path / "run"
    args = common_args(workspace, output_dir) + ["--train_batch_size", 8, "--num_epochs", 1, *FID_ARGS,
                                                 "--inception_weights", weights_files()["zip"]]
    proc = train(args, devices=1)
    out = proc.stdout + proc.stderr
    assert "fid: every 1 epoch(s), 64 samples (ddim, 2 steps), 64-d features, against the training data (16 " \
           "images; statistics written to" in out, out
    cached = [f for f in os.listdir(output_dir) if f.startswith("fid_reference-")]
    assert cached and cached[0].startswith("fid_reference-images-16px-centercrop-16images-inception"), cached
    summary = [line for line in out.splitlines() if line.startswith("done:")][0]
    fid = float(summary.split(" fid=")[1].split()[0])
    assert fid > 0 and " fid_best_step=2 " in summary and " kid=" in summary
    scalars = tensorboard_scalars(output_dir / "logs")
    assert scalars["fid"] == [(2, pytest.approx(fid, rel=1e-5))] and len(scalars["kid"]) == 1
    assert scalars["fid_best_step"] == [(2, 2.0)]
    card = (output_dir / "README.md").read_text()
    assert f"| FID (64 samples, ddim 2 steps, 64-d features) | {fid:.4g} |" in card, card


@pytest.mark.parametrize("case", ["missing", "truncated"])
def test_bad_weights_stop_start_up(workspace, tmp_path, case, capsys):  # noqa: F811
    weights = tmp_path / "weights.pth"
    if case == "truncated":
        weights.write_bytes(open(weights_files()["legacy"], "rb").read()[:1000])
    args = common_args(workspace, tmp_path / "run") + ["--train_batch_size", 2, "--num_epochs", 1, *FID_ARGS,
                                                       "--inception_weights", weights]
    from jax_uncond.train import main

    code = main([str(a) for a in args], prog="train_flax.py")
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("train_flax.py: error:") and str(weights) in lines[-1], err
    assert "compiled" not in out + err and "fid:" not in out  # stopped before the train step and the reference


def test_reference_from_the_loader_is_cached(workspace, tmp_path):  # noqa: F811
    """Images already at --resolution, center-cropped: the loader's reference equals the folder's, and the second
    start-up reads the cached file instead of computing it."""
    folder = workspace / "images" / "nested"
    config = parse_args(["--train_data_dir", str(workspace / "images"), "--resolution", "20", "--center_crop",
                         "--output_dir", str(tmp_path / "run"), "--fid_dims", "64"])
    weights = load_inception_weights(weights_files()["zip"])
    extractor = InceptionFeatures(weights.params, make_mesh(jax.devices()[:1]), 8, dims=64)
    from jax_uncond.data.sources import load_source

    source = load_source(config)[0]
    computed, description = dataset_statistics(source, config, extractor, weights.sha256)
    assert "written to" in description and computed.num_images == 16
    from_folder = ImageFolder.scan(str(folder), "--fid_reference").features(extractor, "folder")
    np.testing.assert_allclose(computed.mu, from_folder.mean(axis=0), rtol=1e-5)
    cached, description = dataset_statistics(source, config, extractor, weights.sha256)
    assert "read from" in description
    np.testing.assert_array_equal(cached.sigma, computed.sigma)
    np.testing.assert_array_equal(cached.features, computed.features)
