"""The accelerator suite's own logic (the suite itself runs on a GPU; `--dry-run` runs it on a CPU)."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import device_suite  # noqa: E402


def test_largest_batch_scales_the_temporaries_and_keeps_the_state():
    gib = 2**30
    memory = {"temp": 8 * gib, "argument": 2 * gib, "output": 2 * gib, "alias": 2 * gib, "device_limit": 80 * gib}
    # 0.9 * 80 GiB - 2 GiB of state leaves 70 GiB; at 1/8 GiB per image that is 560 images
    assert device_suite.largest_batch(memory, batch=64, cap=1024, multiple=8) == 560
    assert device_suite.largest_batch(memory, batch=64, cap=256, multiple=8) == 256
    assert device_suite.largest_batch(dict(memory, device_limit=4 * gib), batch=64, cap=1024, multiple=8) == 8


def test_markdown_table_has_every_part_and_names_failures():
    jax_side = {"images_per_s": 200.0, "mfu": 0.41, "compile_s": 61.0}
    report = {
        "device": "NVIDIA H100 80GB HBM3", "device_count": 1, "date": "2026-01-01", "jax": "0.10.2",
        "python": "3.11", "command": "benchmarks/device_suite.sh", "dry_run": False, "preset": "seed64",
        "precision": "bf16",
        "parts": {
            "train": {"batch": {"batch": 64, "jax": jax_side, "torch": {"images_per_s": 100.0},
                                "jax_cached_compile_s": 2.0},
                      "largest_batch": {"batch": 512, "jax": jax_side, "torch": {"error": "CUDA out of memory"}}},
            "profile": {"ms": {"convolution": 30.0}, "step_ms": 40.0},
            "sampling": [{"batch": 64, "steps": 50, "jax": {"where": "gpu", "ddim": {"images_per_s": 10.0,
                                                                             "compile_s": 9.0}},
                          "torch": {"where": "cuda", "ddim": {"images_per_s": 5.0}}}],
            "data": {"error": "TimeoutError: out of the suite's time budget"},
        },
    }
    table = device_suite.markdown(report)
    assert "| train seed64, bf16, batch 64 | 200.0 img/s | 100.0 img/s | 2.00x | MFU 41.0%; compile 61.0s cold, " \
           "2.0s cached |" in table
    assert "batch 512 (largest that fits)" in table and "CUDA out of memory" in table
    assert "| sampling DDIM 50 steps, batch 64 | 10.00 img/s | 5.00 img/s | 2.00x |" in table
    assert "- data failed: TimeoutError" in table and "convolution 30.00" in table


def test_profile_counts_gpu_library_calls_as_the_ops_they_stand_for():
    import profile_train

    hlo = "\n".join([
        "HloModule jit_train_step",
        "",
        "ENTRY %main (p: f32[8,64,32,32]) -> f32[8,64,32,32] {",
        '  %conv = (bf16[8,32,32,64], u8[0]) custom-call(%p), custom_call_target="__cudnn$convForward", '
        'metadata={op_name="jit(train_step)/FlaxUNet2DModel/conv_in/conv_general_dilated"}',
        '  %gemm = (bf16[8,256,64], s8[0]) custom-call(%conv), custom_call_target="__cublas$gemm", '
        'metadata={op_name="jit(train_step)/FlaxUNet2DModel/mid_block/attentions_0/query/dot_general"}',
        '  ROOT %add = f32[8,64,32,32] add(%p, %p), metadata={op_name="jit(train_step)/FlaxUNet2DModel/add"}',
        "}",
    ])
    categories = profile_train.categorise_hlo(hlo)
    assert categories["conv"][0] == "convolution"
    assert categories["gemm"][0] == "attention + linear"
    assert categories["add"][0] == "elementwise + loss"
