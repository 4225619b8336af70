"""The project's XLA:CPU options: added to XLA_FLAGS, never over a flag the user sets."""

import os

from jax_uncond import xla_flags


def test_flags_are_added_and_a_users_own_setting_wins(monkeypatch):
    added = xla_flags.merged("")
    assert added.split() == [f"--{name}={value}" for name, value in xla_flags.CPU_FLAGS.items()]
    for name, value in xla_flags.CPU_FLAGS.items():
        users = xla_flags.merged(f"--{name}=mine")
        assert users.startswith(f"--{name}=mine") and f"--{name}={value}" not in users
    assert xla_flags.merged("--xla_force_host_platform_device_count=8").startswith(
        "--xla_force_host_platform_device_count=8 --")
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    monkeypatch.setenv(xla_flags.OPT_OUT, "0")
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
    monkeypatch.delenv(xla_flags.OPT_OUT)
    xla_flags.apply()
    assert os.environ["XLA_FLAGS"] == xla_flags.merged("--xla_dump_to=/tmp/x")


def test_the_test_session_runs_with_them_and_eight_devices():
    """conftest.py applies them as train_flax.py does, after its own device count."""
    flags = os.environ["XLA_FLAGS"]
    assert "--xla_force_host_platform_device_count=8" in flags
    assert all(f"--{name}=" in flags for name in xla_flags.CPU_FLAGS)
