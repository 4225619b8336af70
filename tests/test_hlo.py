"""The compiled train step is lean: properties of its HLO (tiny UNet with attention, 32x32, batch 16,
one CPU device, the project's XLA flags) that carry to GPUs and TPUs.

- `--mixed_precision bf16`: every convolution and matrix product of the UNet takes bfloat16 operands,
  and the GroupNorm statistics and attention softmax are float32 (checked in the program JAX hands
  to XLA: XLA's CPU backend then computes bf16 products in float32 itself, which GPUs and TPUs do not);
- the train state is donated: every leaf aliases an output, and no parameter, moment or EMA tensor
  is copied;
- NHWC inside: no activation-sized transpose but the attention's (batch, heads) split and merge in
  the program, and in the optimized program none feeds a convolution or a normalisation (XLA:CPU
  transposes the operands of weight-gradient products, its kernels' canonical form, which cuDNN and
  TPUs do not need);
- `--gradient_checkpointing` recomputes each block's forward convolutions in the backward pass, and
  without it nothing is.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re

import jax
import numpy as np
import pytest

from engine_parts import TINY_UNET, build_parts, tiny_config
from jax_uncond.training import sharding
from jax_uncond.training.optim import make_optimizer
from jax_uncond.training.state import make_init_fn
from jax_uncond.training.step import StepConfig, jit_train_step, make_train_step

RESOLUTION, BATCH = 32, 16
ACTIVATION_SIZE = BATCH * (RESOLUTION // 2) ** 2 * TINY_UNET["block_out_channels"][0]
"""The smallest feature map (level 1 at 16x16, 32 channels counted): larger than any weight here."""
NORM_MODULES = ("norm1", "norm2", "group_norm", "conv_norm_out")
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ([a-z][\w\-]*)\((.*)$")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    line: str

    @property
    def size(self) -> int:
        dims = re.match(r"\w+\[([\d,]*)\]", self.shape)
        return math.prod(int(d) for d in dims.group(1).split(",")) if dims and dims.group(1) else 1

    @property
    def dtype(self) -> str:
        return self.shape.split("[", 1)[0]

    @property
    def op_name(self) -> str:
        found = re.search(r'op_name="([^"]*)"', self.line)
        return found.group(1) if found else ""

    @property
    def called(self) -> list[str]:
        return re.findall(r"(?:calls|to_apply|body|condition)=%?([\w.\-]+)", self.line)


def parse(text: str) -> dict[str, dict[str, Instruction]]:
    """computation name -> instruction name -> Instruction, from HLO text (with or without % and types)."""
    computations: dict[str, dict[str, Instruction]] = {}
    current = None
    for line in text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            current = computations.setdefault(header.group(1), {})
        elif current is not None and (match := INSTRUCTION.match(line)):
            name, shape, opcode, rest = match.groups()
            arguments = rest.split("),", 1)[0]
            operands = [o for o in re.findall(r"%?([\w.\-]+)(?:,|$|\))", arguments) if not o[0].isdigit()]
            current[name] = Instruction(name, shape, opcode, operands, line)
    return computations


def operand_types(instruction: Instruction, computation: dict[str, Instruction]) -> list[str]:
    arguments = instruction.line.split(f" {instruction.opcode}(", 1)[1].split("),", 1)[0]
    inline = re.findall(r"(\w+)\[[\d,]*\]\{[\d,]*\} %?[\w.\-]+", arguments)
    return inline or [computation[o].dtype for o in instruction.operands if o in computation]


def lower_step(tmp_path, *flags: str):
    config = tiny_config(tmp_path, "--resolution", str(RESOLUTION), "--global_batch_size", str(BATCH), *flags)
    config = dataclasses.replace(config, unet={**TINY_UNET, "sample_size": RESOLUTION})
    mesh = sharding.make_mesh(jax.devices()[:1])
    model, scheduler = build_parts(config)
    optimizer, schedule = make_optimizer(config, 10, model)
    key = jax.random.key(0)
    state = jax.jit(make_init_fn(config, model, optimizer, key), out_shardings=sharding.replicated(mesh))()
    images = np.random.default_rng(0).uniform(-1, 1, (BATCH, 3, RESOLUTION, RESOLUTION)).astype(np.float32)
    batch = {"images": jax.device_put(images, sharding.batch_sharding(mesh))}
    step = make_train_step(model, scheduler, scheduler.create_state(), optimizer, schedule,
                           StepConfig.from_config(config), key, mesh)
    return jit_train_step(step, state, batch, mesh).lower(state, batch), state, batch


@pytest.fixture(scope="module")
def bf16_step(tmp_path_factory):
    lowered, state, batch = lower_step(tmp_path_factory.mktemp("bf16"), "--mixed_precision", "bf16")
    compiled = lowered.compile()
    return {"program": parse(lowered.as_text(dialect="hlo", debug_info=True)), "optimized": compiled.as_text(),
            "compiled": compiled, "state": state, "batch": batch}


def in_unet(instruction: Instruction) -> bool:
    return "FlaxUNet2DModel" in instruction.op_name


def path(instruction: Instruction) -> list[str]:
    return re.split(r"[/;]", instruction.op_name)


def test_bf16_products_take_bfloat16_and_statistics_stay_float32(bf16_step):
    """Every product of the step is the UNet's (the loss, noise and optimizer have none)."""
    products, statistics = collections.Counter(), collections.Counter()
    for computation in bf16_step["program"].values():
        softmax = {i.opcode for i in computation.values()} >= {"exponential", "reduce"} and any(
            i.op_name.endswith("reduce_max") for i in computation.values())
        for inst in computation.values():
            if inst.opcode in ("convolution", "dot"):
                bf16 = set(operand_types(inst, computation)) == {"bf16"} or "algorithm=dot_bf16_bf16_f32" in inst.line
                products[inst.opcode, "bf16" if bf16 else str(operand_types(inst, computation))] += 1
            elif inst.opcode == "reduce" and (softmax or any(p in NORM_MODULES for p in path(inst))):
                statistics["softmax" if softmax else "groupnorm", inst.dtype] += 1
    assert set(products) == {("convolution", "bf16"), ("dot", "bf16")}, products
    assert set(statistics) == {("softmax", "f32"), ("groupnorm", "f32")}, statistics


