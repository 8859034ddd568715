"""The Triton kernels on CPU tensors under TRITON_INTERPRET=1, held to the reference backend.

Each kernel family the launcher plans (kernels/planning.py) runs on tiny shapes chosen to exercise its edges:
  single    one program per batch tile owns every unit (H <= 64): H=20 and P=12 are ragged pads, B=18 two tiles;
  split     the units split over programs that exchange every step, host-stepped here (the interpreter cannot run a
            wait for another program): H=72 is nine 8-unit programs, B=18 two batch groups; and the same kernels
            with their exchange on, as one unit group per batch group (a program then waits only for itself);
  streaming W_hh re-read every step, for what the others cannot hold (a projection at H=72).
Outputs are NaN-poisoned before the kernels run, so an element a kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a GPU is present: the kernels compile for it (tests/test_gpu.py)", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of the kernels

import triton
import triton.language as tl
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import fastlstm
from fastlstm import reference
from fastlstm.kernels import exchange, launch, planning
from fastlstm.kernels.single import lstm_single_forward_kernel
from fastlstm.telemetry import Telemetry

try:
    from support import assert_resets_parity, random_resets, rel_err, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_resets_parity, random_resets, rel_err, tolerance

if not all(
    isinstance(fn, triton.runtime.interpreter.InterpretedFunction)
    for fn in (lstm_single_forward_kernel.fn, triton.language.standard.sum)
):
    pytest.fail("triton or fastlstm.kernels was imported before TRITON_INTERPRET=1 was set", pytrace=False)

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    monkeypatch.setattr(launch, "POISON_OUTPUTS", True)


@pytest.fixture
def launched(monkeypatch):
    """How each pass the launcher made ran: a list of (kernel, plan kind, mode)."""
    passes = []
    original = launch._record
    monkeypatch.setattr(launch, "_record", lambda *a: passes.append((a[0], a[1].kind, a[2])) or original(*a))
    return passes


@pytest.fixture
def one_group_exchange(monkeypatch):
    """The split kernels with their exchange on, as one 8-unit group per batch group (H <= 8): each program then
    waits on its own flag, which the interpreter can run. Single-program kernels are switched off for it."""
    monkeypatch.setattr(planning, "SINGLE_MAX_PAD", dict.fromkeys(planning.SINGLE_MAX_PAD, 0))
    monkeypatch.setattr(planning, "host_stepped", lambda: False)  # what the plan and the launcher both read
    monkeypatch.setattr(planning, "_multiprocessors", lambda device: 1 << 10)


def random_problem(steps, batch, hidden, proj, dtype, with_lengths, scale=0.4):
    out_size = proj or hidden
    problem = {
        "xw": torch.randn(steps, batch, 4 * hidden) * 1.5,
        "h0": torch.randn(batch, out_size),
        "c0": torch.randn(batch, hidden),
        "w_hh": torch.randn(4 * hidden, out_size) * scale,
        "w_hr": torch.randn(proj, hidden) * scale if proj else None,
    }
    problem = {k: None if v is None else v.to(dtype) for k, v in problem.items()}
    problem["lengths"] = torch.randint(1, steps + 1, (batch,)) if with_lengths else None
    if with_lengths:
        problem["lengths"][0] = steps  # the longest sequence defines T, as for a PackedSequence
    grads = {
        "grad_out": torch.randn(steps, batch, out_size).to(dtype),
        "grad_hn": torch.randn(batch, out_size).to(dtype),
        "grad_cn": torch.randn(batch, hidden).to(dtype),
    }
    return problem, grads


def run_backend(backend, problem, grads, reverse):
    restarts = {} if problem.get("restarts") is None else {"restarts": problem["restarts"]}
    telemetry = Telemetry(1, 1)
    probe = telemetry.probe(0, 0, telemetry.begin_pass(torch.device("cpu"), problem["xw"].shape[0]))
    fwd = backend.recurrence_forward(
        problem["xw"],
        problem["h0"],
        problem["c0"],
        problem["w_hh"],
        problem["w_hr"],
        problem["lengths"],
        reverse,
        probe.forward,
        **restarts,
    )
    bwd = backend.recurrence_backward(
        grads["grad_out"],
        grads["grad_hn"],
        grads["grad_cn"],
        problem["c0"],
        fwd.saved,
        problem["w_hh"],
        problem["w_hr"],
        problem["lengths"],
        reverse,
        probe.backward,
        **restarts,
    )
    return fwd, bwd, telemetry.snapshot()


def assert_same_telemetry(kernel, ref, tol):
    k, r = kernel.layers[0], ref.layers[0]
    assert k.elements == r.elements
    for gate in "ifgo":
        # A value within rounding of a threshold may land on either side: allow one element per gate.
        assert round(abs(k.gate_saturation[gate] - r.gate_saturation[gate]) * r.elements) <= 1, gate
    assert k.forget_gate_mean == pytest.approx(r.forget_gate_mean, rel=tol)
    assert k.cell_absmax == pytest.approx(r.cell_absmax, rel=tol)
    assert (k.backward_passes == r.backward_passes).all()
    assert rel_err(torch.from_numpy(k.grad_norm_per_step), torch.from_numpy(r.grad_norm_per_step)) <= tol
    assert rel_err(torch.from_numpy(k.cell_grad_norm_per_step), torch.from_numpy(r.cell_grad_norm_per_step)) <= tol
    assert kernel.first_nonfinite == ref.first_nonfinite
    assert kernel.launches == ref.launches


def assert_matches_reference(problem, grads, reverse, tol):
    k_fwd, k_bwd, k_tel = run_backend(launch, problem, grads, reverse)
    r_fwd, r_bwd, r_tel = run_backend(reference, problem, grads, reverse)
    for name in ("out", "h_n", "c_n"):
        assert rel_err(getattr(k_fwd, name), getattr(r_fwd, name)) <= tol, name
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
        assert rel_err(actual, expected) <= tol, name
    assert_same_telemetry(k_tel, r_tel, tol)


# ---- every kernel family against the reference ----

FAMILIES = {
    # name: (steps, batch, hidden, proj) exercising that family's edges
    "single": (4, 18, 20, 0),
    "single-proj": (3, 5, 20, 12),
    "split": (4, 18, 72, 0),
    "streaming": (3, 5, 72, 20),
}


@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_matches_reference(launched, family, reverse, with_lengths):
    steps, batch, hidden, proj = FAMILIES[family]
    problem, grads = random_problem(steps, batch, hidden, proj, torch.float32, with_lengths)
    assert_matches_reference(problem, grads, reverse, tolerance(torch.float32))
    kind = family.split("-")[0]
    mode = {"single": "single", "split": "host-stepped", "streaming": "streaming"}[kind]
    assert launched == [("forward", kind, mode), ("backward", kind, mode)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["single-proj", "split"])
def test_half_precision_matches_reference(launched, family, dtype):
    steps, _batch, hidden, proj = FAMILIES[family]
    problem, grads = random_problem(steps, 5, hidden, proj, dtype, with_lengths=True)
    assert_matches_reference(problem, grads, reverse=True, tol=tolerance(dtype))
    assert {kind for _, kind, _ in launched} == {family.split("-")[0]}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_split_kernels_with_their_exchange_on(launched, one_group_exchange, reverse):
    problem, grads = random_problem(4, 18, 8, 0, torch.float32, with_lengths=True)
    assert_matches_reference(problem, grads, reverse, tolerance(torch.float32))
    assert launched == [("forward", "split", "cooperative"), ("backward", "split", "cooperative")]


@triton.jit
def _wait_kernel(flags_ptr, producers, steps_needed, MAX_PRODUCERS: tl.constexpr):
    exchange.wait_for(flags_ptr, 0, producers, steps_needed, MAX_PRODUCERS, False)


@pytest.mark.parametrize(
    "flags,aborted_after",
    [([0, 3, 4], 0), ([0, 3, 2], 1), ([7, 0, 0], 7)],
    ids=["flags-up", "one-producer-behind-times-out", "already-aborted"],
)
def test_a_wait_returns_and_a_wait_that_times_out_raises_the_abort_word(monkeypatch, flags, aborted_after):
    # exchange.py's wait, alone: two producers, three steps needed. It returns once every flag is up, or once the
    # abort word is raised: by itself after WAIT_POLLS polls (to 1), or before it (any nonzero value, left as it is).
    monkeypatch.setattr(exchange, "WAIT_POLLS", 5)
    words = torch.tensor(flags, dtype=torch.int32)
    _wait_kernel[(1,)](words, 2, 3, MAX_PRODUCERS=4)
    assert words.tolist() == [aborted_after, *flags[1:]]


class GridSpy:
    """Stands in for a kernel and notes the grid of every launch it is asked for."""

    def __init__(self, kernel, name, grids):
        self.kernel, self.name, self.grids = kernel, name, grids

    def __getitem__(self, grid):
        self.grids.append((self.name, grid))
        return self.kernel[grid]


def test_split_batch_groups_run_in_slices_when_their_grid_exceeds_the_device(monkeypatch, one_group_exchange):
    # One program resident at a time: each of the three batch groups (18 sequences, 8 per fp32 program) gets its own
    # cooperative launch, and outputs, gradients and telemetry still match the reference.
    monkeypatch.setattr(planning, "_multiprocessors", lambda device: 1)
    grids = []
    for stage in ("forward", "backward"):
        name = f"lstm_split_{stage}_kernel"
        monkeypatch.setattr(launch, name, GridSpy(getattr(launch, name), stage, grids))
    problem, grads = random_problem(4, 18, 8, 0, torch.float32, with_lengths=True)
    assert_matches_reference(problem, grads, reverse=False, tol=tolerance(torch.float32))
    assert grids == [("forward", (1, 1))] * 3 + [("backward", (1, 1))] * 3


def test_plan_slices_the_batch_only_where_the_grid_exceeds_the_device():
    fits = planning.plan_for(1024, 1024, 16, torch.bfloat16, max_programs=132, gluon=True).config
    sliced = planning.plan_for(1024, 1024, 64, torch.bfloat16, max_programs=132, gluon=True, stage="backward").config
    assert (fits.unit_groups, fits.batch_groups, fits.launches) == (128, 1, 1)
    assert (sliced.batch_groups, sliced.batch_groups_per_launch, sliced.launches) == (4, 1, 4)
    wide = planning.plan_for(256, 256, 64, torch.bfloat16, max_programs=132, gluon=True).config
    assert (wide.unit_groups, wide.batch_groups_per_launch, wide.launches) == (32, 4, 1)
    # Not even one batch group's programs fit: no split plan.
    assert planning.plan_for(1024, 1024, 16, torch.bfloat16, max_programs=64, gluon=True).kind == "streaming"


def test_plan_widens_the_gluon_batch_tile_only_where_it_saves_launches():
    def plan(hidden, batch, gluon=True, stage="forward"):
        chosen = planning.plan_for(hidden, hidden, batch, torch.bfloat16, max_programs=132, gluon=gluon, stage=stage)
        return chosen.config

    wide = planning.GLUON_WIDE_BLOCK_B
    for stage in ("forward", "backward"):
        # 64 unit groups x 4 batch groups of 16 would need two launches; 2 groups of 32 sequences fit in one.
        assert (plan(512, 64, stage=stage).block_b, plan(512, 64, stage=stage).launches) == (wide, 1)
        assert (plan(512, 128, stage=stage).block_b, plan(512, 128, stage=stage).launches) == (wide, 2)
        # Already one launch with 16 sequences a program: the narrow tile, whose steps move half the data.
        assert (plan(256, 64, stage=stage).block_b, plan(512, 32, stage=stage).block_b) == (16, 16)
        # Not at unaligned sizes, not for the tl twins.
        assert (plan(500, 64, stage=stage).block_b, plan(512, 64, gluon=False, stage=stage).block_b) == (8, 16)
    # Past a 512 pad only the forward takes it (GLUON_WIDE_MAX_PAD): at H=1024, B=64 two forward launches, four
    # backward ones.
    assert [(plan(h, 64).block_b, plan(h, 64).launches) for h in (768, 1024)] == [(wide, 2)] * 2
    assert [(plan(h, 64, stage="backward").block_b, plan(h, 64, stage="backward").launches) for h in (768, 1024)] == [
        (16, 4)
    ] * 2


def test_plan_narrows_fp32_split_programs_past_their_register_budget():
    # fp32 programs take 4 units past a 128 pad (planning.SPLIT_NARROW_UNITS), 16-bit ones 8; exact fp32 splits up
    # to a 512 pad in a cooperative launch at aligned sizes, up to 256 host-stepped or unaligned, and streams past.
    def split_of(hidden, dtype):
        chosen = planning.plan_for(hidden, hidden, 16, dtype, max_programs=132, gluon=True)
        return chosen.kind, chosen.config.units if chosen.kind == "split" else None

    assert split_of(128, torch.float32) == ("split", 8)
    assert split_of(129, torch.float32) == ("split", 4)
    assert split_of(256, torch.float32) == ("split", 4)
    assert planning.plan_for(256, 256, 16, torch.float32, max_programs=132).config.unit_groups == 64
    assert split_of(257, torch.float32) == ("streaming", None)  # unaligned
    assert split_of(512, torch.float32) == ("split", 4)
    assert planning.plan_for(512, 512, 16, torch.float32, max_programs=None).kind == "streaming"  # host-stepped
    assert split_of(513, torch.float32) == ("streaming", None)
    assert split_of(256, torch.bfloat16) == ("split", 8)
    # TF32 dots take fewer registers: fp32 layers up to a 512 pad split where TF32 is allowed.
    tf32 = planning.plan_for(512, 512, 16, torch.float32, max_programs=132, precision="tf32")
    assert (tf32.kind, tf32.config.units, tf32.config.unit_groups) == ("split", 4, 128)
    assert planning.plan_for(513, 513, 16, torch.float32, max_programs=132, precision="tf32").kind == "streaming"


@pytest.mark.parametrize(
    ("reverse", "with_lengths"), [(False, False), (True, True)], ids=["forward", "reverse-lengths"]
)
def test_narrow_fp32_split_programs_match_reference(monkeypatch, launched, reverse, with_lengths):
    # The 4-unit programs at a size the interpreter runs quickly: narrowing moved down to a 64 pad, H=70 is 18
    # programs of 4 units, the last one ragged (two of its units past H).
    monkeypatch.setattr(planning, "SPLIT_NARROW_ABOVE_PAD", {**planning.SPLIT_NARROW_ABOVE_PAD, torch.float32: 64})
    assert planning.plan_for(70, 70, 5, torch.float32, max_programs=None).config.units == 4
    problem, grads = random_problem(3, 5, 70, 0, torch.float32, with_lengths)
    assert_matches_reference(problem, grads, reverse, tolerance(torch.float32))
    assert launched == [("forward", "split", "host-stepped"), ("backward", "split", "host-stepped")]


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_launch_plans_fp32_by_its_dot_precision(monkeypatch, launched, allow_tf32):
    # The launcher hands torch's TF32 setting to the plan: the limits moved down so that H=72 (a 128 pad) is past
    # exact fp32's split limit and within TF32's.
    monkeypatch.setattr(planning, "SPLIT_MAX_PAD", {**planning.SPLIT_MAX_PAD, torch.float32: 64})
    monkeypatch.setattr(planning, "SPLIT_MAX_PAD_TF32", 128)
    problem, grads = random_problem(2, 3, 72, 0, torch.float32, with_lengths=False)
    previous = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot restore it
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        assert_matches_reference(problem, grads, False, tolerance(torch.float32))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    kind = "split" if allow_tf32 else "streaming"
    assert [k for _, k, _ in launched] == [kind, kind]


def test_hidden_sizes_on_every_pad_boundary(launched):
    # 16 (one exact pad), 17 (a 32 pad with one real unit past 16), 64 (the single kernel's widest), 65 (the first
    # split size): the ragged edges of each layout, and the switch between the two kernels.
    for hidden in (16, 17, 64, 65):
        problem, grads = random_problem(2, 3, hidden, 0, torch.float32, with_lengths=False)
        assert_matches_reference(problem, grads, reverse=False, tol=tolerance(torch.float32))
    kinds = [kind for stage, kind, _ in launched if stage == "forward"]
    assert kinds == ["single", "single", "split", "split"]


def test_module_with_triton_backend_matches_nn_lstm(launched):
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
        loss = (
            (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum() + h_n.sum() + c_n.pow(2).sum()
        )
        grads = torch.autograd.grad(loss, [h0, c0, *model.parameters()])
        outputs.append((out.data, h_n, c_n, *grads))
    for name, expected, actual in zip(["out", "h_n", "c_n", "h0", "c0", "params"], outputs[0], outputs[1]):
        assert rel_err(actual, expected) <= 1e-5, name
    assert len(launched) == 8


def test_split_module_matches_nn_lstm(launched):
    ref = nn.LSTM(5, 40, num_layers=2, bidirectional=True)
    fast = fastlstm.LSTM(5, 40, num_layers=2, bidirectional=True, backend="triton")
    fast.load_state_dict(ref.state_dict())
    packed = pack_sequence([torch.randn(n, 5) for n in (4, 2, 3)], enforce_sorted=False)
    results = []
    for model in (ref, fast):
        out, (h_n, c_n) = model(packed)
        loss = (out.data * torch.linspace(-1, 1, out.data.numel()).view_as(out.data)).sum() + c_n.pow(2).sum()
        results.append((out.data, h_n, c_n, *torch.autograd.grad(loss, list(model.parameters()))))
    for expected, actual in zip(*results):
        assert rel_err(actual, expected) <= 1e-5
    assert {kind for _, kind, _ in launched} == {"split"}


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


# ---- restarts (state resets inside the loop) ----

# Every family takes restarts (the split kernels in their tl form, which is what the interpreter runs).
RESTART_FAMILIES = {"single": "single", "single-proj": "single", "streaming": "streaming", "split": "split"}


@pytest.mark.parametrize("with_lengths", [False, True], ids=["padded", "lengths"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("family", list(RESTART_FAMILIES))
def test_restarts_match_reference(launched, family, reverse, with_lengths):
    steps, batch, hidden, proj = FAMILIES[family]
    problem, grads = random_problem(steps, min(batch, 9), hidden, proj, torch.float32, with_lengths)
    problem["restarts"] = random_resets(steps, min(batch, 9))
    assert_matches_reference(problem, grads, reverse, tolerance(torch.float32))
    assert {kind for _, kind, _ in launched} == {RESTART_FAMILIES[family]}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_restarts_in_split_kernels_with_their_exchange_on(launched, one_group_exchange, reverse):
    problem, grads = random_problem(4, 18, 8, 0, torch.float32, with_lengths=True)
    problem["restarts"] = random_resets(4, 18)
    assert_matches_reference(problem, grads, reverse, tolerance(torch.float32))
    assert launched == [("forward", "split", "cooperative"), ("backward", "split", "cooperative")]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("family", ["single-proj", "split"])
def test_restarts_in_half_precision_match_reference(family, dtype):
    steps, _batch, hidden, proj = FAMILIES[family]
    problem, grads = random_problem(steps, 5, hidden, proj, dtype, with_lengths=True)
    problem["restarts"] = random_resets(steps, 5)
    assert_matches_reference(problem, grads, reverse=True, tol=tolerance(dtype))


def test_all_false_restarts_give_the_bits_of_none(launched):
    for family in ("single-proj", "split", "streaming"):
        _steps, _batch, hidden, proj = FAMILIES[family]
        problem, grads = random_problem(3, 3, hidden, proj, torch.float32, with_lengths=True)
        without = run_backend(launch, problem, grads, reverse=False)
        problem["restarts"] = torch.zeros(3, 3, dtype=torch.bool)
        with_false = run_backend(launch, problem, grads, reverse=False)
        for a, b in ((without[0], with_false[0]), (without[1], with_false[1])):
            for x, y in zip(a, b):
                for u, v in zip(*((x, y) if isinstance(x, tuple) else ((x,), (y,)))):
                    assert (u is None and v is None) or torch.equal(u, v)
        assert without[2].to_dict() == with_false[2].to_dict()


def test_a_kernel_without_restarts_refuses_them_loudly(monkeypatch):
    """The Gluon split kernels do not take restarts: the plan runs their tl twins for such a pass, and a plan that
    chose them would fail with fastlstm's own error instead of running them without the restarts."""
    steps, batch, hidden, _ = FAMILIES["split"]
    with_restarts = planning.plan_for(hidden, hidden, batch, torch.bfloat16, 132, gluon=True, restarts=True)
    gluon_plan = planning.plan_for(hidden, hidden, batch, torch.bfloat16, 132, gluon=True)
    assert (with_restarts.kind, with_restarts.implementation) == ("split", "tl")
    assert (gluon_plan.kind, gluon_plan.implementation) == ("split", "gluon")
    monkeypatch.setattr(planning, "plan", lambda *args, **kwargs: gluon_plan)
    problem, grads = random_problem(steps, batch, hidden, 0, torch.bfloat16, with_lengths=False)
    problem["restarts"] = random_resets(steps, batch)
    with pytest.raises(NotImplementedError, match=r"split \(gluon\) kernels do not take restarts"):
        run_backend(launch, problem, grads, reverse=False)


