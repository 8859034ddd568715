"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1, held to the reference backend.

Shapes are tiny (the interpreter runs every program in Python) but chosen to exercise every tiling branch: H=40
spans two 32-unit tiles with a ragged tail, P=20 is a ragged projection tile, B=18 needs two 16-sequence programs,
and every reduction has a partial 16-wide chunk. Outputs are NaN-poisoned before the kernels run, so an element a
kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a GPU is present: the kernels compile for it (tests/test_gpu.py)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of the kernels

import triton  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.utils.rnn import pack_sequence  # noqa: E402

import fastlstm  # noqa: E402
from fastlstm import reference  # noqa: E402
from fastlstm.kernels import launch  # noqa: E402
from fastlstm.kernels.recurrent_fwd import lstm_forward_kernel  # noqa: E402
from fastlstm.telemetry import Telemetry  # noqa: E402

if not isinstance(lstm_forward_kernel, triton.runtime.interpreter.InterpretedFunction):
    pytest.skip("fastlstm.kernels was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

pytestmark = pytest.mark.interpreter

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


def rel(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def random_problem(steps, batch, hidden, proj, dtype, with_lengths, scale=0.4):
    out_size = proj or hidden
    problem = dict(
        xw=torch.randn(steps, batch, 4 * hidden) * 1.5,
        h0=torch.randn(batch, out_size),
        c0=torch.randn(batch, hidden),
        w_hh=torch.randn(4 * hidden, out_size) * scale,
        w_hr=torch.randn(proj, hidden) * scale if proj else None,
    )
    problem = {k: None if v is None else v.to(dtype) for k, v in problem.items()}
    problem["lengths"] = torch.randint(1, steps + 1, (batch,)) if with_lengths else None
    if with_lengths:
        problem["lengths"][0] = steps  # the longest sequence defines T, as for a PackedSequence
    grads = dict(
        grad_out=torch.randn(steps, batch, out_size).to(dtype),
        grad_hn=torch.randn(batch, out_size).to(dtype),
        grad_cn=torch.randn(batch, hidden).to(dtype),
    )
    return problem, grads


def run_backend(backend, problem, grads, reverse):
    telemetry = Telemetry(1, 1)
    probe = telemetry.probe(0, 0, telemetry.begin_pass(torch.device("cpu"), problem["xw"].shape[0]))
    fwd = backend.recurrence_forward(
        problem["xw"], problem["h0"], problem["c0"], problem["w_hh"], problem["w_hr"], problem["lengths"], reverse,
        probe.forward,
    )  # fmt: skip
    bwd = backend.recurrence_backward(
        grads["grad_out"], grads["grad_hn"], grads["grad_cn"], problem["c0"], fwd.saved, problem["w_hh"],
        problem["w_hr"], problem["lengths"], reverse, probe.backward,
    )  # fmt: skip
    return fwd, bwd, telemetry.snapshot()


def assert_same_telemetry(kernel, ref, tol):
    k, r = kernel.layers[0], ref.layers[0]
    assert k.elements == r.elements
    for gate in "ifgo":
        # A value within rounding of a threshold may land on either side: allow one element per gate.
        assert abs(k.gate_saturation[gate] - r.gate_saturation[gate]) * r.elements <= 1.0, gate
    assert k.forget_gate_mean == pytest.approx(r.forget_gate_mean, rel=tol)
    assert k.cell_absmax == pytest.approx(r.cell_absmax, rel=tol)
    assert (k.backward_passes == r.backward_passes).all()
    assert rel(torch.from_numpy(k.grad_norm_per_step), torch.from_numpy(r.grad_norm_per_step)) <= tol
    assert rel(torch.from_numpy(k.cell_grad_norm_per_step), torch.from_numpy(r.cell_grad_norm_per_step)) <= tol
    assert kernel.first_nonfinite == ref.first_nonfinite
    assert kernel.launches == ref.launches


def assert_matches_reference(problem, grads, reverse, tol):
    k_fwd, k_bwd, k_tel = run_backend(launch, problem, grads, reverse)
    r_fwd, r_bwd, r_tel = run_backend(reference, problem, grads, reverse)
    for name in ("out", "h_n", "c_n"):
        assert rel(getattr(k_fwd, name), getattr(r_fwd, name)) <= tol, name
    # hidden_full only meets zero gradients outside a sequence, so only its in-sequence values are specified.
    inside = reference.active_mask(problem["lengths"], problem["xw"].shape[0])
    inside = torch.ones(()) if inside is None else inside.unsqueeze(-1)
    for name in ("grad_gates", "grad_h0", "grad_c0", "grad_hidden", "hidden_full"):
        expected, actual = getattr(r_bwd, name), getattr(k_bwd, name)
        if expected is None:
            assert actual is None
            continue
        if name == "hidden_full":
            expected, actual = expected * inside, actual * inside
        assert rel(actual, expected) <= tol, name
    assert_same_telemetry(k_tel, r_tel, tol)


@pytest.mark.parametrize("proj", [0, 20], ids=["noproj", "proj"])
@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_fp32_paths_match_reference(reverse, with_lengths, proj):
    problem, grads = random_problem(4, 18, 40, proj, torch.float32, with_lengths)
    assert_matches_reference(problem, grads, reverse, TOLERANCE[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("proj", [0, 6], ids=["noproj", "proj"])
def test_half_precision_paths_match_reference(dtype, proj):
    problem, grads = random_problem(3, 5, 12, proj, dtype, with_lengths=True)
    assert_matches_reference(problem, grads, reverse=proj > 0, tol=TOLERANCE[dtype])


def test_hidden_sizes_on_every_tile_boundary():
    # H = 16 (one partial tile), 32 (one exact tile), 33 (exact tile + 1 unit): ragged-edge handling of each tile.
    for hidden in (16, 32, 33):
        problem, grads = random_problem(2, 3, hidden, 0, torch.float32, with_lengths=False)
        assert_matches_reference(problem, grads, reverse=False, tol=TOLERANCE[torch.float32])


def test_module_with_triton_backend_matches_nn_lstm():
    ref = nn.LSTM(5, 20, num_layers=2, bidirectional=True, proj_size=7)
    fast = fastlstm.LSTM(5, 20, num_layers=2, bidirectional=True, proj_size=7, backend="triton")
    fast.load_state_dict(ref.state_dict())
    seqs = [torch.randn(n, 5) for n in (4, 2, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    h0 = torch.randn(4, 3, 7, requires_grad=True)
    c0 = torch.randn(4, 3, 20, requires_grad=True)
    outputs = []
    for model in (ref, fast):
        out, (h_n, c_n) = model(packed, (h0, c0))
        loss = (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum() + h_n.sum() + c_n.pow(2).sum()
        grads = torch.autograd.grad(loss, [h0, c0, *model.parameters()])
        outputs.append((out.data, h_n, c_n, *grads))
    for name, expected, actual in zip(["out", "h_n", "c_n", "h0", "c0", "params"], outputs[0], outputs[1]):
        assert rel(actual, expected) <= 1e-5, name


def test_module_telemetry_equals_reference_backend():
    models = {b: fastlstm.LSTM(3, 17, num_layers=2, bidirectional=True, backend=b) for b in ("triton", "reference")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    x = torch.randn(5, 4, 3)
    x[3, 2, 1] = float("nan")  # the first non-finite must be found at the same place by both
    snapshots = {}
    for name, model in models.items():
        out, _ = model(x)
        out.nan_to_num().sum().backward()
        snapshots[name] = model.telemetry.snapshot()
    assert snapshots["triton"].first_nonfinite == snapshots["reference"].first_nonfinite
    assert snapshots["triton"].first_nonfinite.tensor == "input"
    for k_layer, r_layer in zip(snapshots["triton"].layers, snapshots["reference"].layers):
        assert k_layer.elements == r_layer.elements
        assert k_layer.gate_saturation == pytest.approx(r_layer.gate_saturation, abs=1.0 / r_layer.elements)


def test_nonfinite_gradient_located_like_reference():
    problem, grads = random_problem(4, 3, 8, 0, torch.float32, with_lengths=False)
    grads["grad_out"][2, 1, 3] = float("inf")
    assert_first_nonfinite_like_reference(problem, grads, "backward")


def assert_first_nonfinite_like_reference(problem, grads, stage):
    for reverse in (False, True):
        k_tel = run_backend(launch, problem, grads, reverse)[2]
        r_tel = run_backend(reference, problem, grads, reverse)[2]
        assert k_tel.first_nonfinite == r_tel.first_nonfinite
        assert k_tel.first_nonfinite.stage == stage


def test_telemetry_off_gives_identical_results():
    problem, grads = random_problem(3, 4, 8, 0, torch.float32, with_lengths=True)
    on = launch.recurrence_forward(**_forward_args(problem), reverse=False, probe=None)
    telemetry = Telemetry(1, 1)
    probe = telemetry.probe(0, 0, telemetry.begin_pass(torch.device("cpu"), 3))
    with_probe = launch.recurrence_forward(**_forward_args(problem), reverse=False, probe=probe.forward)
    assert torch.equal(on.out, with_probe.out)
    assert torch.equal(on.saved[1], with_probe.saved[1])


def _forward_args(problem):
    return {k: problem[k] for k in ("xw", "h0", "c0", "w_hh", "w_hr", "lengths")}


# ---- bad inputs to the kernel path ----


def test_float64_is_refused_with_a_clear_error():
    model = fastlstm.LSTM(3, 4, backend="triton").double()
    with pytest.raises(TypeError, match="float64"):
        model(torch.randn(2, 1, 3, dtype=torch.float64))


def test_non_contiguous_inputs_give_correct_results():
    problem, grads = random_problem(3, 4, 8, 0, torch.float32, with_lengths=False)
    strided = dict(problem)
    strided["xw"] = problem["xw"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["w_hh"] = problem["w_hh"].t().contiguous().t()
    expected = reference.recurrence_forward(**_forward_args(problem), reverse=False)
    actual = launch.recurrence_forward(**_forward_args(strided), reverse=False)
    assert not strided["xw"].is_contiguous()
    assert rel(actual.out, expected.out) <= 1e-6


def test_stride_zero_output_gradient_from_sum_backward():
    ref = nn.LSTM(3, 6)
    fast = fastlstm.LSTM(3, 6, backend="triton")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    grads = []
    for model in (ref, fast):
        model(x)[0].sum().backward()  # the output gradient arrives as an expanded, stride-0 tensor
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel(grads[1], grads[0]) <= 1e-5


def test_out_of_range_lengths_are_clamped_not_read_out_of_bounds():
    problem, _ = random_problem(3, 4, 8, 0, torch.float32, with_lengths=False)
    args = _forward_args(problem)
    full = launch.recurrence_forward(**args, reverse=False)
    too_long = launch.recurrence_forward(**{**args, "lengths": torch.full((4,), 99)}, reverse=False)
    assert torch.equal(too_long.out, full.out)
    negative = launch.recurrence_forward(**{**args, "lengths": torch.full((4,), -5)}, reverse=False)
    assert torch.equal(negative.h_n, problem["h0"])  # no step ran: the state is the initial one
    assert torch.equal(negative.out, torch.zeros_like(negative.out))


# ---- the persistent kernels, host-stepped (the interpreter cannot run their grid barrier) ----


@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_persistent_fp32_matches_reference(persistent_launches, reverse, with_lengths):
    # H=40 is three 16-unit programs (the last one ragged) and two 32-wide reduction chunks; B=18 two batch tiles.
    problem, grads = random_problem(4, 18, 40, 0, torch.float32, with_lengths)
    assert_matches_reference(problem, grads, reverse, TOLERANCE[torch.float32])
    assert persistent_launches == [launch.lstm_persistent_forward_kernel, launch.lstm_persistent_backward_kernel]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_persistent_half_precision_matches_reference(persistent_launches, dtype):
    problem, grads = random_problem(3, 5, 20, 0, dtype, with_lengths=True)
    assert_matches_reference(problem, grads, reverse=True, tol=TOLERANCE[dtype])
    assert len(persistent_launches) == 2


def test_persistent_locates_nonfinite_like_reference(persistent_launches):
    problem, grads = random_problem(4, 3, 24, 0, torch.float32, with_lengths=False)
    problem["xw"][1, 2, 30] = float("nan")
    grads["grad_out"][2, 1, 3] = float("inf")
    assert_first_nonfinite_like_reference(problem, grads, "forward")


@pytest.mark.parametrize("batch,proj", [(4, 8), (launch.PERSISTENT_MAX_BATCH + 1, 0)], ids=["proj", "large-batch"])
def test_persistent_leaves_other_layers_to_the_tiled_kernels(persistent_launches, batch, proj):
    problem, grads = random_problem(2, batch, 24, proj, torch.float32, with_lengths=False)
    assert_matches_reference(problem, grads, reverse=False, tol=TOLERANCE[torch.float32])
    assert persistent_launches == []


def test_persistent_module_matches_nn_lstm(persistent_launches):
    ref = nn.LSTM(5, 20, num_layers=2, bidirectional=True)
    fast = fastlstm.LSTM(5, 20, num_layers=2, bidirectional=True, backend="triton")
    fast.load_state_dict(ref.state_dict())
    packed = pack_sequence([torch.randn(n, 5) for n in (4, 2, 3)], enforce_sorted=False)
    results = []
    for model in (ref, fast):
        out, (h_n, c_n) = model(packed)
        loss = (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum() + c_n.pow(2).sum()
        results.append((out.data, h_n, c_n, *torch.autograd.grad(loss, list(model.parameters()))))
    for expected, actual in zip(*results):
        assert rel(actual, expected) <= 1e-5
    assert len(persistent_launches) == 8  # 2 layers x 2 directions x (forward, backward)


def test_unknown_persistent_mode_is_refused(monkeypatch):
    monkeypatch.setattr(launch, "PERSISTENT", "sometimes")
    problem, _ = random_problem(2, 2, 8, 0, torch.float32, with_lengths=False)
    with pytest.raises(ValueError, match="FASTLSTM_PERSISTENT"):
        launch.recurrence_forward(**_forward_args(problem), reverse=False)
