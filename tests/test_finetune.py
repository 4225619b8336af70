"""Fine-tuning end to end: `train_flax.py --pretrained_model_name_or_path` from every source a user has
(a DDPMPipeline folder, a UNet2DModel folder, a Hub id, a train_unconditional.py checkpoint-N with and
without unet_ema/), each made by diffusers and PyTorch here; the result loads in diffusers. Bad sources
stop with one line and exit code 2 before anything compiles; a killed fine-tuning run resumes
bit-identically from its own checkpoint without reading the pretrained files again.

The runs go through `train_flax.main` in this process (8 CPU devices, the built-in data at 16x16) and
share one persistent compilation cache, so the runs with the same flags compile their step once.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from finetune_parts import PRETRAIN_STEPS, SCHEDULE_FLAGS, one_torch_thread, unet_tensors
from jax_uncond.run import pretrained
from jax_uncond.training.config import parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--resolution", "16", "--global_batch_size", "8", "--max_train_steps", "2", "--learning_rate", "1e-3",
       "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1", "--use_ema", "--eval_batch_size", "1",
       "--ddpm_num_inference_steps", "2", "--checkpointing_steps", "1000"]
"""Every training run here: the same flags, so the same compiled step (the LR schedule is part of it; this
one does not depend on --max_train_steps)."""


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("xla_cache")))
        yield


def run_main(argv, capsys):
    """train_flax.py's main() in this process: (exit code, stdout, stderr)."""
    from jax_uncond.train import main

    try:
        code = main([str(a) for a in argv], prog="train_flax.py")
    except SystemExit as e:  # argparse's own errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def finetune(source, output_dir, capsys, *flags):
    code, out, err = run_main(["--pretrained_model_name_or_path", source, "--output_dir", output_dir, *RUN, *flags],
                              capsys)
    assert code == 0, out + err
    return [line for line in out.splitlines() if line.startswith("start:")][0]


def load_in_diffusers(folder):
    """The written folder through diffusers' DiffusionPipeline, sampled for one step."""
    import torch
    from diffusers import DDPMPipeline, DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(pipeline, DDPMPipeline)
    with one_torch_thread():
        image = pipeline(batch_size=1, num_inference_steps=1, generator=torch.manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()
    return pipeline


def read_json(path):
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if k != "_diffusers_version"}


@pytest.mark.slow
def test_learning_rate_0_exports_the_loaded_model_unchanged(pretrained_sources, tmp_path, capsys):
    """A pipeline folder's UNet goes through the whole run (state, step, EMA, checkpoint, pipeline folder,
    `jax_uncond.export`) bit-identically, and its scheduler config comes out as it went in."""
    source, out = pretrained_sources["pipeline"], tmp_path / "run"
    line = finetune(source, out, capsys, "--learning_rate", "0")
    assert line.startswith(f"start: fine-tuning from {source} (DDPMPipeline folder)"), line
    assert "EMA starts from the weights" in line and "noise schedule from its scheduler_config.json" in line, line
    from jax_uncond import export

    assert export.main([str(out), str(tmp_path / "exported")]) == 0
    loaded = unet_tensors(source / "unet")
    for folder in (out, tmp_path / "exported"):
        written = unet_tensors(folder / "unet")
        assert written.keys() == loaded.keys()
        for key in loaded:
            np.testing.assert_array_equal(written[key], loaded[key], err_msg=key)
        assert read_json(folder / "scheduler" / "scheduler_config.json") == read_json(
            source / "scheduler" / "scheduler_config.json")
        assert read_json(folder / "unet" / "config.json") == read_json(source / "unet" / "config.json")
    load_in_diffusers(out)