def test_module_with_resets_on_the_kernels_matches_nn_lstm_per_episode(launched):
    ref = nn.LSTM(3, 12, num_layers=2, bidirectional=True, proj_size=5, dtype=torch.float64)
    fast = fastlstm.LSTM(3, 12, num_layers=2, bidirectional=True, proj_size=5, batch_first=True, backend="triton")
    fast.load_state_dict(ref.state_dict())
    steps, batch = 5, 3
    hx = (torch.randn(4, batch, 5, dtype=torch.float64), torch.randn(4, batch, 12, dtype=torch.float64))
    x = torch.randn(steps, batch, 3, dtype=torch.float64)
    assert_resets_parity(fast, ref, x, hx, random_resets(steps, batch), 1e-5, lengths=[5, 2, 4])
    assert {kind for _, kind, _ in launched} == {"single"}


def test_split_module_with_resets_matches_nn_lstm_per_episode(launched):
    ref = nn.LSTM(3, 40, bidirectional=True, dtype=torch.float64)
    fast = fastlstm.LSTM(3, 40, bidirectional=True, backend="triton")
    fast.load_state_dict(ref.state_dict())
    hx = (torch.randn(2, 3, 40, dtype=torch.float64), torch.randn(2, 3, 40, dtype=torch.float64))
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    assert_resets_parity(fast, ref, x, hx, random_resets(4, 3), 1e-5)
    assert {kind for _, kind, _ in launched} == {"split"}


