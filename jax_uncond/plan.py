"""Plan a run on a TPU slice you do not have: the run's exact programs compiled for the slice (libtpu, no TPU).

`jax-uncond-plan --topology v5e:4x4 [train_flax.py flags]` builds the train step `train_flax.py` would compile
with those flags on that slice (the same model, optimizer, state shapes, shardings and step: `training.program`)
and compiles it with the TPU compiler on this machine. It prints, per chip: the train state's bytes by part,
the program's arguments and temporaries, the peak against the chip's HBM and whether it fits; the collectives
in the step (kind, count, bytes); the FLOPs per step (of the lowered program, as the run's MFU counts them)
and the step time they imply at 100% and 40% of the chip's bf16 peak; and the compile time. The last line of
stdout is the same as one JSON object. `--program sample` plans the FID sampling program instead, `--program
fid` the Inception feature extractor; `--find_max_batch` searches the largest per-chip batch that fits.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh

from jax_uncond import __version__, xla_flags
from jax_uncond.console import setup_logging
from jax_uncond.errors import UsageError
from jax_uncond.evaluation import features
from jax_uncond.evaluation.inception import INPUT_SIZE, param_shapes
from jax_uncond.pipelines.ddpm import FlaxDDPMPipeline
from jax_uncond.run import metrics
from jax_uncond.run.loop import build_model, build_scheduler, check_resolution, global_batch_size
from jax_uncond.schedulers.samplers import checked_sampler, default_steps
from jax_uncond.training import sharding
from jax_uncond.training.config import TrainConfig, build_parser, parse_with
from jax_uncond.training.program import batch_shapes, train_program
from jax_uncond.training.step import jit_train_step

PROGRAMS = ("train", "sample", "fid")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
COLLECTIVE_LINE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
PLAN_TRAINING_STEPS = 10_000
"""The LR schedule's length in a plan: it sets constants of the program, never its shapes, memory or collectives."""
MAX_BATCH = 2**16
"""--find_max_batch stops doubling here."""
LOW_UTILISATION = 0.4
"""The second step-time figure: a fraction of peak that convolutional UNets reach on TPUs in practice."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """The devices of a TPU slice (or several, joined over the data-center network) and what they are."""

    topology: str
    num_slices: int
    devices: tuple
    mesh: Any

    @property
    def hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def topology_slice(topology: str, num_slices: int = 1) -> Slice:
    """The compile-only devices of `topology` (libtpu's names: v5e:4x4, v5p:4x4x4, v4:2x2x2, v6e:16x16, ...),
    `num_slices` of them, and the run's mesh over them; a missing libtpu or an unknown name is a UsageError."""
    if num_slices < 1:
        raise UsageError(f"--num_slices {num_slices}: must be at least 1")
    # v4 hosts show each chip as one device (its two cores joined, "megacore"), as a v4 TPU VM does.
    chip = {"chip_config_name": "megacore"} if topology.lower().startswith("v4") else {}
    try:
        with _libtpu_start_up_quiet():
            description = topologies.get_topology_desc(topology_name=topology, platform="tpu", num_slices=num_slices,
                                                       **chip)
    except RuntimeError as e:
        if "not installed" in str(e):
            raise UsageError(f"libtpu is not installed, and it is what compiles for TPUs (no TPU needed): "
                             f'pip install "jax[tpu]=={jax.__version__}"') from e
        raise UsageError(f"--topology {topology}: libtpu does not know it ({_first_line(e)}); use its names, e.g. "
                         "v5e:4x4 (a v5e-16), v5p:4x4x4 (v5p-128), v4:2x2x2 (v4-16), v6e:16x16 (v6e-256)") from e
    devices = tuple(description.devices)
    return Slice(topology, num_slices, devices, sharding.make_mesh(devices))


@contextlib.contextmanager
def _libtpu_start_up_quiet() -> Iterator[None]:
    """libtpu's start-up writes to the process's stderr that it found no TPU accelerator type and no worker
    host names: true and harmless on a machine without TPUs, so kept off the terminal (its errors reach
    Python as exceptions, which name them)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def array_bytes(shape_text: str) -> list[tuple[tuple[int, ...], int]]:
    """(dims, bytes) of every array in an HLO shape (`f32[32,128]{1,0}`, or a tuple of them); an element type's
    bits are the number in its name (bf16, u32, f8e4m3fn, c64), a `pred` is one byte."""
    out = []
    for dtype, dims in ARRAY.findall(shape_text):
        shape = tuple(int(d) for d in dims.split(",") if d)
        bits = re.search(r"\d+", dtype)
        out.append((shape, max(1, int(bits.group()) // 8 if bits else 1) * math.prod(shape)))
    return out


def collectives(hlo_text: str, state_sizes: set[int]) -> dict[str, Any]:
    """The collectives of a compiled program: per kind, how many and the bytes they deliver (their results;
    an asynchronous one counted at its start), and the bytes of arrays whose element count is no state leaf's
    nor one device's share of one (`state_sizes` holds both): activations, and the random draws' counters."""
    kinds = {kind: {"count": 0, "bytes": 0} for kind in COLLECTIVES}
    other = 0
    for line in hlo_text.splitlines():
        match = COLLECTIVE_LINE.match(line)
        if not match:
            continue
        shape_text, kind, start = match.groups()
        arrays = [a for a in array_bytes(shape_text) if a[0]]  # scalars: an async op's contexts, or tiny sums
        if start and kind != "all-reduce":  # (operands, results[, contexts]): the results
            arrays = arrays[len(arrays) // 2:]
        kinds[kind]["count"] += 1
        kinds[kind]["bytes"] += sum(size for _, size in arrays)
        other += sum(size for shape, size in arrays if math.prod(shape) not in state_sizes)
    return {"by_kind": {k: v for k, v in kinds.items() if v["count"]}, "other_bytes": other}


def state_sizes(tree: Any, devices: int) -> set[int]:
    """The element counts of a state's leaves and of one device's share of each (however reshaped, a gradient
    or a weight in a collective has one of them)."""

    sizes = {math.prod(x.shape) for x in jax.tree.leaves(tree) if x.shape}
    return sizes | {size // devices for size in sizes if size % devices == 0}


@dataclasses.dataclass
class Compiled:
    """One program compiled for the slice: what the report reads. `compiled` is None where the compiler refused
    the program for want of HBM (`refusal` says what it needed)."""

    lowered: Any
    compiled: Any
    compile_s: float
    flops_per_device: float | None
    state_bytes: dict[str, int]
    state_sizes: set[int]
    batch: dict[str, int]
    notes: dict[str, Any]
    refusal: str | None = None


def _per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _timed_compile(lower: Callable[[], Any]) -> tuple[Any, Any, float, str | None]:
    """(lowered, compiled or None, seconds, why None): a program too large for the chip is no error here but
    the compiler's answer (libtpu refuses it with RESOURCE_EXHAUSTED, naming what it needs and has)."""
    started = time.perf_counter()
    lowered = lower()
    try:
        compiled, refusal = lowered.compile(), None
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        compiled, refusal = None, _first_line(e)
    return lowered, compiled, time.perf_counter() - started, refusal


def _replicated_shapes(tree: Any, mesh: Mesh) -> Any:
    """`tree`'s shapes and dtypes as `ShapeDtypeStruct`s whole on every device of `mesh`."""
    whole = sharding.replicated(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), tree)


