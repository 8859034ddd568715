"""The CPU's recording route (fastlstm/native_recorded.py): under backend="auto" a pass that records telemetry runs
PyTorch's own LSTM op layer by layer and rebuilds the telemetry and the backward's state from its outputs.

Held to three independent references: nn.LSTM in the same dtype (outputs and final states to the bit: the op is the
same), nn.LSTM through autograd (every gradient, float64 and float32 budgets), and the telemetry tests' own float64
recomputation (tests/test_telemetry.py: every field, and the place of the first non-finite value on its injected
NaN/inf cases, which the reference backend meets too).
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import reference_telemetry, routing, scratch

try:
    from support import HostReadGuard, assert_module_parity, fast_like, leaf, make_pair, mixed_lengths, pack, tolerance
    from test_telemetry import (
        CONFIGS,
        NAN_CASES,
        Expected,
        _backward_with,
        _nan_case,
        assert_window,
        manual_pass,
        module_pass,
        random_pass_inputs,
    )
except ImportError:  # tests/ turned into a package
    from tests.support import (
        HostReadGuard,
        assert_module_parity,
        fast_like,
        leaf,
        make_pair,
        mixed_lengths,
        pack,
        tolerance,
    )
    from tests.test_telemetry import (
        CONFIGS,
        NAN_CASES,
        Expected,
        _backward_with,
        _nan_case,
        assert_window,
        manual_pass,
        module_pass,
        random_pass_inputs,
    )

ROUTE_NODE = "_NativeRecordedLayerBackward"
REFERENCE_NODE = "_LSTMLayerBackward"


@pytest.fixture(autouse=True)
def _native_recorded_for_float32_too(monkeypatch):
    """The route under test, for every pass it takes: the float32 passes that "auto" sends to the reference where
    its loops run the compiled step (routing.compiled_step_runs; tests/test_fused_step.py) stay on it here."""
    monkeypatch.setattr(routing, "compiled_step_runs", lambda dtype, shape: False)


INPUT, HIDDEN, PROJ, STEPS = 4, 5, 3, 6
CPU = torch.device("cpu")
pytestmark = [
    # nn.LSTM's own notice that oneDNN has no projections; it says nothing about fastlstm.
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
    pytest.mark.usefixtures("single_cpu_thread"),  # tiny models (support.one_cpu_thread)
]


def _auto(ref: nn.LSTM, **kwargs) -> fastlstm.LSTM:
    return fast_like(ref, backend="auto", **kwargs)


def _inputs(ref: nn.LSTM, kind: str, dtype, steps=STEPS, batch=4):
    """(leaf x, x -> module input, hx leaves) for kind "padded" | "packed" (unsorted lengths) | "unbatched"."""
    dirs = 2 if ref.bidirectional else 1
    real = ref.proj_size or ref.hidden_size
    lead = (ref.num_layers * dirs,) if kind == "unbatched" else (ref.num_layers * dirs, batch)
    hx = (leaf(torch.randn(*lead, real, dtype=dtype)), leaf(torch.randn(*lead, ref.hidden_size, dtype=dtype)))
    if kind == "unbatched":
        return leaf(torch.randn(steps, ref.input_size, dtype=dtype)), (lambda x: x), hx
    shape = (batch, steps, ref.input_size) if ref.batch_first else (steps, batch, ref.input_size)
    x = leaf(torch.randn(shape, dtype=dtype))
    if kind == "padded":
        return x, (lambda x: x), hx
    lengths = mixed_lengths(steps, batch, sorted_=False)
    return x, (lambda x: pack(x, lengths, ref.batch_first, enforce_sorted=False)), hx


def _outputs(module, x, hx):
    out, (h_n, c_n) = module(x, hx)
    return (out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out), h_n, c_n


def _no_grad_outputs(module, x, hx):
    """What the route's results equal to the bit: nn.LSTM's under torch.no_grad() (native_recorded.native_layer)."""
    with torch.no_grad():
        return _outputs(module, x, hx)


# ---- which route runs ----


def test_auto_records_through_the_native_route_on_the_cpu(monkeypatch):
    for dtype in routing.NATIVE_RECORDED_DTYPES:
        assert routing.choose("auto", CPU, dtype, records_telemetry=True) == routing.NATIVE_RECORDED
    for dtype in (torch.bfloat16, torch.float16):  # 16-bit stays on the reference
        assert routing.choose("auto", CPU, dtype, records_telemetry=True) == "reference"
    assert routing.choose("auto", CPU, torch.float32, records_telemetry=False) == "native"
    assert routing.choose("reference", CPU, torch.float32, records_telemetry=True) == "reference"
    with torch.autocast("cpu", dtype=torch.bfloat16):  # PyTorch's op fails under CPU autocast
        assert routing.choose("auto", CPU, torch.float32, records_telemetry=True) == "reference"
    monkeypatch.setattr(routing, "_triton_importable", lambda: True)
    cuda = torch.device("cuda")
    assert routing.choose("auto", cuda, torch.float32, records_telemetry=True) == "triton"
    assert not routing.native_records(cuda, torch.float64)  # CUDA float64 records on the reference


@pytest.mark.parametrize("backend,node", [("auto", ROUTE_NODE), ("reference", REFERENCE_NODE)])
def test_the_output_node_shows_the_route(backend, node):
    ref = nn.LSTM(INPUT, HIDDEN, 2)
    fast = fast_like(ref, backend=backend)
    x, to_input, hx = _inputs(ref, "padded", torch.float32)
    out, _, _ = _outputs(fast, to_input(x), hx)
    assert type(out.grad_fn).__name__ == node
    bf16 = fast_like(ref.to(torch.bfloat16), backend="auto")
    assert type(bf16(x.detach().bfloat16())[0].grad_fn).__name__ == REFERENCE_NODE


# ---- results: nn.LSTM's to the bit, gradients within the budgets ----

# nn.LSTM's options two at a time: every pair of values of any two options meets in some case (an orthogonal array
# of 8 runs for 6 two-valued options), plus everything at once. The reference backend covers the full product.
_PAIRWISE = ("000000", "000111", "011001", "011110", "101010", "101101", "110011", "110100", "111111")
GRID = [
    (b == "1", f == "1", d == "1", PROJ * (p == "1"), 1 + (n == "1"), ("padded", "packed")[k == "1"])
    for b, f, d, p, n, k in _PAIRWISE
]
GRID_IDS = [f"bias{int(b)}-bf{int(f)}-bi{int(d)}-proj{p}-L{n}-{k}" for b, f, d, p, n, k in GRID]


@pytest.mark.parametrize("bias,batch_first,bidirectional,proj_size,num_layers,kind", GRID, ids=GRID_IDS)
def test_option_grid(bias, batch_first, bidirectional, proj_size, num_layers, kind):
    """float32: outputs and final states are nn.LSTM's own (under no_grad: native_recorded.native_layer); every
    gradient within the float32 budget of nn.LSTM's, and in float64 within the float64 budget (the analytic
    backward's maths, not only its rounding)."""
    options = {"bias": bias, "batch_first": batch_first, "bidirectional": bidirectional, "proj_size": proj_size}
    ref = nn.LSTM(INPUT, HIDDEN, num_layers, **options)
    fast = _auto(ref)
    x, to_input, hx = _inputs(ref, kind, torch.float32)
    for got, want in zip(_outputs(fast, to_input(x), hx), _no_grad_outputs(ref, to_input(x), hx), strict=True):
        assert torch.equal(got, want)
    assert fast.telemetry.snapshot().launches == num_layers * (2 if bidirectional else 1)
    ref64 = copy.deepcopy(ref).double()
    x64, hx64 = leaf(x.detach().double()), tuple(leaf(t.detach().double()) for t in hx)
    assert_module_parity(_auto(ref64), ref64, x64, hx64, tolerance(torch.float64), to_input=to_input)
    assert_module_parity(fast, ref, x, hx, tolerance(torch.float32), to_input=to_input)