def test_module_telemetry_with_resets_equals_reference_backend():
    models = {b: fastlstm.LSTM(3, 9, bidirectional=True, backend=b) for b in ("triton", "reference")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    x = torch.randn(6, 4, 3)
    resets = random_resets(6, 4)
    snapshots = {}
    for name, model in models.items():
        out, _ = model(x, resets=resets)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        snapshots[name] = model.telemetry.snapshot()
    for k_layer, r_layer in zip(snapshots["triton"].layers, snapshots["reference"].layers):
        assert k_layer.elements == r_layer.elements
        assert (
            rel_err(torch.from_numpy(k_layer.grad_norm_per_step), torch.from_numpy(r_layer.grad_norm_per_step)) < 1e-5
        )
        assert (
            rel_err(
                torch.from_numpy(k_layer.cell_grad_norm_per_step), torch.from_numpy(r_layer.cell_grad_norm_per_step)
            )
            < 1e-5
        )


# ---- where the first non-finite value arose ----


def assert_first_nonfinite_like_reference(problem, grads, stage):
    for reverse in (False, True):
        k_tel = run_backend(launch, problem, grads, reverse)[2]
        r_tel = run_backend(reference, problem, grads, reverse)[2]
        assert k_tel.first_nonfinite == r_tel.first_nonfinite
        assert k_tel.first_nonfinite.stage == stage


@pytest.mark.parametrize("family", list(FAMILIES))
def test_nonfinite_located_like_reference(family):
    steps, _batch, hidden, proj = FAMILIES[family]
    problem, grads = random_problem(steps, 3, hidden, proj, torch.float32, with_lengths=False)
    grads["grad_out"][2, 1, 3] = float("inf")
    assert_first_nonfinite_like_reference(problem, grads, "backward")
    problem["xw"][1, 2, hidden + 3] = float("nan")  # a forget-gate input
    assert_first_nonfinite_like_reference(problem, grads, "forward")


def test_nonfinite_in_the_initial_cell_state_is_located_like_reference():
    problem, grads = random_problem(3, 3, 72, 0, torch.float32, with_lengths=False)
    problem["c0"][1, 5] = float("inf")
    assert_first_nonfinite_like_reference(problem, grads, "forward")


# ---- weights read from memory once per launch, not once per step ----


@pytest.fixture
def reads_of(monkeypatch):
    """reads_of(tensor) -> the number of elements of `tensor` that kernel loads have read so far."""
    counts = {}
    original = triton.runtime.interpreter.InterpreterBuilder.create_masked_load

    def counting_load(self, ptrs, mask, *args):
        for key, (start, end) in watched.items():
            inside = (ptrs.data >= start) & (ptrs.data < end) & mask.data
            counts[key] = counts.get(key, 0) + int(inside.sum())
        return original(self, ptrs, mask, *args)

    watched = {}
    monkeypatch.setattr(triton.runtime.interpreter.InterpreterBuilder, "create_masked_load", counting_load)

    def reads(tensor):
        key = id(tensor)
        watched.setdefault(key, (tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()))
        return counts.get(key, 0)

    return reads


# (batch, hidden, proj) of each single-launch path: the split kernels as one unit group per batch group.
SINGLE_LAUNCH_SHAPES = {
    "single": (18, 20, 0),
    "single-proj": (5, 20, 12),
    "split": (18, 8, 0),
    "streaming": (5, 72, 20),
}


@pytest.mark.parametrize("family", list(SINGLE_LAUNCH_SHAPES))
def test_weights_are_read_once_per_launch_whatever_the_length(request, reads_of, family):
    """A resident kernel reads W_hh (and W_hr) the same number of times for 2 steps as for 6: once per program,
    before its time loop. The streaming kernels, which re-read them every step, are the control that shows the
    count is live."""
    if family == "split":
        request.getfixturevalue("one_group_exchange")
    batch, hidden, proj = SINGLE_LAUNCH_SHAPES[family]
    per_length = []
    for steps in (2, 6):
        problem, _ = random_problem(steps, batch, hidden, proj, torch.float32, with_lengths=False)
        weights = [problem["w_hh"]] + ([problem["w_hr"]] if proj else [])
        for w in weights:
            reads_of(w)
        launch.recurrence_forward(**_forward_args(problem), reverse=False)
        per_length.append(sum(reads_of(w) for w in weights))
    if family == "streaming":
        assert per_length[1] > 2 * per_length[0]
    else:
        assert per_length[0] == per_length[1] > 0


def test_telemetry_off_gives_identical_results():
    for hidden in (8, 40):  # single and split kernels
        problem, _grads = random_problem(3, 4, hidden, 0, torch.float32, with_lengths=True)
        off = launch.recurrence_forward(**_forward_args(problem), reverse=False, probe=None)
        telemetry = Telemetry(1, 1)
        probe = telemetry.probe(0, 0, telemetry.begin_pass(torch.device("cpu"), 3))
        on = launch.recurrence_forward(**_forward_args(problem), reverse=False, probe=probe.forward)
        assert torch.equal(off.out, on.out)
        assert torch.equal(off.saved[1], on.saved[1])


def _forward_args(problem):
    return {k: problem[k] for k in ("xw", "h0", "c0", "w_hh", "w_hr", "lengths")}


# ---- bad inputs to the kernel path ----


def test_float64_is_refused_with_a_clear_error():
    model = fastlstm.LSTM(3, 4, backend="triton").double()
    with pytest.raises(TypeError, match="float64"):
        model(torch.randn(2, 1, 3, dtype=torch.float64))


def test_non_contiguous_inputs_give_correct_results():
    problem, _grads = random_problem(3, 4, 8, 0, torch.float32, with_lengths=False)
    strided = dict(problem)
    strided["xw"] = problem["xw"].transpose(0, 1).contiguous().transpose(0, 1)
    strided["w_hh"] = problem["w_hh"].t().contiguous().t()
    expected = reference.recurrence_forward(**_forward_args(problem), reverse=False)
    actual = launch.recurrence_forward(**_forward_args(strided), reverse=False)
    assert not strided["xw"].is_contiguous()
    assert rel_err(actual.out, expected.out) <= 1e-6


def test_stride_zero_output_gradient_from_sum_backward():
    ref = nn.LSTM(3, 6)
    fast = fastlstm.LSTM(3, 6, backend="triton")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(4, 2, 3)
    grads = []
    for model in (ref, fast):
        model(x)[0].sum().backward()  # the output gradient arrives as an expanded, stride-0 tensor
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[1], grads[0]) <= 1e-5


