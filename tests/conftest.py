"""Test-wide setup: 8 CPU devices for sharding tests, set before JAX is first imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import logging  # noqa: E402

import pytest  # noqa: E402


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
