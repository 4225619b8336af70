"""`jax-uncond-plan`: the run's train step compiled for a TPU slice by libtpu on this CPU machine (no TPU).

One compile per `--shard_state` mode of the tiny UNet at 16x16 on a v5e:2x2 slice (4 chips), module-scoped
(25-45 s each here): the report's fields, collectives of weights and gradients only (no activation moves),
and the state bytes per chip falling with `optimizer` and `full`. The error paths (no libtpu, an unknown
topology, a batch the chips do not divide) are one line and exit code 2 without compiling anything. Without a
loadable libtpu the compiling tests skip, the reason in the summary (`-ra`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import pytest

from engine_parts import TINY_UNET
from jax_uncond import plan
from jax_uncond.errors import UsageError
from jax_uncond.training.sharding import SHARD_STATE_MODES

TOPOLOGY, RESOLUTION, PER_CHIP, CHIPS = "v5e:2x2", 16, 4, 4


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    path = tmp_path_factory.mktemp("unet") / "config.json"
    path.write_text(json.dumps({**TINY_UNET, "sample_size": RESOLUTION}))
    return str(path)


@pytest.fixture(scope="module")
def libtpu():
    """Skip (with the reason) where libtpu cannot be loaded: the plan needs it, the rest of the suite does not."""
    plan.prepare_environment()
    try:
        plan.topology_slice(TOPOLOGY)
    except UsageError as e:
        pytest.skip(f"libtpu cannot be loaded here: {e}")


def run_plan(*argv: str) -> tuple[dict, list[str]]:
    """main() in this process: (the last stdout line as JSON, the lines before it)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert plan.main(list(argv), prog="jax-uncond-plan") == 0
    *lines, last = out.getvalue().strip().splitlines()
    return json.loads(last), lines


def tiny_flags(unet: str, *flags: str) -> list[str]:
    return ["--topology", TOPOLOGY, "--model_config_name_or_path", unet, "--resolution", str(RESOLUTION),
            "--train_batch_size", str(PER_CHIP), "--mixed_precision", "bf16", "--use_ema", *flags]


@pytest.fixture(scope="module")
def plans(libtpu, tiny_unet):
    return {mode: run_plan(*tiny_flags(tiny_unet, "--shard_state", mode)) for mode in SHARD_STATE_MODES}


def test_the_report_names_the_slice_memory_collectives_and_time(plans):
    report, lines = plans["replicated"]
    assert report["program"] == "train" and report["topology"] == TOPOLOGY and report["devices"] == CHIPS
    assert report["device_kind"] == "TPU v5 lite" and report["generation"] == "v5e" and report["hosts"] == 1
    assert report["attention"] == "xla"  # chosen for the TPU, although this process's backend is the CPU
    assert report["batch"] == {"per_device": PER_CHIP, "global": PER_CHIP * CHIPS, "accumulation_steps": 1,
                               "images_per_step": PER_CHIP * CHIPS}
    memory = report["memory_per_device"]
    assert memory["hbm"] == 16 * 2**30 and memory["fits"] is True
    assert memory["peak"] >= memory["arguments"] >= sum(memory["state"].values()) > 0
    assert memory["aliased"] > 0  # the donated state is updated in place
    assert report["flops_per_device"] > 0 and report["compile_s"] > 0
    assert report["time_s"]["at_40"] == pytest.approx(report["time_s"]["at_100"] / 0.4)
    assert any(line.startswith("fits: peak") for line in lines) and any("collectives" in line for line in lines)


@pytest.mark.parametrize("mode", SHARD_STATE_MODES)
def test_the_step_moves_weights_and_gradients_never_activations(plans, mode):
    moved = plans[mode][0]["collectives"]
    assert set(moved["by_kind"]) <= {"all-reduce", "reduce-scatter", "all-gather"}
    if mode == "replicated":
        assert set(moved["by_kind"]) == {"all-reduce"}
    # Arrays no state leaf (or a chip's share of one) has the size of: at most the random draws' two 32-bit
    # counters per image; an activation of the step is at least 16 x 32 x 16 x 16 elements.
    assert moved["other_bytes"] <= 8 * PER_CHIP * CHIPS


def test_splitting_the_state_cuts_its_bytes_per_chip(plans):
    state = {mode: plans[mode][0]["memory_per_device"]["state"] for mode in SHARD_STATE_MODES}
    assert state["optimizer"]["params"] == state["replicated"]["params"]
    for part in ("optimizer", "ema"):
        assert state["optimizer"][part] < state["replicated"][part] / CHIPS * 1.2
        assert state["full"][part] == state["optimizer"][part]
    assert state["full"]["params"] < state["replicated"]["params"] / CHIPS * 1.2
    arguments = {mode: plans[mode][0]["memory_per_device"]["arguments"] for mode in SHARD_STATE_MODES}
    assert arguments["full"] < arguments["optimizer"] < arguments["replicated"]