def _fid_batch_size(config: TrainConfig, mesh: Mesh) -> int:
    """Images per call of the FID programs: `--fid_batch_size`, default the global training batch."""
    batch_size = config.fid_batch_size or global_batch_size(config, mesh)
    if batch_size % mesh.size:
        raise UsageError(f"--fid_batch_size {batch_size} is not divisible by the {mesh.size} devices; "
                         f"use a multiple of {mesh.size}")
    return batch_size


def compile_train(config: TrainConfig, where: Slice) -> Compiled:
    """The train step `train_flax.py` would run with `config` on the slice, compiled."""
    mesh = where.mesh
    model = build_model(config, mesh)
    check_resolution(config, model)
    batch_size = global_batch_size(config, mesh)
    program = train_program(config, model, build_scheduler(config), mesh, config.max_train_steps or PLAN_TRAINING_STEPS)
    state, batch = program.abstract_state(), batch_shapes(config, batch_size, mesh)
    step = jit_train_step(program.step, state, batch, mesh)
    lowered, compiled, seconds, refusal = _timed_compile(lambda: step.lower(state, batch))
    k = config.gradient_accumulation_steps
    parts = {"params": state.params, "optimizer": state.opt_state, "ema": state.ema_params}
    state_bytes = {name: _per_device_bytes(tree) for name, tree in parts.items()}
    state_bytes["counters"] = _per_device_bytes(state) - sum(state_bytes.values())
    return Compiled(lowered, compiled, seconds, metrics.step_flops(lowered, mesh.size, k), state_bytes,
                    state_sizes(state, mesh.size),
                    {"per_device": batch_size // mesh.size, "global": batch_size, "accumulation_steps": k,
                     "images_per_step": batch_size * k},
                    {"shard_state": config.shard_state, "attention": _attention(model, mesh)}, refusal)


