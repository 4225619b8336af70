"""Test-wide setup: 8 CPU devices for sharding tests and the project's XLA:CPU options, set before JAX is
first imported; subprocesses import the same jax_uncond as the tests (the installed wheel in CI, the
source tree in a clone)."""

import importlib.util
import logging
import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PACKAGE = importlib.util.find_spec("jax_uncond").submodule_search_locations[0]
"""The jax_uncond folder under test (found without importing it, so JAX starts after the flags above)."""
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(PACKAGE), os.environ.get("PYTHONPATH")) if p)


def _apply_project_xla_flags() -> None:
    """The project's XLA:CPU options (jax_uncond/xla_flags.py), as train_flax.py applies them, so the tests
    check what users run; loaded from its file, the package itself still unimported."""
    spec = importlib.util.spec_from_file_location("jax_uncond_xla_flags", os.path.join(PACKAGE, "xla_flags.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.apply()


_apply_project_xla_flags()


def pytest_report_header(config):
    return f"jax_uncond under test: {PACKAGE}"


@pytest.fixture(scope="session")
def pretrained_sources(tmp_path_factory):
    """Every layout of one small PyTorch run that --pretrained_model_name_or_path reads (finetune_parts.py),
    shared by the fine-tuning test files."""
    from finetune_parts import make_sources

    return make_sources(tmp_path_factory.mktemp("pretrained_sources"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """PyTorch's OpenMP threads crawl on a shared, oversubscribed CPU (1 s per tiny UNet call with 2)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def diffusers_warnings(caplog):
    """Capture diffusers' log records (its loggers do not propagate by default)."""
    import diffusers

    diffusers.utils.logging.enable_propagation()
    caplog.set_level(logging.WARNING)
    yield caplog
    diffusers.utils.logging.disable_propagation()