def test_find_max_batch_bisects_to_the_largest_that_fits(monkeypatch):
    """Doubling, then bisecting, one probe per compile (a stand-in for the compiler: fits up to 45)."""
    probed = []

    def fits(program, config, where, batch, say):
        probed.append(batch)
        return batch <= 45, {"batch": batch}

    monkeypatch.setattr(plan, "fits", fits)
    assert plan.find_max_batch("train", None, None, 4, print)["max_batch_per_device"] == 45
    assert probed == [4, 8, 16, 32, 64, 48, 40, 44, 46, 45]
    probed.clear()
    assert plan.find_max_batch("train", None, None, 64, print)["max_batch_per_device"] == 45
    assert probed[:2] == [64, 32]
    monkeypatch.setattr(plan, "fits", lambda program, config, where, batch, say: (False, {"batch": batch}))
    assert plan.find_max_batch("train", None, None, 4, print)["max_batch_per_device"] == 0


def test_a_batch_the_chips_do_not_divide_is_one_line_and_exit_2(libtpu, tiny_unet, capsys):
    with pytest.raises(SystemExit) as stopped:
        plan.main(tiny_flags(tiny_unet, "--global_batch_size", "6"), prog="jax-uncond-plan")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "jax-uncond-plan: error: --global_batch_size 6 is not divisible by the 4 devices; use a multiple of 4"]


def test_an_unknown_topology_is_one_line_and_exit_2(libtpu, capsys):
    with pytest.raises(SystemExit) as stopped:
        plan.main(["--topology", "v5q:2x2"], prog="jax-uncond-plan")
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and "--topology v5q:2x2: libtpu does not know it" in err[0]


def test_without_libtpu_the_plan_says_how_to_install_it():
    blocked = "import sys; sys.modules['libtpu'] = None; from jax_uncond.plan import main; sys.exit(main(sys.argv[1:]))"
    # JAX, once imported, names the library it found in TPU_LIBRARY_PATH: not in the process without it.
    env = {k: v for k, v in os.environ.items() if k != "TPU_LIBRARY_PATH"}
    done = subprocess.run([sys.executable, "-c", blocked, "--topology", TOPOLOGY], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "libtpu is not installed" in lines[0] and 'pip install "jax[tpu]==' in lines[0]


@pytest.mark.parametrize("program", ["sample", "fid"])
def test_the_fid_sampler_and_feature_extractor_plan_too(libtpu, tiny_unet, program):
    report, _ = run_plan(*tiny_flags(tiny_unet, "--program", program, "--fid_scheduler", "ddim",
                                     "--fid_inference_steps", "2", "--fid_dims", "64"))
    assert report["program"] == program and report["batch"]["images_per_call"] == PER_CHIP * CHIPS
    assert report["memory_per_device"]["fits"] is True and report["flops_per_device"] > 0
    assert report["collectives"]["other_bytes"] == 0  # each chip samples and scores its own images
    if program == "sample":
        assert report["sampler"] == "ddim" and report["steps"] == 2 and report["attention"] == "xla"


def test_collectives_are_counted_with_the_bytes_they_deliver():
    """Synchronous ones by their result; an asynchronous start by the results half of its tuple (operands,
    results, contexts); arrays of no state leaf's size (nor a share of one) counted apart."""
    hlo = "\n".join([
        "  %all-reduce.1 = (f32[32]{0}, bf16[3,3,3,32]{3,2,1,0:T(4,128)(2,1)}) all-reduce(%a, %b), channel_id=1",
        "  %all-gather.2 = f32[64,32]{1,0} all-gather(%c), dimensions={0}",
        "  %collective-permute-start.3 = (bf16[3,3,3,8]{3,2,1,0}, bf16[3,3,3,8]{3,2,1,0}, u32[]{:S(2)}, u32[]{:S(2)}) "
        "collective-permute-start(%d), source_target_pairs={{0,1}}",
        "  %collective-permute-done.3 = bf16[3,3,3,8]{3,2,1,0} collective-permute-done(%collective-permute-start.3)",
        "  %all-gather.4 = bf16[16,8,256,8]{3,2,1,0} all-gather(%q), dimensions={0}",
        "  %fusion.5 = f32[32]{0} fusion(%all-reduce.1), kind=kLoop",
    ])
    state = plan.state_sizes({"w": jax.ShapeDtypeStruct((3, 3, 3, 32), "float32"),
                              "b": jax.ShapeDtypeStruct((32,), "float32"),
                              "d": jax.ShapeDtypeStruct((64, 32), "float32")}, devices=4)
    moved = plan.collectives(hlo, state)
    assert moved["by_kind"] == {"all-reduce": {"count": 1, "bytes": 32 * 4 + 864 * 2},
                                "all-gather": {"count": 2, "bytes": 64 * 32 * 4 + 16 * 8 * 256 * 8 * 2},
                                "collective-permute": {"count": 1, "bytes": 216 * 2}}
    assert moved["other_bytes"] == 16 * 8 * 256 * 8 * 2  # the gathered queries of an attention


def test_a_batch_too_large_is_refused_by_the_compiler_and_reported(libtpu, tiny_unet):
    """libtpu refuses a program over the chip's HBM (RESOURCE_EXHAUSTED): the plan's answer, not an error."""
    report, lines = run_plan(*tiny_flags(tiny_unet, "--train_batch_size", "65536"))
    memory = report["memory_per_device"]
    assert memory["fits"] is False and "RESOURCE_EXHAUSTED" in memory["refused"] and report["collectives"] is None
    assert any(line.startswith("DOES NOT FIT: the TPU compiler refused the program") for line in lines)
    assert report["flops_per_device"] > 0  # counted on the lowered program all the same