def compile_sample(config: TrainConfig, where: Slice) -> Compiled:
    """The FID sampling program (`--fid_scheduler`, `--fid_inference_steps`, `--fid_batch_size` images per
    call over the slice, default the global training batch), compiled."""
    mesh = where.mesh
    model = build_model(config, mesh)
    check_resolution(config, model)
    scheduler = build_scheduler(config)
    steps = config.fid_inference_steps or default_steps(config.fid_scheduler, len(scheduler))
    try:
        sampler_scheduler = checked_sampler(config.fid_scheduler, scheduler, steps)
    except ValueError as e:
        raise UsageError(f"--fid_scheduler {config.fid_scheduler} with {steps} steps: {e}") from e
    batch_size = _fid_batch_size(config, mesh)
    sampler, state = FlaxDDPMPipeline(model, scheduler).mesh_sampler(batch_size, steps, sampler_scheduler, mesh)
    params = _replicated_shapes(jax.eval_shape(model.init_weights, jax.random.key(0)), mesh)
    state = _replicated_shapes(state, mesh)
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
    lowered, compiled, seconds, refusal = _timed_compile(lambda: sampler.lower(params, state, rng))
    flops = metrics.lowered_flops(lowered)
    # XLA counts the scan's body once: one UNet call and solver update per step, so scale by the steps.
    return Compiled(lowered, compiled, seconds, None if flops is None else flops * steps / mesh.size,
                    {"params": _per_device_bytes(params)}, state_sizes(params, mesh.size),
                    {"per_device": batch_size // mesh.size, "global": batch_size, "images_per_call": batch_size},
                    {"sampler": config.fid_scheduler, "steps": steps, "attention": _attention(model, mesh)}, refusal)


def compile_fid(config: TrainConfig, where: Slice) -> Compiled:
    """The Inception network of FID (`--fid_dims` features) on `--fid_batch_size` images per call, compiled."""
    mesh = where.mesh
    batch_size = _fid_batch_size(config, mesh)
    _, network = features.programs(mesh, config.fid_dims)
    params = _replicated_shapes(param_shapes(), mesh)
    images = jax.ShapeDtypeStruct((batch_size, INPUT_SIZE, INPUT_SIZE, 3), jax.numpy.float32,
                                  sharding=sharding.batch_sharding(mesh))
    lowered, compiled, seconds, refusal = _timed_compile(lambda: network.lower(params, images))
    flops = metrics.lowered_flops(lowered)
    return Compiled(lowered, compiled, seconds, None if flops is None else flops / mesh.size,
                    {"params": _per_device_bytes(params)}, state_sizes(params, mesh.size),
                    {"per_device": batch_size // mesh.size, "global": batch_size, "images_per_call": batch_size},
                    {"dims": config.fid_dims}, refusal)


COMPILERS = {"train": compile_train, "sample": compile_sample, "fid": compile_fid}


def _attention(model: Any, mesh: Any) -> str:

    return sharding.attention_on(mesh, model.attention_implementation)


def report(program: str, config: TrainConfig, where: Slice, result: Compiled) -> dict[str, Any]:
    """The plan as one JSON-able dict: the slice, the batch, memory per device, collectives, FLOPs, time."""
    device = where.devices[0]
    spec = metrics.TPU_SPECS.get(device.device_kind)
    hbm = spec.hbm_bytes if spec else None
    if result.compiled is None:
        memory_per_device = {"state": result.state_bytes, "hbm": hbm, "fits": False, "refused": result.refusal}
        moved = None
    else:
        memory = result.compiled.memory_analysis()
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
        memory_per_device = {
            "state": result.state_bytes, "arguments": memory.argument_size_in_bytes,
            "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
            "temporaries": memory.temp_size_in_bytes, "code": memory.generated_code_size_in_bytes, "peak": peak,
            "hbm": hbm, "fits": None if hbm is None else peak <= hbm}
        moved = collectives(result.compiled.as_text(), result.state_sizes)
    plan: dict[str, Any] = {
        "program": program, "topology": where.topology, "num_slices": where.num_slices, "devices": len(where.devices),
        "hosts": where.hosts, "device_kind": device.device_kind, "generation": spec.name if spec else None,
        "resolution": config.resolution, "mixed_precision": config.mixed_precision,
        "gradient_checkpointing": config.gradient_checkpointing, **result.notes, "batch": result.batch,
        "compile_s": round(result.compile_s, 2), "memory_per_device": memory_per_device, "collectives": moved,
        "flops_per_device": result.flops_per_device,
    }
    if spec and result.flops_per_device:
        seconds = result.flops_per_device / spec.peak_flops
        images = result.batch.get("images_per_step", result.batch["global"])
        plan["time_s"] = {"at_100": seconds, f"at_{round(LOW_UTILISATION * 100)}": seconds / LOW_UTILISATION}
        plan["images_per_s"] = {"at_100": images / seconds,
                                f"at_{round(LOW_UTILISATION * 100)}": images * LOW_UTILISATION / seconds}
    return plan


def describe(plan: dict[str, Any]) -> list[str]:
    """The plan in lines for people (the JSON line follows them)."""
    gib = 2.0**30
    memory = plan["memory_per_device"]
    batch = plan["batch"]
    lines = [f"{plan['program']} program on {plan['topology']}" + (f" x {plan['num_slices']} slices"
             if plan["num_slices"] > 1 else "") + f": {plan['devices']} devices ({plan['device_kind']}) on "
             f"{plan['hosts']} host(s); batch {batch['per_device']} per device, {batch['global']} in all"
             + (f" x {batch['accumulation_steps']} accumulated" if batch.get("accumulation_steps", 1) > 1 else ""),
             f"compiled in {plan['compile_s']:.1f}s"]
    state = ", ".join(f"{name} {size / gib:.3f}" for name, size in memory["state"].items())
    if "refused" in memory:
        lines += [f"per device (GiB): state: {state}", _fit_line(plan)]
    else:
        sizes = ", ".join(f"{name} {memory[name] / gib:.3f}" for name in ("arguments", "temporaries", "code", "peak"))
        lines.append(f"per device (GiB): state: {state}; {sizes}")
        lines.append(_fit_line(plan))
        moved = plan["collectives"]
        kinds = ", ".join(f"{kind} x{v['count']} ({v['bytes'] / 2**20:.2f} MiB)"
                          for kind, v in moved["by_kind"].items())
        lines.append(f"collectives per call: {kinds or 'none'}; of arrays other than the state: "
                     f"{moved['other_bytes']} bytes")
    if plan["flops_per_device"] is None:
        lines.append("FLOPs: XLA's cost analysis gave none for this program")
    else:
        line = f"FLOPs per device per call: {plan['flops_per_device']:.4g}"
        if "time_s" in plan:
            (full, t100), (low, t_low) = plan["time_s"].items()
            ips = plan["images_per_s"]
            line += (f"; at 100% of the bf16 peak {t100 * 1e3:.2f} ms ({ips[full]:.0f} images/s), at "
                     f"{low.removeprefix('at_')}% {t_low * 1e3:.2f} ms ({ips[low]:.0f} images/s)")
        lines.append(line)
    return lines


def _fit_line(plan: dict[str, Any]) -> str:
    memory = plan["memory_per_device"]
    if "refused" in memory:
        return f"DOES NOT FIT: the TPU compiler refused the program ({memory['refused']})"
    if memory["hbm"] is None:
        return f"HBM of a {plan['device_kind']} not known here (docs/plan.md lists the chips): fit not judged"
    return (f"{'fits' if memory['fits'] else 'DOES NOT FIT'}: peak {memory['peak'] / 2**30:.2f} GiB of "
            f"{memory['hbm'] / 2**30:.0f} GiB HBM ({100 * memory['peak'] / memory['hbm']:.0f}%)")


def fits(program: str, config: TrainConfig, where: Slice, per_device: int,
         say: Callable[[str], None]) -> tuple[bool, dict[str, Any]]:
    """Whether `per_device` images per device fit the HBM (compiling the program at that batch)."""
    if program == "train":
        config = dataclasses.replace(config, train_batch_size=per_device, global_batch_size=None)
    else:
        config = dataclasses.replace(config, fid_batch_size=per_device * len(where.devices))
    plan = report(program, config, where, COMPILERS[program](config, where))
    memory = plan["memory_per_device"]
    say(f"batch {per_device} per device: {_fit_line(plan)} (compiled in {plan['compile_s']:.0f}s)")
    return memory["fits"], plan


def find_max_batch(program: str, config: TrainConfig, where: Slice, start: int,
                   say: Callable[[str], None]) -> dict[str, Any]:
    """The plan at the largest per-device batch that fits: doubling from `start` until one does not (or
    halving until one does), then bisecting; each probe is one compile."""
    plans: dict[int, dict[str, Any]] = {}

    def probe(batch: int) -> bool:
        ok, plans[batch] = fits(program, config, where, batch, say)
        return ok

    low, high = (start, None) if probe(start) else (0, start)
    while high is None:
        if low * 2 > MAX_BATCH:
            return {**plans[low], "max_batch_per_device": low}
        low, high = (low * 2, None) if probe(low * 2) else (low, low * 2)
    while low == 0 and high > 1:
        low, high = (high // 2, high) if probe(high // 2) else (0, high // 2)
    if low == 0:
        return {**plans[1], "max_batch_per_device": 0}
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if probe(middle) else (low, middle)
    return {**plans[low], "max_batch_per_device": low}


def build_plan_parser(prog: str | None) -> argparse.ArgumentParser:
    """train_flax.py's parser plus the plan's own flags."""
    parser = build_parser(prog or "jax-uncond-plan")
    parser.description = __doc__.split("\n")[0]
    group = parser.add_argument_group("plan")
    group.add_argument("--topology", required=True, help="The TPU slice, by libtpu's name: v5e:4x4 (a v5e-16), "
                       "v5p:4x4x4 (v5p-128), v4:2x2x2 (v4-16), v6e:16x16 (v6e-256), ...")
    group.add_argument("--num_slices", type=int, default=1, help="Slices joined over the data-center network "
                       "(multi-slice); the mesh spans all their devices. (default: %(default)s)")
    group.add_argument("--program", choices=PROGRAMS, default="train", help="train: the train step; sample: the FID "
                       "sampling program; fid: the Inception feature extractor. (default: %(default)s)")
    group.add_argument("--find_max_batch", action="store_true", help="Search the largest per-device batch that fits "
                       "(--train_batch_size for train, --fid_batch_size / devices otherwise); one compile per probe.")
    return parser


def prepare_environment() -> None:
    """Before JAX starts: compute on the CPU (never take a TPU this machine may have, nor wait for its
    lock), and load libtpu beside a run that may hold the chips."""
    if "JAX_PLATFORMS" not in os.environ:
        jax.config.update("jax_platforms", "cpu")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`jax-uncond-plan`: returns 2 for a bad invocation (also a missing libtpu or an unknown topology)."""
    setup_logging()
    parser = build_plan_parser(prog or os.path.basename(sys.argv[0]))
    config, args = parse_with(parser, argv)
    prepare_environment()
    xla_flags.apply()

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        where = topology_slice(args["topology"], args["num_slices"])
        if args["find_max_batch"]:
            if where.devices[0].device_kind not in metrics.TPU_SPECS:
                raise UsageError(f"--find_max_batch: the HBM of a {where.devices[0].device_kind} is not known here "
                                 "(docs/plan.md lists the chips that are); plan single batches instead")
            devices = len(where.devices)
            start = (config.train_batch_size if args["program"] == "train"
                     else max(1, (config.fid_batch_size or config.train_batch_size * devices) // devices))
            plan = find_max_batch(args["program"], config, where, start, say)
            say(f"largest batch that fits: {plan['max_batch_per_device']} per device")
        else:
            plan = report(args["program"], config, where, COMPILERS[args["program"]](config, where))
    except UsageError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    for line in describe(plan):
        say(line)
    say(json.dumps({**plan, "version": __version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main(prog="python -m jax_uncond.plan"))