def test_train_state_is_donated_and_never_copied(bf16_step):
    text = bf16_step["optimized"]
    leaves = jax.tree_util.tree_leaves_with_path(bf16_step["state"])
    aliased = {int(i) for i in re.findall(r"\((\d+), \{\}, (?:may|must)-alias\)", text.split("\n", 1)[0])}
    assert aliased == set(range(len(leaves))), "state leaves not aliased to an output: " + ", ".join(
        jax.tree_util.keystr(leaves[i][0]) for i in sorted(set(range(len(leaves))) - aliased))
    computation = parse(text)[re.search(r"^ENTRY %?([\w.\-]+)", text, re.M).group(1)]
    parameters = {i.name: int(re.search(r"parameter\((\d+)\)", i.line).group(1))
                  for i in computation.values() if i.opcode == "parameter"}
    copied = [jax.tree_util.keystr(leaves[parameters[i.operands[0]]][0]) for i in computation.values()
              if i.opcode == "copy" and i.operands and parameters.get(i.operands[0], len(leaves)) < len(leaves)
              and i.size > 1]
    assert not copied, f"state tensors copied every step: {copied}"
    state = jax.tree.map(lambda x: x.copy(), bf16_step["state"])
    bf16_step["compiled"](state, bf16_step["batch"])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(state)), "the state passed in was not donated"


def test_nhwc_inside_no_layout_transposes_around_convolutions_and_norms(bf16_step):
    transposes = [inst for computation in bf16_step["program"].values() for inst in computation.values()
                  if inst.opcode == "transpose" and inst.size >= ACTIVATION_SIZE]
    not_attention = [inst.op_name for inst in transposes if not any(p.startswith("attentions_") for p in path(inst))]
    assert not not_attention, f"activation-sized transposes outside attention: {not_attention}"
    assert transposes, "expected the attention's (batch, heads) split"

    optimized = parse(bf16_step["optimized"])

    def moves_layout(inst: Instruction, computation: dict[str, Instruction]) -> bool:
        if inst.size < ACTIVATION_SIZE:
            return False
        if inst.opcode == "transpose":
            return True
        if inst.opcode == "copy" and inst.operands and inst.operands[0] in computation:
            return re.search(r"\{[\d,]*\}", inst.shape).group(0) != re.search(
                r"\{[\d,]*\}", computation[inst.operands[0]].shape).group(0)
        return inst.opcode == "fusion" and any(moves_layout(i, optimized[c]) for c in inst.called for i in
                                               optimized.get(c, {}).values())

    def has(inst: Instruction, opcode: str) -> bool:
        return inst.opcode == opcode or any(i.opcode == opcode for c in inst.called for i in optimized.get(c, {}).values())

    offenders = []
    for computation in optimized.values():
        for inst in computation.values():
            forward_conv = has(inst, "convolution") and inst.size >= ACTIVATION_SIZE
            norm = any(p in NORM_MODULES for p in path(inst))
            if forward_conv or norm:
                offenders += [f"{o} -> {inst.name} ({inst.op_name})" for o in inst.operands
                              if o in computation and moves_layout(computation[o], computation)]
    assert not offenders, "activation-sized layout changes feeding convolutions or norms:\n" + "\n".join(offenders)


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_block_convolutions_in_the_backward_pass(bf16_step, tmp_path):
    """Each block's forward convolutions (all but the block's last, whose output the backward pass does
    not need) run again inside the backward pass; without the flag, none does."""
    block = re.compile(r"(down_blocks_\d+|mid_block|up_blocks_\d+)/")

    def blocks_with_convolutions(text: str, recomputed: bool) -> set[str]:
        found = set()
        for computation in parse(text).values():
            for inst in computation.values():
                name = block.search(inst.op_name)
                wanted = ("rematted_computation" in inst.op_name if recomputed
                          else inst.op_name.startswith("jit(train_step)/jvp(FlaxUNet2DModel)/"))
                if inst.opcode == "convolution" and name and wanted:
                    found.add(name.group(1))
        return found

    lowered, _, _ = lower_step(tmp_path, "--mixed_precision", "bf16", "--gradient_checkpointing")
    remat = lowered.compile().as_text()
    assert not blocks_with_convolutions(bf16_step["optimized"], recomputed=True)
    assert blocks_with_convolutions(remat, recomputed=True) == blocks_with_convolutions(
        bf16_step["optimized"], recomputed=False) == {"down_blocks_0", "down_blocks_1", "mid_block", "up_blocks_0",
                                                      "up_blocks_1"}