@pytest.mark.parametrize("kind", ["padded", "unbatched"])
def test_hx_none_and_unbatched_input(kind):
    ref = nn.LSTM(INPUT, HIDDEN, 2, proj_size=PROJ, bidirectional=True, batch_first=True)
    fast = _auto(ref)
    x, to_input, hx = _inputs(ref, kind, torch.float32)
    for state in (None, hx):
        for got, want in zip(
            _outputs(fast, to_input(x), state), _no_grad_outputs(ref, to_input(x), state), strict=True
        ):
            assert torch.equal(got, want)
        assert_module_parity(fast, ref, x, state, tolerance(torch.float32), to_input=to_input)


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_dropout_draws_nn_lstms_masks_where_nn_lstm_draws_them(kind):
    """The same masks from the same generator between the same layers (a packed input's on its packed data, as
    nn.LSTM's op draws them), so training with dropout gives nn.LSTM's outputs (under no_grad) to the bit and its
    gradients."""
    ref = nn.LSTM(INPUT, HIDDEN, 3, dropout=0.5, bidirectional=True).train()
    fast = _auto(ref)
    x, to_input, hx = _inputs(ref, kind, torch.float32)
    seed = int(torch.randint(0, 2**31, ()).item())
    results = []
    for run in (_no_grad_outputs, _outputs):
        torch.manual_seed(seed)
        results.append(run(ref if run is _no_grad_outputs else fast, to_input(x), hx))
    for got, want in zip(*reversed(results), strict=True):
        assert torch.equal(got, want)
    assert_module_parity(fast, ref, x, hx, tolerance(torch.float32), to_input=to_input, seed=seed)


