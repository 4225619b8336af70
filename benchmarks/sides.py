"""The benchmarks' side processes: each runtime is measured in a process of its own (the two runtimes'
CPU thread pools slow each other down) and hands its figures back as one JSON line after a marker."""

from __future__ import annotations

import json
import subprocess

RESULT = "RESULT"


class SideFailed(RuntimeError):
    """A side process exited non-zero; the message holds its exit code and last lines of stderr."""


def report(figures: dict) -> None:
    """Print a side's figures for `run_side` to read (the side process's last act)."""
    print(RESULT, json.dumps(figures), flush=True)


def run(command: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> str:
    """Run one benchmark process; its stdout, or `SideFailed`."""
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode:
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise SideFailed(f"exit {done.returncode}: {tail}")
    return done.stdout


def run_side(command: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> dict:
    """Run one side process and return the figures it reported."""
    return json.loads(run(command, env, timeout).split(RESULT, 1)[1])
