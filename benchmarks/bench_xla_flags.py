"""XLA:CPU backend options on the training step: images/s of `bench_train.py`'s JAX side under each.

Each variant runs in its own process (XLA reads `XLA_FLAGS` once, when the backend starts), the
variants interleaved round by round (A B C A B C ...) so that load from other work spreads over all
of them; the median round counts. Every variant adds its flags to the project's (`jax_uncond.xla_flags`)
but "XLA default", which sets none (`JAX_UNCOND_XLA_FLAGS=0`). Numbers of each variant are checked by
the parity tests, not here.

    python benchmarks/bench_xla_flags.py [--rounds 3] [--variants "XLA default" "no YNNPACK"]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from sides import SideFailed, run_side

HERE = os.path.dirname(os.path.abspath(__file__))
NO_YNN = "--xla_cpu_experimental_ynn_fusion_type=-dot,-reduce,-individual_dot,-individual_convolution"
XLA_DEFAULT = "XLA default"
VARIANTS = {
    "project default": "",
    XLA_DEFAULT: "",
    "no YNNPACK": NO_YNN,
    "YNNPACK convolutions": "--xla_cpu_experimental_ynn_fusion_type=+individual_convolution",
    "YNNPACK + eltwise": "--xla_cpu_experimental_ynn_fusion_type=+eltwise",
    "XNNPACK": NO_YNN + " --xla_cpu_use_xnnpack=true",
    "XNNPACK graph fusion": NO_YNN + " --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "oneDNN": NO_YNN + " --xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "oneDNN fusions": NO_YNN + " --xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "single-threaded Eigen": "--xla_cpu_multi_thread_eigen=false",
}
"""Name -> XLA flags added to the project's (jax_uncond.xla_flags), except XLA_DEFAULT: no flags at all."""


def run_variant(name: str, preset: str, steps: int, cpus: str | None) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=VARIANTS[name])
    if name == XLA_DEFAULT:
        env["JAX_UNCOND_XLA_FLAGS"] = "0"
    command = [sys.executable, os.path.join(HERE, "bench_train.py"), "--preset", preset, "--steps", str(steps),
               "--rounds", "2", "--side", "jax"] + (["--cpus", cpus] if cpus else [])
    try:
        return run_side(command, env=env)
    except SideFailed as e:
        return {"error": str(e)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--cpus", help="pin each run to these CPUs, e.g. 0")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {name: [] for name in args.variants}
    for _ in range(args.rounds):
        for name in args.variants:
            results[name].append(run_variant(name, args.preset, args.steps, args.cpus))
    print(f"preset {args.preset}, {args.steps} steps per round, {args.rounds} interleaved rounds"
          + (f", CPUs {args.cpus}" if args.cpus else "") + "; images/s (median)")
    reference = None
    for name, rounds in results.items():
        ok = [r for r in rounds if "images_per_s" in r]
        if not ok:
            print(f"{name:<24} failed: {rounds[0].get('error')}")
            continue
        rate = statistics.median(r["images_per_s"] for r in ok)
        cpu = statistics.median(r["cpu_ms_per_image"] for r in ok)
        reference = reference or rate
        print(f"{name:<24} {rate:7.1f} images/s ({rate / reference:.2f}x)  {cpu:6.1f} CPU-ms/image  "
              f"compile {statistics.median(r['compile_s'] for r in ok):5.1f}s   "
              f"{'(none)' if name == XLA_DEFAULT else ('project flags ' + VARIANTS[name]).strip()}")


if __name__ == "__main__":
    main()