def test_out_of_range_lengths_are_clamped_not_read_out_of_bounds():
    problem, _ = random_problem(3, 4, 8, 0, torch.float32, with_lengths=False)
    args = _forward_args(problem)
    full = launch.recurrence_forward(**args, reverse=False)
    too_long = launch.recurrence_forward(**{**args, "lengths": torch.full((4,), 99)}, reverse=False)
    assert torch.equal(too_long.out, full.out)
    negative = launch.recurrence_forward(**{**args, "lengths": torch.full((4,), -5)}, reverse=False)
    assert torch.equal(negative.h_n, problem["h0"])  # no step ran: the state is the initial one
    assert torch.equal(negative.out, torch.zeros_like(negative.out))


# ---- the Gluon split kernels (GPU only: Gluon does not run under the interpreter) ----


def test_gluon_split_kernels_take_exactly_their_tl_twins_arguments():
    """The launcher passes the same arguments to either implementation of the split kernels, and to the Gluon
    backward its copy slots (planning.gluon_copy_slots); the switches their heuristics derive are the twin's, plus
    ALIGNED in the Gluon kernels (whether their asynchronous copies apply)."""
    from fastlstm.kernels import backward, forward, split_gluon_backward, split_gluon_forward

    pairs = [
        (split_gluon_forward.lstm_split_forward_gluon_kernel, forward.lstm_split_forward_kernel, []),
        (split_gluon_backward.lstm_split_backward_gluon_kernel, backward.lstm_split_backward_kernel, ["COPY_SLOTS"]),
    ]
    for gluon_kernel, twin, own in pairs:

        def passed(kernel):
            return [name for name in kernel.fn.arg_names if name not in kernel.values]

        assert [name for name in passed(gluon_kernel) if name not in own] == passed(twin)
        assert set(own) <= set(passed(gluon_kernel))
        assert set(gluon_kernel.values) == set(twin.values) | {"ALIGNED"}


