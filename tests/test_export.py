"""export and sample CLIs: bad sources are one line and exit code 2 (the round trip is in test_e2e.py)."""

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
