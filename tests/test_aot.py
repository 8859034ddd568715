"""Ahead-of-time compilation of the kernels for sm_80 and sm_90 with no GPU (kernels/aot.py).

The suite compiles the variants with every flag off and every flag on for each dtype and precision, the two ends of
the register budget; `.ci/run` also runs the full matrix through `python -m fastlstm.kernels.aot`.
"""

import pytest

aot = pytest.importorskip("fastlstm.kernels.aot", reason="triton is not installed")


def test_quick_matrix_compiles_without_spills_within_shared_memory():
    results = aot.run_matrix(quick=True, jobs=2)
    assert results, "no variant was compiled"
    failures = [r for r in results if not r.ok]
    assert not failures, aot.format_table(failures)
    # The ptxas log was read for every variant: a silent cache hit would leave these unknown.
    assert all(r.registers is not None and r.spill_bytes == 0 for r in results)


def test_matrix_covers_every_configuration_the_launcher_selects():
    import torch

    from fastlstm.kernels.launch import select_config

    covered = {(v.block_b, v.block_h, v.block_k, v.num_warps, v.num_stages, v.maxnreg) for v in aot.variants()}
    for hidden in (1, 16, 64, 256, 1024, 4096):
        for batch in (1, 16, 64, 256, 4096):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                assert tuple(select_config(hidden, hidden, batch, dtype)) in covered


def test_a_spilling_result_fails_the_check():
    variant = aot.variants(quick=True)[0]
    spilled = aot.Result(variant, 90, 255, 8, 1024, None)
    too_much_shared = aot.Result(variant, 80, 128, 0, 200 * 1024, None)
    broken = aot.Result(variant, 90, None, None, None, "CompilationError: boom")
    assert not spilled.ok and not too_much_shared.ok and not broken.ok
    assert aot.Result(variant, 90, 128, 0, 1024, None).ok


def test_matrix_covers_the_persistent_kernels_in_both_modes():
    import torch

    from fastlstm.kernels.launch import persistent_config

    persistent = [v for v in aot.variants() if v.kernel.startswith("persistent")]
    combinations = {
        (v.kernel, v.dtype, v.precision, v.grid_barrier, v.aligned, v.block_b, v.block_h, v.block_k, v.num_warps,
         v.num_stages, v.maxnreg)
        for v in persistent
    }  # fmt: skip
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for kernel in ("persistent-forward", "persistent-backward"):
        for dtype, precision in (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee")):
            for barrier in (False, True):
                for aligned in (False, True):
                    config = tuple(persistent_config(dtypes[dtype]))
                    assert (kernel, dtype, precision, barrier, aligned, *config) in combinations
    assert not any(v.proj for v in persistent)  # projected layers never reach them
