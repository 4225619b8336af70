"""Where a training step's time goes: ms per step by category, this JAX engine beside the PyTorch script.

Runs the step of `bench_train.py` (same preset, UNet, batch and EMA) under each side's profiler, in
its own process: JAX under `jax.profiler` (every XLA op of the compiled step, categorised from the
optimized HLO: its fused ops, the Flax module path in its `op_name`, and its Python stack), PyTorch
under `torch.profiler` (every aten op, categorised by itself and the autograd/optimizer op around it).
Categories: convolution (forward and backward, fused epilogues included), normalisation (GroupNorm),
attention + linear (q/k/v/out projections, the attention product and softmax, the other dense
layers), optimizer + EMA (clipping, AdamW, EMA, the step's norms), elementwise + loss (activations,
residuals, noise, loss), data movement (ops that only copy, transpose, pad or concatenate), wgrad
layouts (XLA) (the transposes XLA:CPU makes of the activations that its weight-gradient convolutions
read; cuDNN and oneDNN need none), and host + idle (step time no op covers: dispatch, Python,
waiting). Each side's rows add up to its step time.

    python benchmarks/profile_train.py                    # the cpu preset, both sides
    python benchmarks/profile_train.py --top 25           # also the 25 costliest JAX ops, with their HLO names
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import math
import os
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_train import PRESETS, bench_config, jax_runner, pin_cpus, torch_runner  # noqa: E402
from sides import report, run_side  # noqa: E402

CATEGORIES = ("convolution", "normalisation", "attention + linear", "optimizer + EMA", "elementwise + loss",
              "data movement", "wgrad layouts (XLA)", "host + idle")
NORM_MODULES = frozenset({"norm1", "norm2", "group_norm", "conv_norm_out", "skip_norm"})
MOVEMENT_OPS = frozenset({"copy", "transpose", "bitcast", "reshape", "broadcast", "concatenate", "slice", "pad",
                          "dynamic-slice", "dynamic-update-slice", "parameter", "constant", "tuple",
                          "get-tuple-element", "reverse", "iota"})
OPTIMIZER_SOURCES = ("/optax/", "training/ema.py", "training/optim.py", "training/optimizer.py")
OPTIMIZER_FUNCTIONS = ("_tree_select",)
LIBRARY_CALLS = (("conv", "convolution"), ("gemm", "dot"), ("matmul", "dot"), ("fmha", "dot"))
"""A GPU library call (cuDNN, cuBLAS) counted as the XLA op it stands for: part of its target -> opcode."""


# ---- JAX: the optimized HLO, categorised per instruction ------------------------------------------
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(")


def _stack_sources(text: str) -> dict[int, str]:
    """stack_frame_id -> 'file:function' of the frame's innermost Python location (the module's tables)."""
    tables: dict[str, dict[int, str]] = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
    current = None
    for line in text.splitlines():
        if line in tables:
            current = tables[line]
        elif current is not None and (match := re.match(r"^(\d+) (.*)$", line)):
            current[int(match.group(1))] = match.group(2)
        else:
            current = None

    def ref(entry: str, key: str) -> int:
        return int(re.search(key + r"=(\d+)", entry).group(1))

    def location(entry: str) -> str:
        return (tables["FileNames"].get(ref(entry, "file_name_id"), "").strip('"') + ":"
                + tables["FunctionNames"].get(ref(entry, "function_name_id"), "").strip('"'))

    return {frame: location(tables["FileLocations"][ref(entry, "file_location_id")])
            for frame, entry in tables["StackFrames"].items()}


def _opcodes(opcode: str, line: str) -> set[str]:
    """The instruction's opcode, and for a library call the opcode it stands for."""
    target = (re.search(r'custom_call_target="([^"]+)"', line) or [None, ""])[1].lower()
    return {opcode} | {op for part, op in LIBRARY_CALLS if target and part in target}