def hub_snapshot(pipeline, root):
    """The pipeline folder as it lies in a Hub cache (models--owner--name/snapshots/<commit>/...)."""
    snapshot = root / "models--someone--ddpm-tiny" / "snapshots" / "0123456789abcdef"
    shutil.copytree(pipeline, snapshot)
    return snapshot


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["unet", "hub", "checkpoint", "checkpoint_no_ema"])
def test_fine_tunes_from(pretrained_sources, tmp_path, capsys, monkeypatch, layout):
    out = tmp_path / "run"
    flags = [] if layout == "hub" else list(SCHEDULE_FLAGS)  # the hub id is a pipeline: its schedule applies
    source = pretrained_sources["pipeline" if layout == "hub" else layout]
    if layout == "hub":
        import huggingface_hub
        from huggingface_hub.errors import EntryNotFoundError

        snapshot, calls = hub_snapshot(source, tmp_path / "cache"), []

        def fake_download(repo_id, filename, subfolder=None, **kwargs):
            calls.append((repo_id, filename, subfolder, kwargs))
            path = snapshot / (subfolder or "") / filename
            if not path.is_file():
                raise EntryNotFoundError(f"{filename} is not in {repo_id}")
            return str(path)

        monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
        source = "someone/ddpm-tiny"
        flags += ["--revision", "v1", "--cache_dir", tmp_path / "cache", "--hub_token", "hf_secret_for_the_test"]
    if layout == "checkpoint":
        flags += ["--resume_step_from_pretrained", "--max_train_steps", PRETRAIN_STEPS + 2]
    line = finetune(source, out, capsys, *flags)

    expected = {
        "unet": ["(UNet2DModel folder)", "sample_size 8 -> 16", "EMA starts from the weights",
                 "noise schedule from the --ddpm_* flags"],
        "hub": ["(DDPMPipeline on the Hub)", "noise schedule from its scheduler_config.json"],
        "checkpoint": ["(train_unconditional.py checkpoint)", "EMA from unet_ema/",
                       f"continuing at step {PRETRAIN_STEPS}"],
        "checkpoint_no_ema": ["(train_unconditional.py checkpoint)", "EMA starts from the weights",
                              f"--resume_step_from_pretrained continues at {PRETRAIN_STEPS}"],
    }[layout]
    assert all(part in line for part in expected + ["optimizer moments not carried over"]), line
    pipeline = load_in_diffusers(out)
    assert pipeline.unet.config.sample_size == 16
    assert pipeline.scheduler.config.num_train_timesteps == 100
    assert pipeline.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    start, final = unet_tensors(pretrained_sources["pipeline"] / "unet"), unet_tensors(out / "unet")
    assert any(not np.array_equal(start[k], final[k]) for k in start)  # it trained
    steps = sorted(os.listdir(out / "checkpoints"))  # the checkpoint-N run trained steps N+1 and N+2
    assert steps == [f"checkpoint_{PRETRAIN_STEPS + 2 if layout == 'checkpoint' else 2}"]
    if layout == "hub":
        assert {c[1] for c in calls} >= {"model_index.json", "scheduler_config.json", "config.json",
                                         "diffusion_pytorch_model.safetensors"}
        options = [(c[0], c[3]["revision"], c[3]["cache_dir"], c[3]["token"]) for c in calls]
        assert set(options) == {("someone/ddpm-tiny", "v1", str(tmp_path / "cache"), "hf_secret_for_the_test")}
        for folder, _, files in os.walk(out):  # the token reaches no log, config or checkpoint
            for name in files:
                with open(os.path.join(folder, name), "rb") as f:
                    assert b"hf_secret_for_the_test" not in f.read(), os.path.join(folder, name)


def test_accelerate_checkpoint_without_save_hook_loads_its_state_dict(pretrained_sources):
    """accelerate's bare `model.safetensors` (DDP's `module.` prefixes) with the run's UNet config."""
    from jax_uncond.run.loop import build_model

    unet_config = pretrained_sources["pipeline"] / "unet" / "config.json"
    config = parse_args(["--pretrained_model_name_or_path", str(pretrained_sources["checkpoint_bare"]),
                         "--resolution", "16", "--model_config_name_or_path", str(unet_config),
                         "--resume_step_from_pretrained"])
    config, source = pretrained.prepare(config, None, print)
    assert source.kind == "accelerate checkpoint without unet/" and source.step == PRETRAIN_STEPS
    start = pretrained.load(source, build_model(config), config)
    assert f"UNet config from {unet_config}" in start.line
    from jax_uncond.models import pytorch_io

    loaded = pytorch_io.state_dict_from_params(start.weights.params)
    expected = unet_tensors(pretrained_sources["pipeline"] / "unet")
    assert loaded.keys() == expected.keys() and int(start.weights.step) == PRETRAIN_STEPS
    for key in expected:
        np.testing.assert_array_equal(loaded[key], expected[key], err_msg=key)


def test_explicit_schedule_flags_override_the_pipeline_and_warn_when_they_differ(pretrained_sources):
    said = []
    config = parse_args(["--pretrained_model_name_or_path", str(pretrained_sources["pipeline"]), "--resolution", "16",
                         "--prediction_type", "v_prediction", "--ddpm_num_steps", "100"])
    config, source = pretrained.prepare(config, None, said.append)
    assert (config.ddpm_num_steps, config.ddpm_beta_schedule, config.prediction_type) == (
        100, "squaredcos_cap_v2", "v_prediction")  # the pipeline's beta schedule, the flags given
    assert said == ["warning: --prediction_type v_prediction differs from the pretrained scheduler's prediction_type "
                    "epsilon: the model was trained for that schedule"]
    assert "with --ddpm_num_steps, --prediction_type as given" in source.notes[-1]


