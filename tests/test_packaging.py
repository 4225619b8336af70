"""The package as users install it: pyproject.toml's metadata, the console commands, the presets by name,
and (slow) the wheel: complete, installed into a fresh venv, training from a folder outside the clone."""

import os
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile

import pytest

import jax_uncond
from jax_uncond.training import config as cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {
    "jax-uncond-train": "jax_uncond.train:main",
    "jax-uncond-export": "jax_uncond.export:main",
    "jax-uncond-sample": "jax_uncond.sample:main",
    "jax-uncond-evaluate": "jax_uncond.evaluate:main",
    "jax-uncond-plan": "jax_uncond.plan:main",
    "jax-uncond-prepare": "jax_uncond.prepare:main",
}
"""Every console command and its entry point, as in pyproject.toml's [project.scripts]: a new command is a line
there and one here (its main needs only argparse's `--version`)."""


def pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def requirements(name):
    with open(os.path.join(ROOT, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith(("#", "-r "))]


def test_console_commands_are_declared():
    assert pyproject()["scripts"] == COMMANDS


@pytest.mark.parametrize("name", COMMANDS)
def test_command_version_and_help(name, capsys, monkeypatch):
    """Each entry point answers --version and --help (named as installed: argparse's prog is argv[0])."""
    module, function = COMMANDS[name].split(":")
    main = getattr(__import__(module, fromlist=[function]), function)
    monkeypatch.setattr(sys, "argv", [os.path.join("bin", name)])
    for flag in ("--version", "--help"):
        with pytest.raises(SystemExit) as info:
            main([flag])
        assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name} {jax_uncond.__version__}\nusage: {name} ")


def test_train_flax_py_is_the_same_command():
    """The clone's drop-in for train_unconditional.py runs jax_uncond.train under its own name."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_flax.py"), "--version"], capture_output=True,
                          text=True, check=True)
    assert proc.stdout == f"train_flax.py {jax_uncond.__version__}\n"


def test_requirements_files_repeat_pyproject():
    """requirements*.txt serve `pip install -r` in a clone; pyproject.toml is the source they must match."""
    project = pyproject()
    assert sorted(requirements("requirements.txt")) == sorted(project["dependencies"])
    assert sorted(requirements("requirements-test.txt")) == sorted(project["optional-dependencies"]["test"])


def test_presets_by_name_by_path_and_from_the_clone(monkeypatch):
    names = cfg.preset_names()
    assert {"quickstart", "flowers-64", "butterflies-128", "cifar10-32", "celebahq-256"} <= set(names)
    by_name = cfg.parse_args(["--config", "quickstart"])
    assert by_name.config == "quickstart" and by_name.resolution == 16
    assert cfg.parse_args(["--config", "quickstart.yaml"]) == by_name.__class__(
        **{**vars(by_name), "config": "quickstart.yaml"})
    monkeypatch.chdir(ROOT)  # the README's `python train_flax.py --config configs/quickstart.yaml`
    by_path = cfg.parse_args(["--config", "configs/quickstart.yaml"])
    assert by_path == by_name.__class__(**{**vars(by_name), "config": "configs/quickstart.yaml"})
    for name in names:  # the clone's configs/ is the package's presets
        with open(os.path.join(ROOT, "configs", f"{name}.yaml")) as f, open(cfg.preset_path(name)) as g:
            assert f.read() == g.read()


def test_unknown_preset_lists_the_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        cfg.parse_args(["--config", "configs/quickstart.yaml"])  # a path that is not there is not a name
    assert info.value.code == 2
    assert "configs/quickstart.yaml: no such file, nor a preset name (butterflies-128" in capsys.readouterr().err


def modules(root):
    """Every file of the jax_uncond package under root, as wheel paths (jax_uncond/...)."""
    found = set()
    for folder, dirs, files in os.walk(os.path.join(root, "jax_uncond")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found |= {os.path.relpath(os.path.join(folder, f), root).replace(os.sep, "/") for f in files
                  if f.endswith((".py", ".yaml"))}
    return found


@pytest.mark.slow
def test_wheel_holds_every_module_and_trains_from_a_fresh_venv(tmp_path):
    """pip wheel -> every module and preset inside -> a fresh venv with the runtime dependencies from the
    registry (no PyTorch) -> `jax-uncond-train --config quickstart` in a folder outside the clone -> the
    folder loads in diffusers, with its model card."""
    source = tmp_path / "source"  # a clean copy: no stale build/ may add or hide files
    shutil.copytree(os.path.join(ROOT, "jax_uncond"), source / "jax_uncond",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", tmp_path / "dist",
                    source], check=True)
    (wheel,) = (tmp_path / "dist").iterdir()
    assert wheel.name == f"jax_uncond-{jax_uncond.__version__}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as f:
        listed = {n for n in f.namelist() if n.startswith("jax_uncond/")}
        scripts = f.read(f"jax_uncond-{jax_uncond.__version__}.dist-info/entry_points.txt").decode()
    missing = modules(ROOT) - listed
    assert not missing, f"the wheel lacks {sorted(missing)}"
    assert all(f"{name} = {entry}" in scripts for name, entry in COMMANDS.items()), scripts

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}  # nothing of this one
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-compile", wheel], env=env, check=True)
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = subprocess.run([python, "-c", "import jax_uncond; print(jax_uncond.__file__)"], cwd=work, env=env,
                           capture_output=True, text=True)
    assert where.stdout.startswith(str(env_dir)), where.stdout + where.stderr
    proc = subprocess.run([env_dir / "bin" / "jax-uncond-train", "--config", "quickstart", "--max_train_steps", "4",
                           "--output_dir", "run", "--eval_batch_size", "4", "--ddpm_num_inference_steps", "2"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    from diffusers import DDPMPipeline, DiffusionPipeline
    from huggingface_hub import ModelCard

    assert isinstance(DiffusionPipeline.from_pretrained(work / "run"), DDPMPipeline)
    card = ModelCard.load(work / "run" / "README.md")
    assert card.data.library_name == "diffusers" and "![Samples](samples/epoch_0000.png)" in card.text
    assert (work / "run" / "samples" / "epoch_0000.png").is_file() and "- Steps: 4 optimizer steps" in card.text
