"""The CLI table: diffusers' flags accepted with their defaults, presets, clear errors."""

import dataclasses

import pytest

from jax_uncond.training import config as cfg

PYTORCH_DEFAULTS = {
    "dataset_name": None, "dataset_config_name": None, "train_data_dir": None, "cache_dir": None,
    "model_config_name_or_path": None, "output_dir": "ddpm-model-64", "overwrite_output_dir": False,
    "resolution": 64, "center_crop": False, "random_flip": False, "train_batch_size": 16, "eval_batch_size": 16,
    "dataloader_num_workers": 0, "num_epochs": 100, "save_images_epochs": 10, "save_model_epochs": 10,
    "gradient_accumulation_steps": 1, "learning_rate": 1e-4, "lr_scheduler": "cosine", "lr_warmup_steps": 500,
    "adam_beta1": 0.95, "adam_beta2": 0.999, "adam_weight_decay": 1e-6, "adam_epsilon": 1e-8, "use_ema": False,
    "ema_inv_gamma": 1.0, "ema_power": 0.75, "ema_max_decay": 0.9999, "push_to_hub": False, "hub_token": None,
    "hub_model_id": None, "hub_private_repo": False, "logger": "tensorboard", "logging_dir": "logs",
    "local_rank": -1, "mixed_precision": "no", "prediction_type": "epsilon", "ddpm_num_steps": 1000,
    "ddpm_num_inference_steps": 1000, "ddpm_beta_schedule": "linear", "checkpointing_steps": 500,
    "checkpoints_total_limit": None, "resume_from_checkpoint": None,
    "enable_xformers_memory_efficient_attention": False, "preserve_input_precision": False,
}


def test_pytorch_defaults():
    config = cfg.parse_args([])
    for key, value in PYTORCH_DEFAULTS.items():
        assert getattr(config, key) == value, key
    assert {f.name for f in cfg.FLAGS if f.pytorch} == set(PYTORCH_DEFAULTS)


def test_every_pytorch_flag_parses():
    argv = ["--dataset_name", "x", "--dataset_config_name", "c", "--cache_dir", "/c", "--model_config_name_or_path",
            "m", "--output_dir", "o", "--overwrite_output_dir", "--resolution", "32", "--center_crop",
            "--random_flip", "--train_batch_size", "2", "--eval_batch_size", "4", "--dataloader_num_workers", "1",
            "--num_epochs", "3", "--save_images_epochs", "1", "--save_model_epochs", "1",
            "--gradient_accumulation_steps", "2", "--learning_rate", "2e-4", "--lr_scheduler", "linear",
            "--lr_warmup_steps", "5", "--adam_beta1", "0.9", "--adam_beta2", "0.99", "--adam_weight_decay", "0.01",
            "--adam_epsilon", "1e-6", "--use_ema", "--ema_inv_gamma", "2", "--ema_power", "0.5", "--ema_max_decay",
            "0.99", "--push_to_hub", "--hub_token", "secret", "--hub_model_id", "me/m", "--hub_private_repo",
            "--logger", "tensorboard", "--logging_dir", "l", "--local_rank", "0", "--mixed_precision", "bf16",
            "--prediction_type", "sample", "--ddpm_num_steps", "100", "--ddpm_num_inference_steps", "10",
            "--ddpm_beta_schedule", "squaredcos_cap_v2", "--checkpointing_steps", "7",
            "--checkpoints_total_limit", "2", "--resume_from_checkpoint", "latest",
            "--enable_xformers_memory_efficient_attention", "--preserve_input_precision"]
    config = cfg.parse_args(argv)
    assert config.resolution == 32 and config.use_ema and config.ddpm_beta_schedule == "squaredcos_cap_v2"
    assert "hub_token" not in cfg.to_dict(config)


def test_unknown_flag_suggests(capsys):
    with pytest.raises(SystemExit) as e:
        cfg.parse_args(["--learning_rat", "1"])
    assert e.value.code == 2
    assert "did you mean --learning_rate" in capsys.readouterr().err


def test_preset_then_flags_override(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("resolution: 32\nlearning_rate: 2.0e-4\nunet:\n  block_out_channels: [32, 64]\n")
    config = cfg.parse_args(["--config", str(preset), "--resolution", "16"])
    assert config.resolution == 16 and config.learning_rate == 2e-4
    assert config.unet == {"block_out_channels": [32, 64]}
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.resolution = 8


@pytest.mark.parametrize("text, message", [
    ("resolutoin: 32\n", "did you mean resolution"),
    ("hub_token: abc\n", "secrets"),
])
def test_bad_preset(tmp_path, capsys, text, message):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(SystemExit) as e:
        cfg.parse_args(["--config", str(preset)])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--resolution", "0"], ["--dataset_name", "a", "--train_data_dir", "b"],
                                  ["--lr_scheduler", "nope"], ["--mixed_precision", "fp8"], ["--logging_steps", "0"],
                                  ["--profile_steps", "5:2"], ["--profile_steps", "10"], ["--profile_steps", "a:b"],
                                  ["--rollback"], ["--rollback", "--resume_from_checkpoint", "latest"]])
def test_bad_values_exit_2(argv):
    with pytest.raises(SystemExit) as e:
        cfg.parse_args(argv)
    assert e.value.code == 2