def edited_unet(source, folder, edit_state_dict=None, edit_config=None):
    """A copy of the UNet folder `source` with its tensors or config changed."""
    from safetensors.numpy import save_file

    shutil.copytree(source, folder)
    if edit_state_dict is not None:
        tensors = unet_tensors(source)
        edit_state_dict(tensors)
        save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
    if edit_config is not None:
        config = json.loads((source / "config.json").read_text())
        edit_config(config)
        (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("case", ["other_model_class", "other_pipeline_class", "missing_tensor", "misshaped_tensor",
                                  "with_model_config", "step_without_checkpoint", "no_such_folder",
                                  "indivisible_resolution"])
def test_bad_source_is_one_line_and_exit_2(pretrained_sources, tmp_path, capsys, case):
    unet, folder = pretrained_sources["unet"], tmp_path / "source"
    flags = []
    expected = {"other_model_class": "describes a UNet2DConditionModel, not a UNet2DModel",
                "other_pipeline_class": "describes a StableDiffusionPipeline, not a DDPMPipeline",
                "missing_tensor": "missing (1): mid_block.attentions.0.to_k.bias",
                "misshaped_tensor": "wrong shape (1): conv_in.weight",
                "with_model_config": "drop --model_config_name_or_path",
                "step_without_checkpoint": "--resume_step_from_pretrained needs a checkpoint-N folder",
                "no_such_folder": "no such folder",
                "indivisible_resolution": "--resolution 15 does not fit the UNet"}[case]
    if case == "other_model_class":
        edited_unet(unet, folder, edit_config=lambda c: c.update(_class_name="UNet2DConditionModel"))
    elif case == "other_pipeline_class":
        shutil.copytree(pretrained_sources["pipeline"], folder)
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    elif case == "missing_tensor":
        edited_unet(unet, folder, edit_state_dict=lambda sd: sd.pop("mid_block.attentions.0.to_k.bias"))
    elif case == "misshaped_tensor":
        edited_unet(unet, folder, edit_state_dict=lambda sd: sd.update({"conv_in.weight": sd["conv_in.weight"][:, :2]}))
    elif case == "with_model_config":
        folder, flags = unet, ["--model_config_name_or_path", unet / "config.json"]
    elif case == "step_without_checkpoint":
        folder, flags = pretrained_sources["pipeline"], ["--resume_step_from_pretrained"]
    elif case == "no_such_folder":
        folder = tmp_path / "does-not-exist"
    else:
        folder, flags = pretrained_sources["pipeline"], ["--resolution", 15]  # halved once: needs a multiple of 2
    code, out, err = run_main(["--pretrained_model_name_or_path", folder, "--output_dir", tmp_path / "run", *RUN,
                               *flags], capsys)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, out + err
    assert lines[-1].startswith("train_flax.py: error:") and expected in lines[-1], err
    assert "Traceback" not in err and [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert "compiled" not in out  # stopped before compiling, and before writing (the run's lock is released):
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_a_bin_file_without_pytorch_is_one_line_and_exit_2(pretrained_sources, tmp_path):
    """PyTorch made unimportable in the subprocess (a sitecustomize shim), not uninstalled."""
    import torch

    folder = tmp_path / "bin-unet"
    folder.mkdir()
    shutil.copy(pretrained_sources["unet"] / "config.json", folder / "config.json")
    torch.save({k: torch.tensor(v) for k, v in unet_tensors(pretrained_sources["unet"]).items()},
               folder / "diffusion_pytorch_model.bin")
    shim = tmp_path / "no_torch"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text("import sys\n\nsys.modules['torch'] = None  # `import torch` fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p),
           "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_flax.py"), "--pretrained_model_name_or_path",
                           str(folder), "--output_dir", str(tmp_path / "run"), *RUN], env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert lines[-1].startswith("train_flax.py: error:") and "needs PyTorch" in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and "compiled" not in proc.stdout


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_and_does_not_reload_the_pretrained_weights(pretrained_sources, tmp_path):
    from test_engine_processes import assert_identical, finish, launch, load, worker

    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla_cache")}
    env.pop("XLA_FLAGS", None)
    pipeline = tmp_path / "pipeline"  # a copy, deleted before the resume
    shutil.copytree(pretrained_sources["pipeline"], pipeline)
    flags = ["--pretrained_model_name_or_path", pipeline, "--max_train_steps", 6, "--checkpointing_steps", 2]
    output = worker(env, 1, tmp_path / "reference.npz", "--output_dir", tmp_path / "reference", *flags)
    assert "start: fine-tuning from" in output, output
    code, output = finish(launch(env, 1, tmp_path / "unused.npz", "--output_dir", tmp_path / "out", *flags,
                                 "--signal_at", "kill:4:4"))
    assert code == -9, output
    shutil.rmtree(pipeline)
    output = worker(env, 1, tmp_path / "resumed.npz", "--output_dir", tmp_path / "out", *flags,
                    "--resume_from_checkpoint", "latest")
    assert "start: resuming from" in output and "at step 4" in output, output
    assert_identical(load(tmp_path / "resumed.npz"), load(tmp_path / "reference.npz"))


def test_parse_args_records_the_flags_given_on_the_command_line_or_in_the_preset(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("ddpm_beta_schedule: linear\nresolution: 32\n")
    config = parse_args(["--config", str(preset), "--prediction_type=epsilon", "--use_ema", "--ddpm_num_steps", "1000"])
    assert set(config.explicit_flags) == {"config", "ddpm_beta_schedule", "resolution", "prediction_type", "use_ema",
                                          "ddpm_num_steps"}  # values equal to the defaults count too
    assert parse_args([]).explicit_flags == ()
    with pytest.raises(SystemExit):
        parse_args(["--revision", "main"])  # applies to --pretrained_model_name_or_path only
