"""The user journey end to end: train_flax.py on an image folder -> a folder diffusers loads -> resume -> export.

Each run is a real `python train_flax.py ...` subprocess, so the command line, the exit codes and the
device count (XLA_FLAGS) are the user's. Tiny UNet, 16x16 images, a few steps.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_UNET = {
    "_class_name": "UNet2DModel",
    "sample_size": 16,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 1,
    "block_out_channels": [32, 64],
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
    "norm_num_groups": 8,
}
NUM_IMAGES = 16


def env_with_devices(n: int) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    return env


def train(args, devices, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_flax.py"), *map(str, args)],
                          env=env_with_devices(devices), capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"train_flax.py exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """An image folder of simple, structured 20x20 images, and the tiny UNet's config.json."""
    root = tmp_path_factory.mktemp("e2e")
    images = root / "images" / "nested"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(NUM_IMAGES):
        array = np.zeros((20, 20, 3), np.uint8)
        array[:, :, i % 3] = 200
        array[rng.integers(0, 10):, rng.integers(0, 10):, (i + 1) % 3] = 255
        Image.fromarray(array).save(images / f"img_{i:02d}.png")
    model_config = root / "unet_config.json"
    model_config.write_text(json.dumps(TINY_UNET))
    return root


def common_args(workspace, output_dir):
    return ["--train_data_dir", workspace / "images", "--model_config_name_or_path", workspace / "unet_config.json",
            "--output_dir", output_dir, "--resolution", 16, "--center_crop", "--random_flip",
            "--use_ema", "--checkpointing_steps", 2, "--save_images_epochs", 1, "--save_model_epochs", 1,
            "--eval_batch_size", 2, "--ddpm_num_inference_steps", 3, "--lr_warmup_steps", 1,
            "--learning_rate", 1e-3, "--seed", 3]


def safetensors_of(folder):
    from safetensors.numpy import load_file

    return load_file(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))


def checkpoint_steps(output_dir):
    names = os.listdir(os.path.join(output_dir, "checkpoints"))
    return sorted(int(n.split("_")[-1]) for n in names if n.startswith("checkpoint_") and n.split("_")[-1].isdigit())


