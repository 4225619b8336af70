"""Throughput figures: images/s, steps/s, and model FLOPs utilisation against the device's peak."""

from __future__ import annotations

import os

import jax

PEAK_FLOPS = {
    # dense bf16 peak per device (vendor figures); float32 runs are measured against the same figure
    "H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12,
    "V100": 125e12, "TPU v6": 918e12, "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12,
    "TPU v4": 275e12, "TPU v3": 123e12,
}


def device_peak_flops(device: jax.Device) -> float | None:
    """The known bf16 peak FLOP/s of one device, or None (CPUs and unknown accelerators)."""
    kind = device.device_kind
    for name, peak in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def step_flops(lowered: jax.stages.Lowered, devices: int, accumulation_steps: int = 1) -> float | None:
    """FLOPs one device spends in one call of an SPMD step: XLA's cost analysis of the whole program
    as lowered, split evenly over the `devices`.

    The lowered program, not the compiled one: a GPU backend turns convolutions and matrix products
    into cuDNN/cuBLAS calls that the analysis of the compiled program counts as no FLOPs (it gave an
    MFU of 0.3% on an H200). XLA counts a loop body once, so the micro-batch scan of gradient
    accumulation is scaled by its trip count (which also scales the small optimizer update: an
    overestimate of well under 1%).
    """
    analysis = lowered.cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"]) * accumulation_steps / devices


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
