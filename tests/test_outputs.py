"""RunOutputs: start-up checks, tracker events, sample grids, pipeline folders and Hub uploads."""

import glob
import os
import struct

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from jax_uncond.errors import UsageError
from jax_uncond.run import outputs as out
from jax_uncond.training.config import parse_args

SECRET = "hf_SECRETtokenTHATmustNEVERleak"


def read_events(logdir):
    """Every tensorboard Event written under logdir (TFRecord framing: length, crc, data, crc)."""
    events = []
    for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            events.append(event_pb2.Event.FromString(data[pos + 12:pos + 12 + length]))
            pos += 12 + length + 4
    return events


class FakePipeline:
    """Stands in for FlaxDDPMPipeline: images are a function of the rng and the params."""

    calls = []
    schedulers = []

    def __init__(self, unet, scheduler):
        self.unet, self.scheduler = unet, scheduler

    def __call__(self, params, rng, batch_size, num_inference_steps, output_type, scheduler=None):
        import jax

        FakePipeline.calls.append((batch_size, num_inference_steps))
        FakePipeline.schedulers.append(scheduler)
        noise = jax.random.uniform(rng, (batch_size, 8, 8, 3))
        return type("Out", (), {"images": np.asarray(noise) * params["unet"]["w"]})

    def save_pretrained(self, path, params):
        os.makedirs(os.path.join(path, "unet"), exist_ok=True)
        np.save(os.path.join(path, "unet", "w.npy"), params["unet"]["w"])
        with open(os.path.join(path, "model_index.json"), "w") as f:
            f.write("{}")


@pytest.fixture
def fake_pipeline(monkeypatch):
    FakePipeline.calls, FakePipeline.schedulers = [], []
    monkeypatch.setattr(out.RunOutputs, "pipeline", lambda self: FakePipeline(self.model, self.scheduler))
    return FakePipeline


def make(tmp_path, *flags):
    config = parse_args(["--output_dir", str(tmp_path / "run"), *flags])
    return out.RunOutputs(config, model=None, scheduler=None, mesh=None), config


def test_output_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(UsageError, match="--output_dir .* is a file"):
        make(tmp_path)


def test_wandb_not_installed_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(UsageError, match="pip install wandb"):
        make(tmp_path, "--logger", "wandb")
    assert not (tmp_path / "run").exists()


