"""`python -m jax_uncond.evaluate` against pytorch-fid on folders of PNG files (FID and KID), `.npz` statistics
both ways, 1 and 2 processes, and bad invocations (one line, exit 2).

The comparisons use pytorch-fid's 768-d features (`--dims 768`, block 2: every Inception block type but the
last two, checked at 2048 in test_evaluation_features.py): scipy's sqrtm of a 2048x2048 matrix alone takes
~40 CPU seconds, per FID, on each side.
"""

import json
import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

from fid_parts import pytorch_fid_weights, structured_images, weights_files, write_pngs
from jax_uncond import evaluate
from jax_uncond.evaluation import inception_weights as iw
from jax_uncond.evaluation.statistics import kid_subsets
from jax_uncond.models.unet_2d import FlaxUNet2DModel
from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline
from jax_uncond.schedulers import FlaxDDPMScheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
                 norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def weights():
    return weights_files()["zip"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A: 8 RGB PNG files of 32x32; B: 7 of 48x48, three of them grey (mode L), as pytorch-fid reads them."""
    root = tmp_path_factory.mktemp("folders")
    a = write_pngs(root / "a", structured_images(8, 32, 3, seed=1))
    b = write_pngs(root / "b", structured_images(4, 48, 3, seed=2))
    write_pngs(root / "b", structured_images(3, 48, 1, seed=3), prefix="grey")
    return a, b


def run(argv, capsys):
    """evaluate.main in this process (8 CPU devices): (exit code, stdout, stderr)."""
    try:
        code = evaluate.main([str(a) for a in argv], prog="python -m jax_uncond.evaluate")
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def result_of(out):
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.slow
def test_fid_and_kid_equal_pytorch_fid(folders, weights, tmp_path, capsys):
    import pytorch_fid.fid_score as fid_score

    a, b = folders
    code, out, err = run(["--images", a, "--reference", b, "--inception_weights", weights, "--batch_size", 8,
                          "--dims", 768, "--save_stats", tmp_path / "a.npz"], capsys)
    assert code == 0, err
    result = result_of(out)
    assert (result["num_samples"], result["num_reference"], result["dims"]) == (8, 7, 768)
    activations = []

    def recorded(*args, get_activations=fid_score.get_activations, **kwargs):
        activations.append(get_activations(*args, **kwargs))
        return activations[-1]

    with pytorch_fid_weights(weights), mock.patch.object(fid_score, "get_activations", recorded):
        fid = fid_score.calculate_fid_given_paths([a, b], 50, "cpu", 768, num_workers=0)
    assert result["fid"] == pytest.approx(fid, rel=1e-3)
    act_a, act_b = activations  # pytorch-fid's own features of the two folders
    # KID (pytorch-fid has none): clean-fid's formula on pytorch-fid's activations, over the same subsets
    index_a, index_b = kid_subsets(8, 7)
    m, n = index_a.shape[1], act_a.shape[1]
    values = []
    for rows_a, rows_b in zip(index_a, index_b):
        x, y = act_a[rows_a], act_b[rows_b]
        k = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        values.append(((k.sum() - np.diag(k).sum()) / (m - 1) - ((x @ y.T / n + 1) ** 3).sum() * 2 / m) / m)
    assert result["kid_mean"] == pytest.approx(np.mean(values), rel=1e-3, abs=1e-6)
    assert result["kid_std"] == pytest.approx(np.std(values), rel=1e-3, abs=1e-6)
    # --save_stats wrote pytorch-fid's statistics of these images, in a file pytorch-fid reads
    mu, sigma = fid_score.compute_statistics_of_path(str(tmp_path / "a.npz"), None, 50, 768, "cpu")
    np.testing.assert_allclose(mu, act_a.mean(axis=0), rtol=0, atol=1e-5 * np.abs(act_a).max())
    np.testing.assert_allclose(sigma, np.cov(act_a, rowvar=False), rtol=0, atol=1e-5 * np.abs(sigma).max())


def test_pytorch_fid_npz_is_a_reference(folders, weights, tmp_path, capsys):
    from pytorch_fid.fid_score import calculate_fid_given_paths, save_fid_stats

    a, b = folders
    with pytorch_fid_weights(weights):
        save_fid_stats([b, str(tmp_path / "b.npz")], 50, "cpu", 64, num_workers=0)
        fid = calculate_fid_given_paths([a, b], 50, "cpu", 64, num_workers=0)
    code, out, err = run(["--images", a, "--reference", tmp_path / "b.npz", "--inception_weights", weights,
                          "--batch_size", 8, "--dims", 64], capsys)
    assert code == 0, err
    result = result_of(out)
    assert result["fid"] == pytest.approx(fid, rel=1e-3)
    assert result["kid_mean"] is None and result["num_reference"] is None  # pytorch-fid keeps no features


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    unet = FlaxUNet2DModel.from_config(TINY_UNET)
    path = tmp_path_factory.mktemp("pipeline")
    FlaxDDPMPipeline(unet, FlaxDDPMScheduler(num_train_timesteps=100)).save_pretrained(
        path, {"unet": unet.init_weights(jax.random.key(0))})
    return path


def sample_args(pipeline_dir, reference, weights):
    """13 samples in global batches of 8 (3 padded), 2 DDIM steps, 64-d features."""
    return [pipeline_dir, "--reference", reference, "--inception_weights", weights, "--num_samples", 13,
            "--batch_size", 8, "--steps", 2, "--dims", 64, "--seed", 5]


@pytest.mark.slow
def test_two_processes_equal_one(pipeline_dir, folders, weights, tmp_path, capsys):
    code, out, err = run(sample_args(pipeline_dir, folders[1], weights), capsys)
    assert code == 0, err
    one = result_of(out)
    assert (one["num_samples"], one["steps"], one["scheduler"]) == (13, 2, "ddim")

    from run_parts import free_port

    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    address = f"localhost:{free_port()}"
    processes = [subprocess.Popen([sys.executable, "-m", "jax_uncond.evaluate",
                                   *map(str, sample_args(pipeline_dir, folders[1], weights)),
                                   "--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
                 for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (stdout, stderr) in zip(processes, outputs):
        assert p.returncode == 0, stderr
    assert not [line for line in outputs[1][0].splitlines() if line.startswith("{")]  # JSON from process 0 only
    two = result_of(outputs[0][0])
    for key in ("fid", "kid_mean", "kid_std"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-9), key


def _bad_invocation(case, folders, weights, tmp_path, monkeypatch):
    a, b = folders
    args = ["--images", a, "--reference", b, "--inception_weights", weights, "--batch_size", 8]
    if case == "weights_missing":
        args[args.index(weights)] = tmp_path / "missing.pth"
    elif case == "weights_truncated":
        data = open(weights, "rb").read()
        (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 3])
        args[args.index(weights)] = tmp_path / "truncated.pth"
    elif case == "weights_wrong_keys":
        import torch

        torch.save({"conv.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
        args[args.index(weights)] = tmp_path / "other.pth"
    elif case == "weights_checksum":  # no --inception_weights: the download (mocked) brings the wrong bytes
        args = args[:4] + args[6:]
        monkeypatch.setenv(iw.CACHE_ENV, str(tmp_path / "cache"))
        monkeypatch.setattr(iw.urllib.request, "urlopen", lambda url, timeout=None: __import__("io").BytesIO(b"x"))
    elif case == "npz_dimension":
        np.savez(tmp_path / "stats.npz", mu=np.zeros(768), sigma=np.eye(768))
        args[args.index(b)] = tmp_path / "stats.npz"
    elif case == "one_image":
        write_pngs(tmp_path / "one", structured_images(1, 16))
        args[args.index(a)] = tmp_path / "one"
    elif case == "empty_folder":
        (tmp_path / "empty").mkdir()
        args[args.index(a)] = tmp_path / "empty"
    elif case == "one_sample":
        args = [tmp_path, "--num_samples", 1, "--reference", b]
    return args


@pytest.mark.parametrize("case,message", [
    ("weights_missing", "no such file"),
    ("weights_truncated", "not a readable PyTorch state dict"),
    ("weights_wrong_keys", "not pytorch-fid's FID Inception state dict"),
    ("weights_checksum", "SHA-256"),
    ("npz_dimension", "not of 2048 Inception features"),
    ("one_image", "1 readable image(s); FID needs at least 2"),
    ("empty_folder", "no image files"),
    ("one_sample", "--num_samples 1"),
])
def test_bad_invocation_is_one_line_and_exit_2(case, message, folders, weights, tmp_path, monkeypatch, capsys):
    code, out, err = run(_bad_invocation(case, folders, weights, tmp_path, monkeypatch), capsys)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("downloading", "note:"))]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("python -m jax_uncond.evaluate: error:") and message in lines[0], err
    assert out == ""