def test_inference_that_records_gives_nn_lstms_inference_results():
    """A recording forward under no_grad: nn.LSTM's results to the bit, and its forward telemetry recorded."""
    ref = nn.LSTM(INPUT, HIDDEN, 2).eval()
    fast = _auto(ref)
    fast.telemetry.record_inference = True
    x = torch.randn(STEPS, 3, INPUT)
    with torch.no_grad():
        for got, want in zip(_outputs(fast, x, None), _outputs(ref, x, None), strict=True):
            assert torch.equal(got, want)
    snapshot = fast.telemetry.snapshot()
    assert snapshot.launches == 2 and snapshot.layers[0].elements == STEPS * 3 * HIDDEN


def test_double_backward_matches_nn_lstm():
    ref = nn.LSTM(INPUT, HIDDEN, 2, bidirectional=True, proj_size=PROJ, dtype=torch.float64)
    fast = _auto(ref)
    x, _, hx = _inputs(ref, "padded", torch.float64)
    grads = []
    for module in (ref, fast):
        module.zero_grad()
        out, (h_n, c_n) = module(x, hx)
        (grad_x,) = torch.autograd.grad((out**2).sum() + h_n.sum() + c_n.sum(), x, create_graph=True)
        (grad_x**2).sum().backward()
        grads.append([p.grad for p in module.parameters()])
    for got, want in zip(*reversed(grads), strict=True):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    # The second backward passes through the lower layer again (the upper layer's gradient graph depends on its
    # output): the reference backend records the same passes.
    spec = fast_like(ref)
    out, (h_n, c_n) = spec(x, hx)
    (grad_x,) = torch.autograd.grad((out**2).sum() + h_n.sum() + c_n.sum(), x, create_graph=True)
    (grad_x**2).sum().backward()
    for got, want in zip(fast.telemetry.snapshot().layers, spec.telemetry.snapshot().layers, strict=True):
        assert got.backward_passes.tolist() == want.backward_passes.tolist()
        assert got.grad_norm_per_step == pytest.approx(want.grad_norm_per_step, rel=1e-10)


def test_batch_size_zero():
    ref = nn.LSTM(INPUT, HIDDEN, 2, bidirectional=True)
    fast = _auto(ref)
    x = torch.randn(STEPS, 0, INPUT, requires_grad=True)
    shapes = []
    for module in (ref, fast):
        out, (h, c) = module(x)
        (out.sum() + h.sum() + c.sum()).backward()
        shapes.append((out.shape, h.shape, c.shape))
    assert shapes[0] == shapes[1] and fast.telemetry.snapshot().launches == 0


# ---- telemetry: every field, as the telemetry tests recompute it ----


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_telemetry_fields_match_recomputation(cfg, packed):
    ref, _ = make_pair(INPUT, HIDDEN, weight_scale=0.8, **CONFIGS[cfg])
    fast = _auto(ref)
    lengths = mixed_lengths(STEPS, 4, sorted_=False) if packed else None
    x, hx, weights = random_pass_inputs(ref, STEPS, 4)
    expected = Expected(len(fast.telemetry.snapshot().layers))
    manual_pass(ref, x, lengths, hx, weights, expected)
    module_pass(fast, x, lengths, hx, weights)
    snapshot = fast.telemetry.snapshot()
    assert_window(snapshot, expected, ref)
    assert snapshot.first_nonfinite is None and snapshot.launches == 2 * len(snapshot.layers)


