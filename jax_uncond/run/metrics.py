"""Throughput figures: images/s, steps/s, and model FLOPs utilisation against the device's peak."""

from __future__ import annotations

import dataclasses
import os

import jax

GPU_PEAK_FLOPS = {
    # dense bf16 peak per device (vendor figures), matched within the device kind ("NVIDIA H100 80GB HBM3");
    # float32 runs are measured against the same figure
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12, "V100": 125e12,
}


@dataclasses.dataclass(frozen=True)
class TpuSpec:
    """One JAX device of a TPU generation: its Cloud name, dense bf16 peak and HBM (published per-chip figures;
    a v3 chip is two devices, one per core; v4 and v5p chips are one, their two cores joined as megacore)."""

    name: str
    peak_flops: float
    hbm_bytes: int


TPU_SPECS = {
    # exact `device_kind` -> spec (Cloud TPU system architecture pages: peak bf16 compute and HBM per chip)
    "TPU v3": TpuSpec("v3", 123e12 / 2, 16 * 2**30),
    "TPU v4": TpuSpec("v4", 275e12, 32 * 2**30),
    "TPU v5 lite": TpuSpec("v5e", 197e12, 16 * 2**30),
    "TPU v5": TpuSpec("v5p", 459e12, 95 * 2**30),
    "TPU v6 lite": TpuSpec("v6e", 918e12, 32 * 2**30),
}


def device_peak_flops(device: jax.Device) -> float | None:
    """The known bf16 peak FLOP/s of one device, or None (CPUs and unknown accelerators)."""
    kind = device.device_kind
    if kind in TPU_SPECS:
        return TPU_SPECS[kind].peak_flops
    return next((peak for name, peak in GPU_PEAK_FLOPS.items() if name.lower() in kind.lower()), None)


def step_flops(lowered: jax.stages.Lowered, devices: int, accumulation_steps: int = 1) -> float | None:
    """FLOPs one device spends in one call of an SPMD step: XLA's cost analysis of the whole program
    as lowered, split evenly over the `devices`.

    The lowered program, not the compiled one: a GPU backend turns convolutions and matrix products
    into cuDNN/cuBLAS calls that the analysis of the compiled program counts as no FLOPs (it gave an
    MFU of 0.3% on an H200). XLA counts a loop body once, so the micro-batch scan of gradient
    accumulation is scaled by its trip count (which also scales the small optimizer update: an
    overestimate of well under 1%).
    """
    flops = lowered_flops(lowered)
    return None if flops is None else flops * accumulation_steps / devices


def lowered_flops(lowered: jax.stages.Lowered) -> float | None:
    """XLA's FLOP count of a lowered (not yet partitioned) program, or None where no analysis is available.

    Backends behind PJRT's C API (TPUs through libtpu, also for a topology compiled from another machine)
    offer no analysis of a lowered program; the same HLO module is then analysed by the CPU client, which
    counts convolutions and products alike on every platform (the analysis is of the HLO, not of a device).
    """
    analysis = lowered.cost_analysis()
    if analysis is None:
        from jax._src.lib import _jax  # the analysis `Lowered.cost_analysis` calls, with another client

        analysis = _jax.hlo_module_cost_analysis(jax.local_devices(backend="cpu")[0].client,
                                                 lowered.compiler_ir("hlo").as_hlo_module())
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


class Throughput:
    """Images/s, steps/s and MFU (per-device FLOPs/s over the device's peak) for a window of steps."""

    def __init__(self, images_per_step: int, flops_per_device_step: float | None, device: jax.Device):
        self.images_per_step = images_per_step
        self.flops = flops_per_device_step
        self.peak = device_peak_flops(device)

    def report(self, steps: int, seconds: float) -> dict[str, float]:
        steps_per_s = steps / seconds if seconds > 0 else 0.0
        out = {"steps_per_s": steps_per_s, "images_per_s": steps_per_s * self.images_per_step}
        if self.flops is not None and self.peak is not None:
            out["mfu"] = self.flops * steps_per_s / self.peak
        return out


def enable_compilation_cache(directory: str | None = None) -> str:
    """Turn on JAX's persistent compilation cache (default: $JAX_COMPILATION_CACHE_DIR or
    ~/.cache/jax_uncond/xla), so a restarted or resumed run skips recompiling its step."""
    directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jax_uncond", "xla")
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return directory
