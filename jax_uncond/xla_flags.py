"""The project's XLA:CPU options: added to `XLA_FLAGS` before the JAX backend starts.

`apply()` is called by every command (`train_flax.py` / `jax-uncond-train`, `-sample`, `-export`,
`-evaluate`) and the benchmarks
(importing `jax_uncond` as a library changes nothing). Each option was measured by
`benchmarks/bench_xla_flags.py` and checked by the parity tests (docs/benchmarks.md has the figures).
A flag the user already sets in `XLA_FLAGS` wins; `JAX_UNCOND_XLA_FLAGS=0` adds none. The options
only concern XLA's CPU backend, so GPU and TPU programs are unchanged.
"""

from __future__ import annotations

import os

CPU_FLAGS: dict[str, str] = {
    # XLA:CPU's copy insertion orders buffers by data dependence alone unless asked for its region
    # analysis; without it the donated train state is copied every step (params and both Adam
    # moments: three extra passes over the weights), because the EMA and the metrics read them too.
    "xla_cpu_copy_insertion_use_region_analysis": "true",
    # YNNPACK (XLA's default CPU kernels for products, reductions and convolutions) runs a convolution
    # on one thread; Eigen's splits it over the cores (as fast on one core, 1.8x on two). Products and
    # reductions stay with YNNPACK, the fastest there.
    "xla_cpu_experimental_ynn_fusion_type": "-individual_convolution",
}
"""Flag name (without the leading --) -> value."""

OPT_OUT = "JAX_UNCOND_XLA_FLAGS"


def merged(existing: str, flags: dict[str, str] = CPU_FLAGS) -> str:
    """`existing` (an XLA_FLAGS string) plus every flag of `flags` it does not set itself."""
    present = {part.lstrip("-").split("=", 1)[0] for part in existing.split()}
    added = [f"--{name}={value}" for name, value in flags.items() if name not in present]
    return " ".join([existing.strip(), *added]).strip()


def apply() -> None:
    """Add the project's flags to `XLA_FLAGS` (call before the first JAX computation)."""
    if os.environ.get(OPT_OUT, "1") == "0":
        return
    os.environ["XLA_FLAGS"] = merged(os.environ.get("XLA_FLAGS", ""))