def test_the_gluon_backward_stages_as_many_gates_as_the_device_has_shared_memory_for():
    def plan(hidden, batch, device, stage="backward"):
        shared = planning.SHARED_BYTES[device]
        return planning.plan_for(
            hidden, hidden, batch, torch.bfloat16, max_programs=132, gluon=True, stage=stage, shared_bytes=shared
        )

    slots = {device: plan(1024, 16, device).config.copy_slots for device in ("sm_90", "sm_80")}
    assert slots == {"sm_90": 4, "sm_80": 2}
    assert [plan(512, 16, d).config.copy_slots for d in ("sm_90", "sm_80", "sm_86")] == [4, 4, 3]
    # No slot fits beside 64 KiB of weights in 99 KiB at 16 sequences a program: the tl twin takes that backward.
    assert plan(1024, 16, "sm_86").implementation == "tl"
    assert plan(1024, 16, "sm_86", stage="forward").implementation == "gluon"
    # Unaligned sizes go through registers; the forward has no slots to size.
    assert plan(1000, 16, "sm_90").config.copy_slots == 0 and plan(1024, 16, "sm_90", "forward").config.copy_slots == 0
    # That what the count leaves fits each device is the AOT matrix's check (a variant's shared_limit, kernels/aot.py).


@pytest.mark.parametrize(
    "capability,shared,expected", [((8, 6), 99 * 1024, ("tl", 0)), ((9, 0), 227 * 1024, ("gluon", 4))], ids=str
)
def test_the_launchers_plan_reads_the_devices_shared_memory(monkeypatch, capability, shared, expected):
    # What planning.plan asks of a GPU, stood in for: its architecture, SM count and shared memory per program.
    monkeypatch.setattr(planning, "interpreting", lambda: False)
    monkeypatch.setattr(planning, "host_stepped", lambda: False)
    monkeypatch.setattr(planning, "_capability", lambda device: capability)
    monkeypatch.setattr(planning, "_multiprocessors", lambda device: 132)
    monkeypatch.setattr(planning, "_shared_bytes", lambda device: shared)
    chosen = planning.plan(1024, 1024, 16, torch.bfloat16, torch.device("cuda"), stage="backward")
    assert (chosen.implementation, chosen.config.copy_slots) == expected


