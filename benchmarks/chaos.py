"""Chaos on several processes: SIGKILL one or all of them at random moments, restart them all with
`--resume_from_checkpoint latest`, again and again, then compare the finished run's export with an
uninterrupted run's, bit for bit.

    python benchmarks/chaos.py --kills 50 --processes 2     # the long soak (docs/reliability.md)
    python benchmarks/chaos.py --kills 8 --seed 1           # about what CI runs (tests/test_reliability_pods.py)

Each round starts every process (the tiny UNet on the built-in 8x8 images, one CPU device each, jax.distributed
on localhost) and kills one or all of them (all with probability 1/2) at a moment of one of three kinds:
during start-up (once they have joined), during training, or inside a checkpoint save (while Orbax's
temporary folder exists). The
first round kills inside a save. The processes not killed must stop by themselves within STOP_BOUND_S:
process 0 with one line and exit code 1 when another is lost; the others at once when process 0 is (JAX
aborts them from native code). Prints one line per round, then the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the export in this process; the runs set their own
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from jax_uncond.run import checkpoint as ckpt  # noqa: E402
from jax_uncond.run import run_lock  # noqa: E402
from run_parts import TINY_UNET, Processes, assert_bitwise_equal, environment, exported, tiny_flags  # noqa: E402

STOP_BOUND_S = 120.0
"""How long the processes not killed may take to stop by themselves."""
MOMENTS = ("start-up", "training", "save")
TMP_MARK = ".orbax-checkpoint-tmp"


def _checkpoints(output_dir: Path) -> tuple[set[int], set[tuple[str, int]]]:
    """(complete checkpoint steps, Orbax's temporary folders by name and inode: saves in progress, or killed ones,
    which a new save of that step makes anew) in the checkpoints folder."""
    directory = Path(ckpt.checkpoints_dir(output_dir))
    names = os.listdir(directory) if directory.is_dir() else []
    steps = {int(n.split("_")[1]) for n in names if n.startswith(ckpt.STEP_PREFIX + "_") and n.split("_")[1].isdigit()}
    saves = set()
    for name in (n for n in names if TMP_MARK in n):
        with contextlib.suppress(FileNotFoundError):
            saves.add((name, (directory / name).stat().st_ino))
    return steps, saves


def _joined(run: Processes, output_dir: Path) -> bool:
    """Whether the processes have joined: process 0 holds the output folder's lock (it takes it once all are in)."""
    try:
        return json.loads((output_dir / run_lock.LOCK_NAME).read_text()).get("pid") == run.processes[0].pid
    except (OSError, ValueError):
        return False


def _await_moment(run: Processes, moment: str, output_dir: Path, rng: random.Random) -> bool:
    """Waits for a moment of kind `moment`; False if every process ended first (the run finished). Start-up
    moments come once the processes have joined: a process 0 killed before the others joined leaves them
    waiting for it for JAX's initialization timeout (a limit, docs/reliability.md)."""
    steps_before, saves_before = _checkpoints(output_dir)  # a killed save's folder stays: only new ones count
    delay, joined_at = rng.uniform(0.0, 4.0), None
    while any(p.poll() is None for p in run.processes):
        steps, saves = _checkpoints(output_dir)
        if moment == "save" and saves - saves_before:
            return True
        if moment == "start-up":
            joined_at = joined_at or (time.monotonic() if _joined(run, output_dir) else None)
            if joined_at and time.monotonic() > joined_at + delay:
                return True
        if moment == "training" and steps - steps_before:
            time.sleep(rng.uniform(0.0, 1.5))
            return True
        time.sleep(0.005 if moment == "save" else 0.05)
    return False


def one_round(env: dict[str, str], flags: list[str], output_dir: Path, logs: Path, processes: int,
              rng: random.Random, moment: str, victims: list[int]) -> dict:
    """Starts the processes, kills `victims` at a `moment`, waits for the rest to stop; what happened."""
    run = Processes(env, logs, flags, processes)
    if not _await_moment(run, moment, output_dir, rng):
        return {"finished": True, "codes": run.wait(timeout=1)}
    run.kill(victims)
    killed = time.monotonic()
    try:
        codes = run.wait(timeout=STOP_BOUND_S)
        hung = False
    except subprocess.TimeoutExpired:
        run.kill()
        codes, hung = run.wait(timeout=30), True
    survivors = [i for i in range(processes) if i not in victims]
    return {"moment": moment, "victims": victims, "codes": codes, "hung": hung, "stop_s": time.monotonic() - killed,
            "lines": {i: run.error_lines(i) for i in survivors}}


