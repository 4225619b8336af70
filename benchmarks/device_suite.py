"""The accelerator suite: training, sampling and data-loader benchmarks in one run, written to
`benchmarks/results/<device>.json` and `<device>.md`. Run it through `device_suite.sh`, which installs
what it needs on a bare machine; `--dry-run` runs every part with tiny sizes on a CPU.

Parts, in order (each in its own processes; a part that fails is recorded and the suite goes on):
  sampling   DDIM 50 steps and DDPM 1000 steps, JAX vs diffusers' loop, batch 64, bf16
  data       the data loader at 64x64 with as many workers as CPUs, beside PyTorch's DataLoader
  train      the seed example's 64x64 UNet in bf16 at global batch 64: JAX (cold compile, persistent
             cache empty) and PyTorch images/s and JAX's MFU; the JAX step again with the cache filled
             (cached compile time); then the largest batch that fits, from XLA's memory analysis of
             the batch-64 step (per-image temporaries, fixed state), on both sides, one timed round
  profile    the JAX step's time by category on the device (`profile_train.py`, cache hit)
Each part may use what the parts before it left and keeps `reserve_s` for each part after it: on an
H200 the two cold compiles of the train part take 90-115 s each, and the train part, first and
unchecked, once left sampling and data no time.
`--parts` runs some of them (e.g. `--parts sampling data` to redo those).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import sides
from sides import SideFailed, run_side

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

REAL = {"preset": "seed64", "precision": "bf16", "batch": 64, "train_steps": 20, "rounds": 3, "max_batch_cap": 1024,
        "sampling": ["--preset", "seed64", "--batch_size", "64", "--precision", "bf16", "--repeats", "1"],
        "samplers": (("ddim", 50), ("ddpm", 1000)),
        "data": ["--images", "512", "--batch_size", "64", "--batches", "24"], "budget_s": 480,
        "reserve_s": {"sampling": 110, "data": 40, "train": 290, "profile": 35}}
DRY = {"preset": "cpu", "precision": "fp32", "batch": 16, "train_steps": 2, "rounds": 1, "max_batch_cap": 32,
       "sampling": ["--preset", "cpu", "--batch_size", "2", "--repeats", "1"], "samplers": (("ddim", 2), ("ddpm", 3)),
       "data": ["--images", "24", "--batch_size", "4", "--batches", "2"], "budget_s": 900,
       "reserve_s": {}}
PARTS = ("sampling", "data", "train", "profile")
DRY_MEMORY_LIMIT = 2**30
"""On a CPU there is no device memory limit; the dry run sizes its "largest batch" against 1 GiB."""


class Suite:
    """Runs the parts within a time budget and collects their results."""

    def __init__(self, sizes: dict, env: dict[str, str]):
        self.sizes, self.env = sizes, env
        self.deadline = self.part_deadline = time.monotonic() + sizes["budget_s"]
        self.results: dict[str, object] = {}

    def run(self, script: str, *args: str, side: bool = False, extra_env: dict | None = None) -> dict:
        """One benchmark process; its figures (the RESULT line with `side`, else its --json file)."""
        left = self.part_deadline - time.monotonic()
        if left < 10:
            raise TimeoutError("out of the suite's time budget")
        command, env = [sys.executable, os.path.join(HERE, script), *args], {**self.env, **(extra_env or {})}
        try:
            if side:
                return run_side(command, env=env, timeout=left)
            with tempfile.NamedTemporaryFile(suffix=".json") as out:
                sides.run(command + ["--json", out.name], env=env, timeout=left)
                with open(out.name) as f:
                    return json.load(f)
        except SideFailed as e:
            raise RuntimeError(f"{script} {e}") from None

    def part(self, name: str, fn, parts: list[str]) -> None:
        """Run part `name` (if chosen), leaving the budget the chosen parts after it reserve."""
        if name not in parts:
            return
        later = parts[parts.index(name) + 1:]
        self.part_deadline = self.deadline - sum(self.sizes["reserve_s"].get(p, 0) for p in later)
        start = time.monotonic()
        try:
            self.results[name] = fn()
        except (RuntimeError, TimeoutError, subprocess.TimeoutExpired, ValueError, KeyError) as e:
            self.results[name] = {"error": f"{type(e).__name__}: {e}"}
        print(f"{name}: {time.monotonic() - start:.0f}s" + (f" ({self.results[name]['error']})"
                                                          if "error" in self.results[name] else ""), flush=True)


def largest_batch(memory: dict, batch: int, cap: int, multiple: int) -> int:
    """The largest global batch whose step fits in 90% of the device memory: the state (arguments and
    outputs not aliased) is fixed, the temporaries grow with the batch."""
    limit = memory.get("device_limit") or DRY_MEMORY_LIMIT
    fixed = memory["argument"] + memory["output"] - (memory.get("alias") or 0)
    per_image = memory["temp"] / batch
    fits = int((0.9 * limit - fixed) / per_image) if per_image > 0 else cap
    return max(multiple, min(cap, fits) // multiple * multiple)


def train_part(suite: Suite, cache_dir: str, multiple: int) -> dict:
    sizes = suite.sizes
    common = ["--preset", sizes["preset"], "--steps", str(sizes["train_steps"]), "--rounds", str(sizes["rounds"])]
    out: dict = {}
    for label, batch in (("batch", sizes["batch"]), ("largest_batch", None)):
        if batch is None:
            batch = largest_batch(out["batch"]["jax"]["memory"], sizes["batch"], sizes["max_batch_cap"], multiple)
            common[-1] = "1"  # one timed round: each step is long, and the compile is cold again
        row: dict = {"batch": batch}
        for side in ("jax", "torch"):
            try:
                row[side] = suite.run("bench_train.py", *common, "--batch", str(batch), "--side", side,
                                      *(["--cache_dir", cache_dir] if side == "jax" else []), side=True)
            except RuntimeError as e:  # e.g. PyTorch out of memory at JAX's largest batch
                row[side] = {"error": str(e)}
        if label == "batch":  # the same program again: the persistent cache has it now
            row["jax_cached_compile_s"] = suite.run("bench_train.py", *common, "--batch", str(batch), "--steps", "2",
                                                    "--rounds", "1", "--side", "jax", "--cache_dir", cache_dir,
                                                    side=True)["compile_s"]
        out[label] = row
    return out


def device_kind(env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", "import jax; d = jax.devices()[0]; print(d.platform, d.device_kind, "
                           "jax.device_count(), jax.__version__, sep='|')"], env=env, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip().splitlines()[-1]


def markdown(report: dict) -> str:
    """The results as a markdown table (one row per measurement, JAX beside PyTorch)."""
    lines = [f"# {report['device']} ({report['device_count']} device(s)), {report['date']}", "",
             f"JAX {report['jax']}; {report['python']}; `{report['command']}`" + (" (dry run: tiny sizes)"
                                                                                  if report["dry_run"] else ""), "",
             "| measurement | JAX | PyTorch | JAX / PyTorch | notes |", "|---|---|---|---|---|"]

    def rate(side: dict) -> str:
        return f"{side['images_per_s']:.1f} img/s" if "images_per_s" in side else side.get("error", "-")[:60]

    train = report["parts"].get("train", {})
    for label in ("batch", "largest_batch"):
        row = train.get(label)
        if not isinstance(row, dict) or "jax" not in row:
            continue
        jax_side, torch_side = row["jax"], row["torch"]
        ratio = (f"{jax_side['images_per_s'] / torch_side['images_per_s']:.2f}x"
                 if "images_per_s" in jax_side and "images_per_s" in torch_side else "-")
        notes = []
        if "mfu" in jax_side:
            notes.append(f"MFU {100 * jax_side['mfu']:.1f}%")
        if "compile_s" in jax_side:
            notes.append(f"compile {jax_side['compile_s']:.1f}s cold" + (
                f", {row['jax_cached_compile_s']:.1f}s cached" if "jax_cached_compile_s" in row else ""))
        lines.append(f"| train {report['preset']}, {report['precision']}, batch {row['batch']}"
                     f"{' (largest that fits)' if label == 'largest_batch' else ''} | {rate(jax_side)} | "
                     f"{rate(torch_side)} | {ratio} | {'; '.join(notes)} |")
    sampling = report["parts"].get("sampling")
    for run in sampling if isinstance(sampling, list) else []:
        for name, ours in run["jax"].items():
            if name == "where":
                continue
            theirs = run["torch"][name]["images_per_s"]
            lines.append(f"| sampling {name.upper()} {run['steps']} steps, batch {run['batch']} | "
                         f"{ours['images_per_s']:.2f} img/s | {theirs:.2f} img/s | {ours['images_per_s'] / theirs:.2f}x | "
                         f"compile {ours['compile_s']:.1f}s |")
    for row in report["parts"].get("data", {}).get("rows", []):
        ours, theirs = row["jax_images_per_s"], row["torch_images_per_s"]
        lines.append(f"| data loader {row['resolution']}x{row['resolution']}, {row['workers']} workers | "
                     f"{ours:.0f} img/s | {'-' if theirs is None else f'{theirs:.0f} img/s'} | "
                     f"{'-' if theirs is None else f'{ours / theirs:.2f}x'} | |")
    profile = report["parts"].get("profile", {})
    if "ms" in profile:
        lines += ["", "JAX step by category (ms per step): " + ", ".join(
            f"{k} {v:.2f}" for k, v in profile["ms"].items() if v >= 0.005) + f"; step {profile['step_ms']:.2f} ms"]
    errors = {name: part["error"] for name, part in report["parts"].items() if isinstance(part, dict) and "error" in part}
    lines += [""] + [f"- {name} failed: {error}" for name, error in errors.items()]
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, any device (a CPU check of the suite)")
    parser.add_argument("--out", help=f"folder for the JSON and markdown results (default: {RESULTS}; for a dry "
                                       "run a temporary folder)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="run only these parts")
    parser.add_argument("--budget_s", type=int, help="seconds for the whole suite (default: 480; a dry run 900)")
    args = parser.parse_args()
    out_dir = args.out or (tempfile.mkdtemp(prefix="device_suite_") if args.dry_run else RESULTS)
    sizes = dict(DRY if args.dry_run else REAL, **({"budget_s": args.budget_s} if args.budget_s else {}))
    env = dict(os.environ)
    cache_dir = tempfile.mkdtemp(prefix="device_suite_xla_cache_")
    platform_name, kind, count, jax_version = device_kind(env).split("|")
    suite = Suite(sizes, env)
    start = time.monotonic()
    parts = [p for p in PARTS if p in args.parts]
    suite.part("sampling", lambda: [suite.run("bench_sampling.py", *sizes["sampling"], "--samplers", name,
                                              "--steps", str(steps)) for name, steps in sizes["samplers"]], parts)
    suite.part("data", lambda: suite.run("bench_data.py", *sizes["data"], "--resolutions", "64", "--workers",
                                         str(os.cpu_count() or 1), "--no_step"), parts)
    suite.part("train", lambda: train_part(suite, cache_dir, multiple=int(count)), parts)
    suite.part("profile", lambda: suite.run("profile_train.py", "--preset", sizes["preset"], "--steps", "3",
                                            "--no_torch", extra_env={"JAX_COMPILATION_CACHE_DIR": cache_dir})["jax"],
               parts)
    report = {"device": kind, "platform": platform_name, "device_count": int(count), "jax": jax_version,
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run,
              "preset": sizes["preset"], "precision": sizes["precision"], "command": " ".join(["benchmarks/device_suite.sh", *sys.argv[1:]]),
              "seconds": round(time.monotonic() - start), "parts": suite.results}
    name = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") + ("-dry-run" if args.dry_run else "")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(markdown(report))
    print(f"suite done in {report['seconds']}s: {os.path.join(out_dir, name)}.json and .md")


if __name__ == "__main__":
    main()