def test_a_kernel_option_set_but_empty_means_its_default(monkeypatch):
    monkeypatch.setenv("FASTLSTM_KERNELS", "")
    assert planning._option("FASTLSTM_KERNELS", "auto", ("auto", "streaming")) == "auto"
    monkeypatch.setenv("FASTLSTM_KERNELS", "bogus")
    with pytest.raises(ValueError, match="FASTLSTM_KERNELS must be one of"):
        planning._option("FASTLSTM_KERNELS", "auto", ("auto", "streaming"))


def test_plan_takes_gluon_only_on_a_gpu_for_16_bit_storage(monkeypatch):
    on_gpu = {
        dtype: planning.plan_for(512, 512, 16, dtype, max_programs=132, gluon=True).implementation
        for dtype in (torch.float16, torch.bfloat16, torch.float32)
    }
    assert on_gpu == {torch.float16: "gluon", torch.bfloat16: "gluon", torch.float32: "tl"}
    assert planning.plan_for(512, 512, 16, torch.bfloat16, max_programs=None, gluon=False).implementation == "tl"
    monkeypatch.setattr(planning, "KERNELS", "tl")
    assert planning.plan_for(512, 512, 16, torch.bfloat16, max_programs=132, gluon=True).implementation == "tl"
    # Here, under the interpreter, the launcher never plans Gluon.
    assert planning.plan(512, 512, 16, torch.bfloat16, torch.device("cpu")).implementation == "tl"