@pytest.mark.slow
@pytest.mark.parametrize("devices,per_device_batch", [(1, 8), (4, 2)])
def test_train_load_resume_export(workspace, tmp_path, devices, per_device_batch):
    output_dir = tmp_path / "run"
    args = common_args(workspace, output_dir) + ["--train_batch_size", per_device_batch]
    # 16 images, global batch 8: 2 steps per epoch; 2 epochs -> checkpoints at steps 2 and 4.
    train(args + ["--num_epochs", 2], devices)
    assert (output_dir / "model_index.json").is_file()
    assert checkpoint_steps(output_dir) == [2, 4]
    assert sorted(os.listdir(output_dir / "samples")) == ["epoch_0000.png", "epoch_0001.png"]
    grid = np.asarray(Image.open(output_dir / "samples" / "epoch_0001.png"))
    assert grid.shape == (16, 32, 3)
    assert any(name.startswith("events.out.tfevents") for _, _, files in os.walk(output_dir / "logs") for name in files)
    first = safetensors_of(output_dir)

    import torch
    from diffusers import DDPMPipeline, DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(output_dir)
    assert isinstance(pipeline, DDPMPipeline)
    image = pipeline(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    resumed = train(args + ["--num_epochs", 3, "--resume_from_checkpoint", "latest"], devices)
    assert "checkpoint_4" in resumed.stdout + resumed.stderr  # the start-up decision names where it resumes
    assert checkpoint_steps(output_dir) == [2, 4, 6]  # continued from step 4, not from 0
    assert sorted(os.listdir(output_dir / "samples"))[-1] == "epoch_0002.png"
    assert "- Steps: 6 optimizer steps" in (output_dir / "README.md").read_text()  # the model card
    final = safetensors_of(output_dir)
    assert any(not np.array_equal(first[k], final[k]) for k in first)

    from jax_uncond import export

    exported = tmp_path / "exported"
    assert export.main([str(output_dir), str(exported)]) == 0
    from_checkpoint = safetensors_of(exported)  # the newest checkpoint (step 6) with its EMA weights
    assert from_checkpoint.keys() == final.keys()
    for key in final:
        np.testing.assert_array_equal(from_checkpoint[key], final[key], err_msg=key)
    with open(exported / "scheduler" / "scheduler_config.json") as f, \
            open(output_dir / "scheduler" / "scheduler_config.json") as g:
        assert json.load(f) == json.load(g)
    from huggingface_hub import ModelCard

    card = ModelCard.load(exported / "README.md")  # with the run's newest grid: step 6 is its newest checkpoint
    assert "![Samples](samples/epoch_0002.png)" in card.text and (exported / "samples" / "epoch_0002.png").is_file()
    assert "- Steps: 6 optimizer steps" in card.text and card.data.library_name == "diffusers"


def run_main(argv, capsys):
    """train_flax.py's main() in this process (8 CPU devices): (exit code, stderr)."""
    from jax_uncond.train import main

    try:
        code = main([str(a) for a in argv], prog="train_flax.py")
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", [
    "both_data_flags",
    "missing_path",
    "indivisible_resolution",
    "indivisible_batch",
    "not_a_checkpoint",
    "output_dir_is_a_file",
])
def test_bad_invocation_is_one_line_and_exit_2(workspace, tmp_path, case, capsys):
    """Caught at start-up, before anything compiles: so these run in-process, on the tests' 8 devices."""
    args = common_args(workspace, tmp_path / "run") + ["--train_batch_size", 2, "--num_epochs", 1]
    expected = {
        "both_data_flags": "--dataset_name",
        "missing_path": "does-not-exist",
        "indivisible_resolution": "resolution",
        "indivisible_batch": "global_batch_size",
        "not_a_checkpoint": "--resume_from_checkpoint",
        "output_dir_is_a_file": "--output_dir",
    }[case]
    if case == "both_data_flags":
        args += ["--dataset_name", "some/dataset"]
    elif case == "missing_path":
        args[args.index("--train_data_dir") + 1] = workspace / "does-not-exist"
    elif case == "indivisible_resolution":
        args[args.index("--resolution") + 1] = 15  # the UNet halves its input once: 15 does not divide
    elif case == "indivisible_batch":
        args += ["--global_batch_size", 6]  # 8 devices
    elif case == "not_a_checkpoint":
        (tmp_path / "not_a_checkpoint").mkdir()
        args += ["--resume_from_checkpoint", tmp_path / "not_a_checkpoint"]
    elif case == "output_dir_is_a_file":
        (tmp_path / "run").write_text("a file")
    code, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]  # progress bars of `datasets` may come first
    assert code == 2, err
    assert "Traceback" not in err and [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith("train_flax.py: error:") and expected in lines[-1], err


@pytest.fixture(scope="module")
def prepared_workspace(workspace, tmp_path_factory):
    """(folder, prepared): the workspace's images plus two wide ones (the crop matters), a non-image and a truncated
    PNG; and that folder prepared by jax-uncond-prepare at 16 px, center-cropped, as PNG."""
    import io
    import shutil

    from jax_uncond import prepare

    root = tmp_path_factory.mktemp("prepared_e2e")
    folder = shutil.copytree(workspace / "images", root / "images")
    rng = np.random.default_rng(1)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(folder / f"wide_{i}.png")
    (folder / "garbage.png").write_bytes(b"not a png")
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(buffer, format="PNG")
    (folder / "nested" / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    prepared = root / "prepared"
    assert prepare.main([str(prepared), "--train_data_dir", str(folder), "--cache_dir", str(root / "cache"),
                         "--resolution", "16", "--center_crop", "--num_shards", "2",
                         "--dataloader_num_workers", "0"]) == 0
    return folder, prepared


@pytest.mark.slow
def test_prepared_folder_trains_to_the_folders_weights(workspace, prepared_workspace, tmp_path):
    """`--train_data_dir PREPARED` and `--train_data_dir FOLDER --center_crop` at the prepared resolution, same seed
    and steps (over an epoch boundary, with flips and both kinds of broken file): the same weights, to the bit."""
    folder, prepared = prepared_workspace
    args = ["--model_config_name_or_path", workspace / "unet_config.json", "--resolution", 16, "--random_flip",
            "--train_batch_size", 4, "--max_train_steps", 6, "--save_images_epochs", 100, "--save_model_epochs", 100,
            "--eval_batch_size", 1, "--ddpm_num_inference_steps", 2, "--lr_warmup_steps", 1, "--learning_rate", 1e-3,
            "--seed", 3, "--cache_dir", tmp_path / "cache"]
    runs = {}
    for name, data in (("folder", ["--train_data_dir", folder, "--center_crop"]),
                       ("prepared", ["--train_data_dir", prepared])):
        proc = train([*data, "--output_dir", tmp_path / name, *args], devices=1)
        assert "skipped_files=2" in proc.stdout, proc.stdout  # the non-image at start-up, the truncated PNG when met
        runs[name] = safetensors_of(tmp_path / name)
    assert runs["folder"].keys() == runs["prepared"].keys()
    for key, value in runs["folder"].items():
        np.testing.assert_array_equal(runs["prepared"][key], value, err_msg=key)


@pytest.mark.parametrize("case", ["missing", "unreadable_manifest", "shard_mismatch", "lower_resolution",
                                  "unfinished"])
def test_bad_prepared_folder_is_one_line_and_exit_2(workspace, prepared_workspace, tmp_path, case, capsys):
    import shutil

    from jax_uncond.data.arrayrecord import MANIFEST, WORK_DIR

    path = shutil.copytree(prepared_workspace[1], tmp_path / "prepared")
    expected = {"missing": "no such folder", "unreadable_manifest": f"{MANIFEST} is unreadable",
                "shard_mismatch": "does not match its manifest", "lower_resolution": "prepared at resolution 16",
                "unfinished": "unfinished jax-uncond-prepare"}[case]
    args = common_args(workspace, tmp_path / "run") + ["--train_batch_size", 2, "--num_epochs", 1]
    args[:2] = ["--dataset_name", f"arrayrecord:{path}"]
    if case == "missing":
        args[1] = f"arrayrecord:{tmp_path / 'does-not-exist'}"
    elif case == "unreadable_manifest":
        (path / MANIFEST).write_text('{"format": "jax_uncond prepared images", "vers')
    elif case == "shard_mismatch":
        with open(path / "data-00001-of-00002.array_record", "ab") as f:
            f.write(b"\0" * 64)
    elif case == "lower_resolution":
        args[args.index("--resolution") + 1] = 32
    elif case == "unfinished":
        (path / MANIFEST).unlink()
        (path / WORK_DIR).mkdir()
    code, err = run_main(args, capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert "Traceback" not in err and [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith("train_flax.py: error: --dataset_name arrayrecord:") and expected in lines[-1], err