def test_push_to_hub_without_token_fails_at_start(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no saved `hf auth login`
    with pytest.raises(UsageError, match="needs a Hub token.*HF_TOKEN"):
        make(tmp_path, "--push_to_hub")


@pytest.mark.parametrize("token_source", ["flag", "env"])
def test_push_to_hub_without_network_fails_at_start(tmp_path, monkeypatch, token_source):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    flags = ["--push_to_hub"]
    if token_source == "flag":
        flags += ["--hub_token", SECRET]
    else:
        monkeypatch.setenv("HF_TOKEN", SECRET)
    with pytest.raises(UsageError, match="cannot create or reach the Hub") as info:
        make(tmp_path, *flags)
    assert SECRET not in str(info.value)


def test_tensorboard_scalars_and_config_without_secret(tmp_path, fake_pipeline):
    outputs, config = make(tmp_path, "--eval_batch_size", "4", "--hub_token", SECRET)
    outputs.log(1, {"loss": 0.5, "lr": 1e-4})
    outputs.log(2, {"loss": 0.25, "lr": 2e-4})
    outputs.close({"steps": 2, "loss": 0.25})
    logdir = tmp_path / "run" / "logs" / out.RUN_NAME
    events = read_events(str(logdir))
    scalars = {(v.tag, e.step): v.simple_value for e in events for v in e.summary.value if v.HasField("simple_value")}
    assert scalars[("loss", 1)] == 0.5 and scalars[("loss", 2)] == 0.25
    assert scalars[("lr", 2)] == pytest.approx(2e-4)
    texts = [v.tensor.string_val[0].decode() for e in events for v in e.summary.value if v.tag.startswith("config")]
    assert texts and '"eval_batch_size": 4' in texts[0] and "hub_token" not in texts[0]
    for path in glob.glob(str(tmp_path / "run" / "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert SECRET.encode() not in f.read(), path


def test_samples_are_seeded_and_saved(tmp_path, fake_pipeline):
    outputs, config = make(tmp_path, "--eval_batch_size", "6", "--ddpm_num_inference_steps", "7",
                           "--save_images_epochs", "2", "--save_model_epochs", "100")
    params = {"w": np.float32(1.0)}
    for epoch in range(4):
        outputs.log(epoch * 10, {"loss": 1.0})
        outputs.epoch_end(epoch, params, last=epoch == 3)
    outputs.close({})
    grids = sorted(os.listdir(tmp_path / "run" / out.SAMPLES_DIR))
    assert grids == ["epoch_0000.png", "epoch_0002.png", "epoch_0003.png"]  # every 2 epochs and the last
    assert fake_pipeline.calls == [(6, 7)] * 3
    a, b = (np.asarray(Image.open(tmp_path / "run" / out.SAMPLES_DIR / g)) for g in grids[:2])
    assert a.shape == (2 * 8, 3 * 8, 3) and np.array_equal(a, b)  # same noise every time: grids compare
    events = read_events(str(tmp_path / "run" / "logs"))
    image_steps = [e.step for e in events for v in e.summary.value if v.tag.startswith("test_samples")]
    assert sorted(set(image_steps)) == [0, 2, 3]  # TensorBoard step = epoch, as in the PyTorch script


def test_pipeline_folder_every_save_model_epochs_and_last(tmp_path, fake_pipeline, monkeypatch):
    outputs, config = make(tmp_path, "--save_images_epochs", "100", "--save_model_epochs", "3")
    saved = []
    monkeypatch.setattr(out.RunOutputs, "save_pipeline", lambda self, params: saved.append(float(params["w"])))
    for epoch in range(5):
        outputs.epoch_end(epoch, {"w": np.float32(epoch)}, last=epoch == 4)
    assert saved == [0.0, 3.0, 4.0]
    assert fake_pipeline.calls == [(16, 1000)] * 2  # epoch 0 (0 % N == 0, as in PyTorch) and the last


def test_pipeline_holds_the_params_it_is_handed(tmp_path, fake_pipeline):
    outputs, _ = make(tmp_path, "--save_images_epochs", "100")
    outputs.epoch_end(0, {"w": np.float32(0.75)}, last=True)
    assert np.load(tmp_path / "run" / "unet" / "w.npy") == np.float32(0.75)


def test_only_process_zero_writes(tmp_path, fake_pipeline, monkeypatch):
    monkeypatch.setattr(out.jax, "process_index", lambda: 1)
    outputs, _ = make(tmp_path)
    outputs.log(1, {"loss": 1.0})
    outputs.epoch_end(0, {"w": np.float32(1.0)}, last=True)
    outputs.close({})
    assert not (tmp_path / "run").exists()


def test_push_to_hub_uploads_without_checkpoints_or_secret(tmp_path, fake_pipeline, monkeypatch):
    import concurrent.futures

    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "me/run"

    def create_repo(name, token, private, exist_ok):
        calls["create"] = (name, token, private, exist_ok)
        return Repo()

    def upload_folder(**kwargs):
        calls.setdefault("upload", []).append(kwargs)
        future = concurrent.futures.Future()
        future.set_result(None)
        return future

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    outputs, config = make(tmp_path, "--push_to_hub", "--hub_token", SECRET, "--hub_private_repo",
                           "--eval_batch_size", "2")
    assert calls["create"] == ("run", SECRET, True, True)
    (tmp_path / "run" / out.CHECKPOINTS_SUBDIR / "5").mkdir(parents=True)
    outputs.log(5, {"loss": 1.0})
    outputs.epoch_end(0, {"w": np.float32(1.0)}, last=True)
    outputs.close({"steps": 5})
    (upload,) = calls["upload"]
    assert upload["repo_id"] == "me/run" and upload["folder_path"] == str(tmp_path / "run")
    assert upload["token"] == SECRET and upload["commit_message"] == "Epoch 0"
    assert f"{out.CHECKPOINTS_SUBDIR}/*" in upload["ignore_patterns"]
    from huggingface_hub.utils import filter_repo_objects

    uploaded = list(filter_repo_objects(
        [os.path.relpath(p, tmp_path / "run") for p in glob.glob(str(tmp_path / "run" / "**"), recursive=True)
         if os.path.isfile(p)] + [f"{out.CHECKPOINTS_SUBDIR}/5/params"], ignore_patterns=upload["ignore_patterns"]))
    assert "model_index.json" in uploaded and any(p.startswith("logs/") for p in uploaded)
    assert "README.md" in uploaded and 'from_pretrained("me/run")' in open(tmp_path / "run" / "README.md").read()
    assert not any(p.startswith(out.CHECKPOINTS_SUBDIR) for p in uploaded)
    for path in glob.glob(str(tmp_path / "run" / "**"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert SECRET.encode() not in f.read(), path


def test_failed_upload_is_retried_then_names_the_way_out(tmp_path, fake_pipeline, monkeypatch, caplog, capsys):
    """A Hub that keeps failing costs warnings, never the run: every attempt is retried, then the
    command that uploads the folder by hand is named, and the summary counts the failed upload."""
    import huggingface_hub

    from jax_uncond.run import uploads

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda *a, **k: type("R", (), {"repo_id": "me/run"}))
    monkeypatch.setattr(uploads, "RETRY_DELAYS_S", (0.0, 0.0))
    attempts = []

    def upload_folder(**kwargs):
        attempts.append(kwargs["commit_message"])
        raise ConnectionError("network went away")

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    outputs, _ = make(tmp_path, "--push_to_hub", "--hub_token", SECRET, "--save_images_epochs", "100")
    outputs.epoch_end(0, {"w": np.float32(1.0)}, last=True)
    outputs.close({})
    assert attempts == ["Epoch 0"] * 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 4 and "retrying" in warnings[0] and "`hf upload me/run " in warnings[2]
    assert "not uploaded" in warnings[-1] and "'Epoch 0' (failed)" in warnings[-1]  # the end of the run names it
    assert "--exclude 'checkpoints/*'" in warnings[-1]  # the command by hand leaves the checkpoints out too
    assert all(SECRET not in w for w in warnings)
    assert "failed_uploads=1" in capsys.readouterr().out


def test_image_grid_layout():
    images = np.stack([np.full((2, 3, 3), i / 4) for i in range(5)])
    grid = np.asarray(out.image_grid(images))
    assert grid.shape == (2 * 2, 3 * 3, 3)
    assert grid[0, 3, 0] == round(255 / 4) and grid[2, 3, 0] == 255 and grid[2, 6, 0] == 0  # padding is black


def test_wandb_with_hub_token_is_refused(tmp_path, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    with pytest.raises(UsageError, match="expose --hub_token.*HF_TOKEN"):
        make(tmp_path, "--logger", "wandb", "--hub_token", SECRET)


def test_wandb_gets_config_scalars_and_samples(tmp_path, monkeypatch, fake_pipeline):
    import sys
    import types

    logged = {}

    class Run:
        def log(self, data, step):
            logged.setdefault(step, []).append(data)

        def finish(self):
            logged["finished"] = True

    def init(**kwargs):
        logged["init"] = kwargs
        return Run()

    wandb = types.ModuleType("wandb")
    wandb.init = init
    wandb.Image = lambda array: ("image", array.shape)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    outputs, _ = make(tmp_path, "--logger", "wandb", "--eval_batch_size", "2", "--save_model_epochs", "100")
    outputs.log(3, {"loss": 0.5})
    outputs.epoch_end(0, {"w": np.float32(1.0)}, last=False)
    outputs.close({})
    assert logged["init"]["project"] == out.RUN_NAME and "hub_token" not in logged["init"]["config"]
    assert logged[3][0] == {"loss": 0.5}
    assert logged[3][1]["epoch"] == 0 and logged[3][1]["test_samples"] == [("image", (8, 8, 3))] * 2
    assert logged["finished"]