def test_an_input_projection_that_is_finite_is_not_reported_as_the_nonfinite_value():
    # x = 2e38 times a candidate weight of 1: finite input projection, whose doubled candidate row (how both the
    # route and the reference compute tanh from the one sigmoid) overflows: the gates are the first non-finite
    # value on both, not the input.
    located = []
    for backend in ("auto", "reference"):
        lstm = fastlstm.LSTM(1, 1, backend=backend)
        with torch.no_grad():
            for p in lstm.parameters():
                p.zero_()
            lstm.weight_ih_l0[2, 0] = 1.0
        out, _ = lstm(torch.tensor([[[0.5]], [[2e38]], [[0.5]]]))
        out.sum().backward()
        located.append(lstm.telemetry.snapshot().first_nonfinite)
    assert located[0] == located[1]
    assert (located[0].timestep, located[0].stage, located[0].tensor) == (1, "forward", "gates")


def test_float32_telemetry_is_the_reference_backends():
    ref = nn.LSTM(8, 16, 2, bidirectional=True)
    auto, spec = _auto(ref), fast_like(ref)
    x, to_input, hx = _inputs(ref, "packed", torch.float32, steps=60, batch=6)
    for module in (auto, spec):
        out, h_n, c_n = _outputs(module, to_input(x), hx)
        (out.square().sum() + h_n.sum() + c_n.sum()).backward()
    budget = tolerance(torch.float32)
    for got, want in zip(auto.telemetry.snapshot().layers, spec.telemetry.snapshot().layers, strict=True):
        assert got.elements == want.elements
        assert got.gate_saturation == pytest.approx(want.gate_saturation, abs=1e-3)  # ulps at the thresholds
        assert got.forget_gate_mean == pytest.approx(want.forget_gate_mean, rel=budget)
        assert got.cell_absmax == pytest.approx(want.cell_absmax, rel=budget)
        assert got.grad_norm_per_step == pytest.approx(want.grad_norm_per_step, rel=budget)
        assert got.cell_grad_norm_per_step == pytest.approx(want.cell_grad_norm_per_step, rel=budget)


@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "counted-rows"])
def test_saturated_flags_are_counted_exactly_per_column(masked, monkeypatch):
    """The per-column count of 0/1 flags (reference_telemetry._per_column_count) against a plain integer count, over
    row slices shorter than the tensor, so that the slicing that keeps float32 sums exact is exercised."""
    monkeypatch.setattr(reference_telemetry, "_EXACT_ROWS", 64)
    flags = torch.rand(1000, 24) < torch.rand(24)  # a different rate per column
    counted = torch.rand(1000) < 0.7 if masked else None
    expected = (flags if counted is None else flags & counted.unsqueeze(1)).sum(dim=0).double()
    weights = torch.ones(1000) if counted is None else counted.float()
    assert torch.equal(reference_telemetry._per_column_count(flags.float(), weights), expected)


@pytest.mark.parametrize("name", NAN_CASES)
def test_first_nonfinite(name):
    """The telemetry tests' injected NaN/inf cases, with their expected records (which the reference meets)."""
    cfg, poison, grad_kind, expected = _nan_case(name)
    ref, _ = make_pair(INPUT, HIDDEN, **cfg)
    fast = _auto(ref)
    x, hx, _ = random_pass_inputs(ref, STEPS, 3)
    x = x.clone()
    out, (h_n, c_n) = fast(x, hx)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    assert fast.telemetry.snapshot().first_nonfinite is None
    if poison is not None:
        poison(fast, x, hx)
    out, (h_n, c_n) = fast(x, hx)
    assert type(out.grad_fn).__name__ == ROUTE_NODE
    if grad_kind is None:
        (out.sum() + h_n.sum() + c_n.sum()).backward()
    else:
        _backward_with(grad_kind, out, h_n, c_n)
    record = fast.telemetry.snapshot().first_nonfinite
    assert record is not None
    assert (record.layer, record.direction, record.timestep, record.stage, record.tensor) == expected


