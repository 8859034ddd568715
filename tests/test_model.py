"""The performance model reads compiled SASS (fastlstm.kernels.sass / source / analysis), checked against kernels
whose per-step behaviour is known by construction (tests/model_kernels.py) and against today's LSTM kernels, whose
streaming forward reads all of W_hh every step (the positive control for the resident-weights check) and whose split
forward holds its share of W_hh in registers.

Compiling needs triton but no GPU; it runs in one pool of fresh processes (the suite may have switched the
interpreter on), a handful of compiles of a few seconds each.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("triton", reason="the model compiles kernels with triton")

import model_kernels as toys

from fastlstm.kernels import hardware

H = 256
SIZES = {"T": 1024, "B": 16, "H": H, "P": H, "step_begin": 0, "step_end": 1024, "capacity": 1024, "order": 0}
TOY_SIZES = {"T": 1024, "H": 512}
TOYS = (
    "resident",
    "every_step",
    "dependent",
    "independent",
    "dependent-unrolled",
    "independent-unrolled",
    "chunked",
    "poll",
)
ROUTES = ("streaming-forward", "split-forward")


@pytest.fixture(scope="module")
def read():
    """Every kernel this module asks about, compiled and read once: name -> what the model reports."""
    from fastlstm.kernels.model import run_isolated

    tasks = [("toy", name, TOY_SIZES) for name in TOYS]
    tasks += [("toy", "chunked", {"T": 1024, "H": 1024})]
    tasks += [("route", name, {**SIZES, "dtype": "bf16"}) for name in ROUTES]
    tasks += [("route", "split-gluon-backward", {**SIZES, "H": 512, "P": 512, "dtype": "bf16"})]
    tasks += [("resident-claims", None, None)]
    results = run_isolated(toys.profile_task, tasks, jobs=2)
    keys = [*TOYS, "chunked@1024", *ROUTES, "split-gluon-backward@512", "resident-claims"]
    return dict(zip(keys, results))


# ------------------------------------------------------------------------------------- the weights detector


def test_detector_flags_the_streaming_forward_which_reads_all_of_w_hh_every_step(read):
    streaming = read["streaming-forward"]
    assert streaming["weights_every_step"]
    assert all(args == ["w_hh_ptr"] for _, args in streaming["weight_loads"])
    # One program owns every unit of its 16 sequences, so each step reads the whole [4H, H] bf16 matrix.
    assert streaming["profile"]["weight_load_bytes"] == 4 * H * H * 2


def test_split_forward_holds_its_share_of_w_hh_in_registers(read):
    split = read["split-forward"]
    assert not split["weights_every_step"]
    profile = split["profile"]
    assert profile["weight_load_bytes"] == 0
    # Its 4 gates x 8 units x H columns of W_hh, once per launch, before the time loop ...
    assert profile["launch_load_bytes"]["w_hh_ptr"] == 4 * 8 * H * 2
    # ... and never re-read from shared memory (the time loop is a while loop: kernels/forward.py).
    assert profile["weight_shared_load_bytes"] == 0


def test_detector_clears_a_kernel_that_loads_its_weights_once(read):
    resident = read["resident"]
    assert not resident["weights_every_step"]
    tile_bytes = toys.BLOCK * toys.BLOCK * 2
    profile = resident["profile"]
    assert profile["weight_load_bytes"] == 0
    assert profile["launch_load_bytes"]["w_hh_ptr"] == tile_bytes  # once, before the time loop
    # triton keeps the loop-invariant dot operand in shared memory and re-reads it every step
    assert profile["weight_shared_load_bytes"] == tile_bytes


def test_detector_follows_a_pointer_a_helper_renamed(read):
    every_step = read["every_step"]
    assert every_step["weights_every_step"]
    assert every_step["profile"]["weight_load_bytes"] == toys.BLOCK * toys.BLOCK * 2


# ------------------------------------------------------------------------------------- per-step counts


def test_mma_count_matches_the_product_shape(read):
    profile, warps = read["every_step"]["profile"], read["every_step"]["num_warps"]
    # [ROWS x BLOCK] @ [BLOCK x BLOCK] in m16n8k16 tiles, counted per warp
    expected = toys.ROWS * toys.BLOCK * toys.BLOCK // (16 * 8 * 16)
    assert sum(profile["mma"].values()) * warps == expected
    assert profile["mma_flops"] * warps == 2 * toys.ROWS * toys.BLOCK * toys.BLOCK


def test_inner_loop_trip_counts_follow_the_source_bounds(read):
    tile_bytes = toys.BLOCK * toys.BLOCK * 2
    for key, hidden in (("chunked", 512), ("chunked@1024", 1024)):
        profile = read[key]["profile"]
        assert profile["weight_load_bytes"] == hidden // toys.BLOCK * tile_bytes


def test_a_loop_llvm_unrolled_is_counted_per_source_step(read):
    # four steps per iteration of the unrolled loop: per step the bytes are still one step's
    for name in ("dependent-unrolled", "independent-unrolled"):
        loads = read[name]["profile"]["global_load_bytes"]
        assert loads == {"index_ptr": toys.GATHER_BLOCK * 4, "table_ptr": toys.GATHER_BLOCK * 4}


def test_a_load_whose_address_is_a_loaded_value_adds_a_round_trip(read):
    dependent, independent = read["dependent"]["profile"], read["independent"]["profile"]
    assert independent["round_trips"] == pytest.approx(1)
    assert dependent["round_trips"] == pytest.approx(2)
    assert set(dependent["round_trips_by_arg"]) == {"index_ptr", "table_ptr"}
    # one more HBM round trip costs at least its latency
    extra = dependent["cycles"] - independent["cycles"]
    assert extra >= hardware.H200.hbm_latency.value


def test_a_poll_whose_first_read_precedes_its_loop_costs_one_round_trip(read):
    # A poll succeeds at its first read in the model: read before the loop, the loop's body never runs, and the
    # wait costs that one read, not one more for the body.
    assert read["poll"]["profile"]["round_trips_by_arg"]["flags_ptr"] == pytest.approx(1)


def test_the_split_kernels_exchange_is_counted(read):
    sync = read["split-forward"]["profile"]["sync"]
    assert sync["poll_loops"] >= 1  # waiting for the producers of h_{t-1} (one source loop; ptxas may split it)
    assert sync["fences"] >= 1  # the acquire after the polls, and the release before the flag
    assert sync["cctl_invalidations"] == 1  # one L1 invalidation per step (the acquire), not one per poll
    assert read["streaming-forward"]["profile"]["sync"]["poll_loops"] == 0


def test_the_gluon_backward_waits_once_for_every_gate_and_not_for_its_prefetch(read):
    trips = read["split-gluon-backward@512"]["profile"]["round_trips_by_arg"]
    # The four gates' exchanged gradients are copied into shared memory together (split_gluon_backward.py,
    # COPY_SLOTS): one dependent round trip for all of them, where loading them gate after gate took four.
    assert trips["exchange_ptr"] == pytest.approx(1)
    # What the next step needs is loaded a step ahead and finished where it is used (backward.py, _load_step):
    # none of it on this step's critical path.
    assert not {"cells_ptr", "grad_out_ptr", "gates_ptr", "c0_ptr"} & set(trips)


def test_streaming_step_waits_on_w_hh_chunk_after_chunk(read):
    profile = read["streaming-forward"]["profile"]
    # The unpipelined reduction issues each W_hh chunk only after the previous one arrived: one round trip per
    # chunk and gate (BLOCK_K = 16, BLOCK_H = 32: H/32 tiles x H/16 chunks x 4 gates).
    assert profile["round_trips_by_arg"]["w_hh_ptr"] == pytest.approx(H // 32 * H // 16 * 4)
    assert profile["limiter"] == "latency_path"


# ------------------------------------------------------------------------------------- the routing check


def test_every_routed_variant_claiming_resident_weights_keeps_them_on_chip(read):
    """CI's guard for the rewritten kernels: a Route marked resident_weights=True in kernels/model.py whose time loop
    loads W_hh from global memory fails here."""
    claimed, offenders = read["resident-claims"]
    if not claimed:
        pytest.skip("no routed variant claims resident weights yet (kernels/model.py: Route.resident_weights)")
    assert not offenders, "\n".join(offenders)


# ------------------------------------------------------------------------------------- the committed table


RESULTS = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results")


def test_committed_model_table_covers_every_shape_and_is_labelled_modelled():
    from fastlstm.kernels import model

    path = os.path.join(RESULTS, model.file_stem("3.6") + ".json")
    with open(path) as f:
        doc = json.load(f)
    assert doc["schema"] == model.SCHEMA and doc["label"].startswith(model.LABEL)
    assert set(doc["cases"]) == {s.key for s in model.model_shapes()}
    names = {row["name"] for row in doc["constants"]}
    assert names == {row["name"] for row in hardware.H200.table()}
    assert all(row["source"] for row in doc["constants"])
    for case in doc["cases"].values():
        assert case["measured"] is None or isinstance(case["measured"], dict)
        assert case[model.LABEL]["forward_backward_us_per_step"] > case[model.LABEL]["forward_us_per_step"] > 0
    with open(path[: -len(".json")] + ".md") as f:
        text = f.read()
    assert "modelled" in text.splitlines()[0]