def categorise_hlo(text: str) -> dict[str, tuple[str, str]]:
    """HLO instruction name -> (category, 'shape op_name'), for every instruction of the module (fusions
    categorised by their body)."""
    computations: dict[str, list[tuple[str, str, str]]] = {}
    name = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            name = header.group(1)
            computations[name] = []
        elif name is not None and (match := _INSTRUCTION.match(line)):
            computations[name].append((match.group(1), match.group(2), line))
    frames = _stack_sources(text)
    opcodes_of = {comp: set().union(*(_opcodes(op, line) for _, op, line in body))
                  for comp, body in computations.items()}
    categories, ops_of, size_of, users = {}, {}, {}, collections.defaultdict(list)
    for body in computations.values():
        for inst, opcode, line in body:
            ops = _opcodes(opcode, line)
            for called in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
                ops |= opcodes_of.get(called, set())
            for operand in re.findall(r"%([\w.\-]+)", line.split(" = ", 1)[1].split("),", 1)[0]):
                users[operand].append(inst)
            op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
            frame = re.search(r"stack_frame_id=(\d+)", line)
            shape = line.split(" = ", 1)[1].split(" ", 1)[0]
            ops_of[inst], size_of[inst] = ops, math.prod(int(d) for d in re.findall(r"\d+", shape.split("{")[0]))
            category = _category(ops, op_name, frames.get(int(frame.group(1)), "") if frame else "")
            categories[inst] = (category, f"{shape} {op_name.replace('jit(train_step)/', '')}")
    for inst, (category, what) in categories.items():
        # XLA:CPU's weight-gradient convolutions take their operands transposed (its kernels' canonical
        # form); a transpose that feeds only such products (results smaller than it) is that layout change
        wgrad = users[inst] and all("convolution" in ops_of[u] and size_of[u] < size_of[inst] for u in users[inst])
        if "transpose" in ops_of[inst] and category != "convolution" and wgrad:
            categories[inst] = ("wgrad layouts (XLA)", what)
    return categories


def _category(ops: set[str], op_name: str, source: str) -> str:
    path = [segment for part in op_name.split(";") for segment in part.split("/")]
    in_model = "FlaxUNet2DModel" in op_name
    if "convolution" in ops:
        return "convolution"
    if ops - {"fusion"} <= MOVEMENT_OPS:
        return "data movement"
    if not in_model and (any(s in source for s in OPTIMIZER_SOURCES) or source.endswith(OPTIMIZER_FUNCTIONS)
                         or "_where" in op_name):
        return "optimizer + EMA"
    if any(segment in NORM_MODULES for segment in path):
        return "normalisation"
    if "dot" in ops or any(segment.startswith("attentions_") for segment in path):
        return "attention + linear"
    return "elementwise + loss"


def _xla_op_intervals(trace_dir: str, module: str) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, hlo_op) of every op of `module` in the trace (innermost ops only): the first
    accelerator's "XLA Ops" line when there is one, else the CPU threads that ran the program."""
    import jax

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    planes = list(jax.profiler.ProfileData.from_file(path).planes)
    devices = sorted((p for p in planes if re.match(r"/device:(GPU|TPU):0$", p.name)), key=lambda p: p.name)
    if devices:
        lines = [line for line in devices[0].lines if line.name == "XLA Ops"] or list(devices[0].lines)
    else:
        lines = [line for p in planes if p.name == "/host:CPU" for line in p.lines]
    out = []
    for line in lines:
        events = []
        for event in line.events:
            stats = dict(event.stats)
            if stats.get("hlo_module", module) == module and (devices or "hlo_op" in stats):
                events.append((event.start_ns, event.end_ns, str(stats.get("hlo_op", event.name))))
        events.sort()
        for i, (start, end, op) in enumerate(events):  # skip an op that encloses the next (a loop around its body)
            if i + 1 < len(events) and events[i + 1][0] < end and events[i + 1][1] <= end:
                continue
            out.append((start, end, op))
    return out


def _sweep(intervals: list[tuple[int, int, str]]) -> dict[str, float]:
    """Seconds of wall time per key: each instant is shared equally among the ops running then."""
    points = sorted({p for start, end, _ in intervals for p in (start, end)})
    index = {p: i for i, p in enumerate(points)}
    delta: list[collections.Counter] = [collections.Counter() for _ in points]
    for start, end, key in intervals:
        delta[index[start]][key] += 1
        delta[index[end]][key] -= 1
    active: collections.Counter = collections.Counter()
    out: dict[str, float] = collections.defaultdict(float)
    for i, point in enumerate(points[:-1]):
        active.update(delta[i])
        active = +active
        total = sum(active.values())
        if total:
            span = (points[i + 1] - point) * 1e-9
            for key, count in active.items():
                out[key] += span * count / total
    return out