def chaos(workdir: Path, kills: int, processes: int = 2, seed: int = 0, steps: int = 30, every: int = 3,
          reference: dict | None = None, first_victims: list[int] | None = None, say=print) -> tuple[dict, list[dict]]:
    """Rounds of kills until `kills` processes were killed (the first inside a save, of `first_victims` when
    given), then one run to the end, its export compared with `reference` (else with an uninterrupted run's).
    Returns the figures and what happened in each round."""
    rng = random.Random(seed)
    (workdir / "unet.json").write_text(TINY_UNET)
    env = environment(workdir / "xla_cache")
    started = time.monotonic()
    if reference is None:
        uninterrupted = Processes(env, workdir / "logs" / "reference", tiny_flags(workdir / "reference", workdir /
                                                                                  "unet.json", steps, every), processes)
        assert uninterrupted.wait(timeout=1800) == [0] * processes, uninterrupted.stderr(0)
        reference = exported(workdir / "reference", workdir / "reference_export")
    output_dir = workdir / "run"
    flags = [*tiny_flags(output_dir, workdir / "unet.json", steps, every), "--resume_from_checkpoint", "latest"]
    rounds: list[dict] = []
    killed = 0
    while killed < kills:
        moment = "save" if not rounds else rng.choice(MOMENTS)
        victims = sorted(rng.sample(range(processes), 1)) if rng.random() < 0.5 else list(range(processes))
        if not rounds and first_victims is not None:
            victims = first_victims
        result = one_round(env, flags, output_dir, workdir / "logs" / f"round{len(rounds)}", processes, rng, moment,
                           victims)
        if result.get("finished"):
            say(f"round {len(rounds)}: the run finished before the kill (raise --steps)")
            break
        rounds.append(result)
        killed += len(result["victims"])
        say(f"round {len(rounds) - 1}: killed {result['victims']} during {moment}; exit codes {result['codes']}, all "
            f"stopped {result['stop_s']:.1f}s after the kill" + (" (HUNG: killed)" if result["hung"] else "")
            + "".join(f"; process {i}: {lines[-1][:160]}" for i, lines in result["lines"].items() if lines))
    final = Processes(env, workdir / "logs" / "final", flags, processes)
    codes = final.wait(timeout=1800)
    identical = codes == [0] * processes
    if identical:
        try:
            assert_bitwise_equal(exported(output_dir, workdir / "export"), reference)
        except AssertionError:
            identical = False
    alone = [r["stop_s"] for r in rounds if r["victims"] != list(range(processes))]
    figures = {
        "kills": killed, "rounds": len(rounds), "restarts": len(rounds) + 1,
        "kills_in_save": sum(len(r["victims"]) for r in rounds if r["moment"] == "save"),
        "rounds_by_moment": {m: sum(r["moment"] == m for r in rounds) for m in MOMENTS},
        "kills_of_process": {str(p): sum(p in r["victims"] for r in rounds) for p in range(processes)},
        "hung": sum(r["hung"] for r in rounds),
        "survivor_stop_s": ({"min": min(alone), "median": statistics.median(alone), "max": max(alone)}
                            if alone else None),
        "survivor_exit_codes": sorted({c for r in rounds for i, c in enumerate(r["codes"]) if i not in r["victims"]}),
        "final_exit_codes": codes, "bit_identical": identical, "seconds": time.monotonic() - started,
    }
    return figures, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=50, help="processes to kill in all (default 50)")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 4 per kill, at least 30)")
    parser.add_argument("--every", type=int, default=3, help="--checkpointing_steps (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="kept when given (default: a temporary folder)")
    args = parser.parse_args()
    steps = args.steps or max(30, 4 * args.kills)
    with tempfile.TemporaryDirectory() as temporary:
        workdir = args.workdir or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        figures, _ = chaos(workdir, args.kills, args.processes, args.seed, steps, args.every)
    print(json.dumps({"processes": args.processes, "seed": args.seed, "steps": steps, **figures}, indent=2))


if __name__ == "__main__":
    main()
