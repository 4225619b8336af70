"""Test-wide setup: 8 CPU devices for sharding tests, set before JAX is first imported, and the
project's XLA:CPU options (jax_uncond/xla_flags.py), so the tests check what users run."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from jax_uncond import xla_flags  # noqa: E402

xla_flags.apply()