def profile_jax(config, steps: int, top: int, hlo_path: str | None) -> dict:
    import jax

    run, figures = jax_runner(config)
    compiled = figures["compiled"]
    text = compiled.as_text()
    if hlo_path:
        with open(hlo_path, "w") as f:
            f.write(text)
    categories = categorise_hlo(text)
    module = re.match(r"HloModule ([\w.\-]+)", text).group(1)
    run(steps)  # warm-up
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        wall = run(steps)
        jax.profiler.stop_trace()
        per_op = _sweep(_xla_op_intervals(trace_dir, module))
    ms = collections.defaultdict(float)
    for op, seconds in per_op.items():
        ms[categories.get(op, ("elementwise + loss",))[0]] += 1e3 * seconds / steps
    ms["host + idle"] = max(0.0, 1e3 * wall / steps - sum(ms.values()))
    ops = sorted(per_op.items(), key=lambda kv: -kv[1])[:top]
    return {"ms": dict(ms), "step_ms": 1e3 * wall / steps, "ops": len(categories),
            "top": [(op, *categories.get(op, ("?", "")), 1e3 * s / steps) for op, s in ops]}


# ---- PyTorch: aten ops, categorised by themselves and the ops around them ------------------------
def _torch_category(names: list[str]) -> str:
    """names: the event's own name first, then its parents outwards."""
    for name in reversed(names):  # the outermost meaningful op decides (a copy inside a conv is the conv's)
        low = name.lower()
        if low.startswith(("optimizer", "clip_grad", "ema")) or "foreach" in low or "adamw" in low:
            return "optimizer + EMA"
        if "convolution" in low:
            return "convolution"
        if "group_norm" in low:
            return "normalisation"
        if any(k in low for k in ("scaled_dot_product", "attention", "addmm", "bmm", "linear", "softmax",
                                  "::mm", "mmbackward", "baddbmm")):
            return "attention + linear"
    low = names[0].lower()
    if any(k in low for k in ("copy", "clone", "contiguous", "cat", "permute", "transpose", "view", "reshape",
                              "expand", "slice", "select", "unsqueeze", "empty", "to", "pad")):
        return "data movement"
    return "elementwise + loss"


def profile_torch(config, unet_config: dict, steps: int) -> dict:
    import torch

    run, _ = torch_runner(config, unet_config)
    run(steps)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wall = run(steps)
    ms = collections.defaultdict(float)
    for event in prof.events():
        if event.self_cpu_time_total <= 0:
            continue
        names, parent = [event.name], event.cpu_parent
        while parent is not None:
            names.append(parent.name)
            parent = parent.cpu_parent
        ms[_torch_category(names)] += event.self_cpu_time_total / 1e3 / steps
    ms["host + idle"] = max(0.0, 1e3 * wall / steps - sum(ms.values()))
    return {"ms": dict(ms), "step_ms": 1e3 * wall / steps, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--steps", type=int, default=4, help="profiled steps (after one warm-up round)")
    parser.add_argument("--top", type=int, default=0, help="also list the costliest JAX ops")
    parser.add_argument("--no_torch", action="store_true", help="profile the JAX side only")
    parser.add_argument("--cpus", help="pin both sides to these CPUs, e.g. 0 (the same thread count on both)")
    parser.add_argument("--hlo", help="also write the JAX step's optimized HLO (the op names --top lists) here")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--side", choices=("jax", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    config = bench_config(preset, preset["resolution"], preset["batch"])
    if args.side and args.cpus:
        pin_cpus(args.cpus, args.side)
    if args.side == "jax":
        report(profile_jax(config, args.steps, args.top, args.hlo))
        return
    if args.side == "torch":
        report(profile_torch(config, dict(preset["unet"]), args.steps))
        return
    results = {}
    for side in ("jax",) if args.no_torch else ("jax", "torch"):
        results[side] = run_side([sys.executable, __file__, *sys.argv[1:], "--side", side])
    print(f"config {args.preset}: {preset['resolution']}x{preset['resolution']}, batch {preset['batch']}, "
          f"{preset['precision']}, EMA on; {args.steps} profiled steps; ms per step "
          f"(JAX: {results['jax']['ops']} HLO ops" + (f"; PyTorch: {results['torch']['threads']} threads)"
                                                      if "torch" in results else ")"))
    print(f"{'category':<22}" + "".join(f"{side:>10}" for side in results))
    for category in CATEGORIES:
        print(f"{category:<22}" + "".join(f"{r['ms'].get(category, 0.0):10.1f}" for r in results.values()))
    print(f"{'step (wall)':<22}" + "".join(f"{r['step_ms']:10.1f}" for r in results.values()))
    if "torch" in results:
        print(f"ratio torch/jax step time: {results['torch']['step_ms'] / results['jax']['step_ms']:.2f}x")
    for op, category, what, ms in results["jax"].get("top", []):
        print(f"  {ms:8.2f} ms  {category:<20} {op:<28} {what[:150]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