def test_first_nonfinite_packed_reverse():
    ref, _ = make_pair(INPUT, HIDDEN, bidirectional=True)
    fast = _auto(ref)
    x, hx, _ = random_pass_inputs(ref, 5, 3)
    with torch.no_grad():
        fast.weight_hh_l0_reverse[0, 0] = float("inf")
    fast(pack(x, [3, 5, 2], False, enforce_sorted=False), hx)
    r = fast.telemetry.snapshot().first_nonfinite
    assert (r.layer, r.direction, r.timestep, r.stage, r.tensor) == (0, 1, 4, "forward", "gates")


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_host_sync(packed):
    ref, _ = make_pair(INPUT, HIDDEN, num_layers=2, bidirectional=True, proj_size=PROJ)
    fast = _auto(ref)
    x, hx, _ = random_pass_inputs(ref, 5, 3)
    inp = pack(x, [3, 5, 2], False, enforce_sorted=False) if packed else x
    fast(inp, hx)
    with HostReadGuard() as guard:
        if packed:
            guard.allow(inp.batch_sizes)
        out, (h, c) = fast(inp, hx)
        data = out.data if packed else out
        ((data * torch.randn_like(data)).sum() + h.sum() + c.sum()).backward()
    assert guard.reads == [], f"host synchronisation in forward/backward: {guard.reads}"


def test_scratch_buffers_carry_nothing_from_one_pass_to_the_next():
    """The CPU passes' temporaries (fastlstm/scratch.py) outlive them: a pass after a longer and a shorter one, in
    another dtype and direction layout, gives the bits it gives with every buffer freed first, and the telemetry it
    records is the same."""
    ref = nn.LSTM(INPUT, HIDDEN, 2, bidirectional=True)

    def trained(module, steps, dtype=torch.float32):
        module = module.to(dtype)
        x = torch.randn(steps, 3, INPUT, dtype=dtype, generator=torch.Generator().manual_seed(steps))
        out, (h_n, c_n) = module(x)
        (out.square().sum() + h_n.sum() + c_n.sum()).backward()
        return [out.detach(), *(p.grad for p in module.parameters())], module.telemetry.snapshot()

    scratch.release()
    fresh, fresh_snapshot = trained(_auto(ref), STEPS)
    trained(_auto(ref), 3 * STEPS)
    trained(_auto(ref), 2, torch.float64)
    trained(_auto(nn.LSTM(INPUT, HIDDEN, 1)), STEPS - 1)
    again, snapshot = trained(_auto(ref), STEPS)
    assert all(torch.equal(a, b) for a, b in zip(fresh, again, strict=True))
    for got, want in zip(snapshot.layers, fresh_snapshot.layers, strict=True):
        for field in dataclasses.fields(got):
            assert np.array_equal(getattr(got, field.name), getattr(want, field.name)), field.name


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_pass_under_inference_mode_leaves_later_training_passes_working(backend):
    """A scratch buffer first allocated under torch.inference_mode must not be an inference tensor: every later
    pass of the thread, outside that mode, writes into it."""
    ref = nn.LSTM(INPUT, HIDDEN, dtype=torch.float64)
    evaluator = fast_like(ref, backend=backend)
    evaluator.telemetry.record_inference = True  # "auto" records, and so takes scratch, only when told to
    scratch.release()
    with torch.inference_mode():
        evaluator(torch.randn(STEPS, 4, INPUT, dtype=torch.float64))  # larger: the buffers are not reallocated
    x = leaf(torch.randn(STEPS, 3, INPUT, dtype=torch.float64))
    assert_module_parity(_auto(ref), ref, x)


def test_scratch_is_one_buffer_per_role_on_the_cpu_and_fresh_elsewhere():
    scratch.release()
    small = scratch.scratch("role", (2, 3), torch.float32, CPU)
    same = scratch.scratch("role", (3, 2), torch.float32, CPU)
    assert same.data_ptr() == small.data_ptr()
    assert scratch.scratch("other", (2, 3), torch.float32, CPU).data_ptr() != small.data_ptr()
    pre = scratch.scratch("pre", (2, 3), torch.float32, CPU)  # a forward's role takes a backward role's buffer
    assert pre.data_ptr() == scratch.scratch("grad_gates", (2, 3), torch.float32, CPU).data_ptr()
    assert scratch.scratch("role", (2, 3), torch.float64, CPU).dtype == torch.float64
    grown = scratch.scratch("role", (4, 5), torch.float32, CPU)
    assert grown.shape == (4, 5) and scratch.scratch("role", (2,), torch.float32, CPU).data_ptr() == grown.data_ptr()
    meta = torch.device("meta")
    assert scratch.scratch("role", (2, 3), torch.float32, meta).device == meta
    scratch.release()
    assert not scratch._BUFFERS.by_role
