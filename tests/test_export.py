"""export and sample CLIs: bad sources are one line and exit code 2 (the round trip is in test_e2e.py)."""

import os

import pytest

from jax_uncond import export, sample


def exit_line(capsys, main, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1]


def test_export_missing_source(tmp_path, capsys):
    line = exit_line(capsys, export.main, [str(tmp_path / "nope"), str(tmp_path / "out")])
    assert "no such folder" in line


def test_export_folder_without_checkpoints(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    line = exit_line(capsys, export.main, [str(tmp_path / "run"), str(tmp_path / "out")])
    assert "not a checkpoint folder" in line
    assert not (tmp_path / "out").exists()


def test_export_empty_checkpoints_folder(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    line = exit_line(capsys, export.main, [str(tmp_path / "run"), str(tmp_path / "out")])
    assert "no complete checkpoint" in line


def test_sample_needs_a_pipeline_folder(tmp_path, capsys):
    line = exit_line(capsys, sample.main, [str(tmp_path), "--out", str(tmp_path / "out")])
    assert "not a DDPMPipeline folder" in line


def test_sample_rejects_non_positive_counts(tmp_path, capsys):
    line = exit_line(capsys, sample.main, [str(tmp_path), "--out", str(tmp_path / "o"), "--num_images", "0"])
    assert "--num_images must be positive" in line


def test_sample_a_folder_saved_by_pytorch(tmp_path):
    """A DDPMPipeline folder written by diffusers in PyTorch samples in JAX with DDIM: PNGs and a grid."""
    import numpy as np
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
    from PIL import Image

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, block_out_channels=(32, 64), norm_num_groups=8, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=100)).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "samples"
    argv = [str(tmp_path / "pipe"), "--num_images", "5", "--batch_size", "5", "--out", str(out),
            "--scheduler", "ddim", "--steps", "2", "--seed", "1"]
    assert sample.main(argv) == 0
    assert sorted(os.listdir(out)) == ["grid.png"] + [f"sample_{i:04d}.png" for i in range(5)]
    assert np.asarray(Image.open(out / "sample_0004.png")).shape == (8, 8, 3)
    assert np.asarray(Image.open(out / "grid.png")).shape == (16, 24, 3)
    first = np.asarray(Image.open(out / "sample_0000.png"))
    assert sample.main(argv) == 0  # same seed, same images
    assert np.array_equal(first, np.asarray(Image.open(out / "sample_0000.png")))
