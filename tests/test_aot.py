"""Ahead-of-time compilation of the kernels for sm_80 and sm_90 with no GPU (kernels/aot.py, kernels/variant.py).

The suite compiles each kernel family's largest configuration with every switch on, for each dtype and precision
(the most registers each can need); `.ci/run` also runs the full matrix through `python -m fastlstm.kernels.aot`.
"""

import itertools

import pytest

aot = pytest.importorskip("fastlstm.kernels.aot", reason="triton is not installed")
variant_module = pytest.importorskip("fastlstm.kernels.variant", reason="triton is not installed")


def test_quick_matrix_compiles_without_spills_within_shared_memory():
    results = aot.run_matrix(quick=True, jobs=2)
    assert results, "no variant was compiled"
    failures = [r for r in results if not r.ok]
    assert not failures, aot.format_table(failures)
    # The ptxas log was read for every variant: a silent cache hit would leave these unknown.
    assert all(r.registers is not None and r.spill_bytes == 0 for r in results)


STAGES = ("forward", "backward")


def test_matrix_covers_every_plan_the_launcher_makes():
    import torch

    from fastlstm.kernels import planning

    covered = {(v.family, v.stage, v.dtype, v.precision, v.config, v.aligned) for v in aot.variants()}
    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    precisions = {torch.float32: ("ieee", "tf32"), torch.float16: ("ieee",), torch.bfloat16: ("ieee",)}
    hidden_sizes = (1, 16, 17, 32, 33, 64, 65, 100, 128, 256, 300, 512, 768, 1000, 1024, 1500, 2048, 4096)
    for hidden, batch, dtype in itertools.product(hidden_sizes, (1, 8, 9, 16, 64, 300), names):
        for proj in {hidden, max(1, hidden // 4)}:
            devices = itertools.product((False, True), precisions[dtype], STAGES, planning.SHARED_BYTES.values())
            for gluon, precision, stage, shared in devices:
                options = {"gluon": gluon, "precision": precision, "stage": stage, "shared_bytes": shared}
                chosen = planning.plan_for(hidden, proj, batch, dtype, 132, **options)
                variant = variant_module.plan_variant(chosen, stage, names[dtype], precision, ())
                is_aligned = chosen.kind == "streaming" or planning.aligned(hidden, proj)
                key = (variant.family, stage, names[dtype], precision, variant.config, is_aligned)
                assert key in covered, (hidden, proj, batch, dtype, gluon, precision, stage, shared)


def test_a_spilling_result_fails_the_check():
    variant = aot.variants(quick=True)[0]
    spilled = aot.Result(variant, 90, 255, 8, 1024, None)
    too_much_shared = aot.Result(variant, 80, 128, 0, 200 * 1024, None)
    broken = aot.Result(variant, 90, None, None, None, "CompilationError: boom")
    assert not spilled.ok and not too_much_shared.ok and not broken.ok
    assert aot.Result(variant, 90, 128, 0, 1024, None).ok
    # A variant planned for a device with less shared memory than its architecture's (the Gluon backward's copy
    # slots on a 99 KiB part) is held to that device's.
    small = variant._replace(shared_limit=99 * 1024)
    assert not aot.Result(small, 80, 128, 0, 100 * 1024, None).ok and aot.Result(small, 80, 128, 0, 99 * 1024, None).ok


def test_the_gluon_backward_is_compiled_for_every_device_shared_memory_it_is_planned_for():
    import torch

    from fastlstm.kernels import planning

    compiled = {
        (v.config, v.shared_limit) for v in aot.variants() if v.family == "split-gluon" and v.stage == "backward"
    }
    for shared in planning.SHARED_BYTES.values():
        chosen = planning.plan_for(
            1024, 1024, 16, torch.bfloat16, 132, gluon=True, stage="backward", shared_bytes=shared
        )
        if chosen.implementation == "gluon":
            config = variant_module.plan_variant(chosen, "backward", "bf16", "ieee", ()).config
            assert any(c == config and (limit or 0) <= shared for c, limit in compiled), shared
    # What only sm_90's 227 KiB holds is four slots where sm_80 has room for fewer; run_matrix compiles it for sm_90.
    beyond_sm80 = [v for v in aot.variants() if v.shared_limit and v.shared_limit > aot.SHARED_LIMIT[80]]
    assert beyond_sm80 and all(dict(v.config)["COPY_SLOTS"] == 4 for v in beyond_sm80)


def test_an_argument_the_tables_do_not_know_fails_the_variant(monkeypatch):
    variant = next(v for v in aot.variants(quick=True) if v.family == "split")
    monkeypatch.delitem(variant_module.POINTER_TYPES, "flags_ptr")
    with pytest.raises(KeyError, match="flags_ptr"):
        variant_module.signature(variant)


def test_absent_tensors_compile_as_none_and_set_their_flags():
    variant = next(v for v in aot.variants() if v.family == "single" and v.switches == frozenset())
    _, signature, constexprs, _, _ = variant_module.signature(variant)
    assert constexprs["lengths_ptr"] is None and constexprs["w_hr_ptr"] is None and constexprs["stats_ptr"] is None
    assert (constexprs["HAS_LENGTHS"], constexprs["HAS_PROJ"], constexprs["TELEMETRY"]) == (False, False, False)
    assert constexprs["restarts_ptr"] is None and constexprs["HAS_RESTARTS"] is False
    assert signature["xw_ptr"] == "*" + variant.dtype


def test_restarts_compile_for_a_subset_of_the_families_that_take_them():
    from fastlstm.kernels import planning

    every = aot.variants()
    with_restarts = [v for v in every if "resets" in v.switches]
    assert {v.family for v in with_restarts} == set(planning.RESTART_FAMILIES)  # never the Gluon split kernels
    assert len(with_restarts) <= 0.1 * (len(every) - len(with_restarts))  # the CI budget: at most a tenth more
    _, signature, constexprs, _, _ = variant_module.signature(next(v for v in with_restarts if v.stage == "backward"))
    assert signature["restarts_ptr"] == "*i1" and constexprs["HAS_RESTARTS"] is True


def test_restarts_take_the_split_kernels_only_at_pads_the_matrix_compiles_with_restarts():
    import torch

    from fastlstm.kernels import planning

    def plan(hidden, restarts):
        return planning.plan_for(hidden, hidden, 8, torch.bfloat16, max_programs=132, gluon=True, restarts=restarts)

    assert plan(1023, restarts=False).kind == "split"
    assert plan(1023, restarts=True).kind == "streaming"  # unaligned above SPLIT_RESTARTS_UNALIGNED_MAX_PAD
    assert (plan(1024, restarts=True).kind, plan(1024, restarts=True).implementation) == ("split", "tl")
    assert plan(511, restarts=True).kind == "split"
    restarts_pads = {
        (v.dtype, v.aligned): dict(v.config)["K_PAD"]
        for v in aot.variants()
        if v.family == "split" and aot.RESTART_SWITCH in v.switches and v.stage == "forward"
    }
    for dtype in ("fp16", "bf16"):
        assert restarts_pads[(dtype, False)] == planning.SPLIT_RESTARTS_UNALIGNED_MAX_PAD
        assert restarts_pads[(dtype, True)] == planning.SPLIT_MAX_PAD[torch.bfloat16]
