"""Telemetry (docs/telemetry.md) field by field against an independent recomputation.

The expected values come from a per-sequence, per-step float64 loop over nn.LSTM's weights written here (it does
not use fastlstm.reference); ‖∂L/∂h_t‖ and ‖∂L/∂c_t‖ come from autograd through that loop (retain_grad on every h_t
and c_t: each is the one tensor feeding everything that depends on it, the output at t, step t+1 and the final state,
so its gradient is the total one).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pad_packed_sequence

import fastlstm

try:
    from support import HostReadGuard, fast_like, make_pair, mixed_lengths, pack
except ImportError:  # tests/ turned into a package
    from tests.support import HostReadGuard, fast_like, make_pair, mixed_lengths, pack

GATES = ("i", "f", "g", "o")
SIGMOID_LOW, SIGMOID_HIGH, TANH_HIGH = 0.05, 0.95, 0.95  # docs/telemetry.md
I, H, P = 4, 5, 3
F64 = torch.float64


# ---- the independent recomputation ----


class Expected:
    """Accumulates what docs/telemetry.md says a window should hold, from manual runs."""

    def __init__(self, slots):
        self.sat = np.zeros((slots, 4))
        self.elements = np.zeros(slots, dtype=np.int64)
        self.forget = np.zeros(slots)
        self.cell_absmax = np.zeros(slots)
        self.sumsq = [{} for _ in range(slots)]  # t -> summed squared norms of dL/dh_t over passes
        self.cell_sumsq = [{} for _ in range(slots)]  # t -> the same for dL/dc_t
        self.passes = [{} for _ in range(slots)]  # t -> number of passes

    def grad_norm(self, slot, cell=False):
        steps = max(self.passes[slot], default=-1) + 1
        sums = (self.cell_sumsq if cell else self.sumsq)[slot]
        return np.array([math.sqrt(sums[t] / self.passes[slot][t]) for t in range(steps)])

    def backward_passes(self, slot):
        steps = max(self.passes[slot], default=-1) + 1
        return np.array([self.passes[slot][t] for t in range(steps)])


def manual_pass(ref: nn.LSTM, x, lengths, hx, loss_weights, expected: Expected, backward=True):
    """Run the sequences of x ([T, B, I], time-major) one by one with nn.LSTM's equations in float64, add the
    window statistics to `expected` and return the loss (already backpropagated when backward=True)."""
    layers, dirs = ref.num_layers, 2 if ref.bidirectional else 1
    params = {n: p.detach().double().requires_grad_(True) for n, p in ref.named_parameters()}
    steps, batch = x.shape[0], x.shape[1]
    lengths = [steps] * batch if lengths is None else list(lengths)
    h0, c0 = (t.detach().double() for t in hx)
    w_out, w_h, w_c = (w.double() for w in loss_weights)
    hs = [[] for _ in range(layers * dirs)]  # (t, h_t tensor, c_t tensor)
    loss = 0.0
    for b in range(batch):
        n = lengths[b]
        layer_in = x[:n, b].double()
        for layer in range(layers):
            outs = []
            for d in range(dirs):
                slot = layer * dirs + d
                sfx = f"_l{layer}" + ("_reverse" if d else "")
                w_ih, w_hh, w_hr = params["weight_ih" + sfx], params["weight_hh" + sfx], params.get("weight_hr" + sfx)
                bias = params["bias_ih" + sfx] + params["bias_hh" + sfx] if ref.bias else 0.0
                h, c = h0[slot, b], c0[slot, b]
                out = [None] * n
                for t in range(n) if d == 0 else range(n - 1, -1, -1):
                    pre = w_ih @ layer_in[t] + w_hh @ h + bias
                    i, f, g, o = pre.chunk(4)
                    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
                    c = f * c + i * g
                    c.retain_grad()
                    h = o * torch.tanh(c)
                    if w_hr is not None:
                        h = w_hr @ h
                    h.retain_grad()
                    hs[slot].append((t, h, c))
                    out[t] = h
                    with torch.no_grad():
                        for k, act in enumerate((i, f, g, o)):
                            sat = act.abs() > TANH_HIGH if k == 2 else (act < SIGMOID_LOW) | (act > SIGMOID_HIGH)
                            expected.sat[slot, k] += int(sat.sum())
                        expected.elements[slot] += act.numel()
                        expected.forget[slot] += float(f.sum())
                        expected.cell_absmax[slot] = max(expected.cell_absmax[slot], float(c.abs().max()))
                outs.append(torch.stack(out))
                loss = loss + (h * w_h[slot, b]).sum() + (c * w_c[slot, b]).sum()
            layer_in = torch.cat(outs, dim=1)
        loss = loss + (layer_in * w_out[:n, b]).sum()
    if backward:
        loss.backward()
        for slot, entries in enumerate(hs):
            per_t, cell_per_t = {}, {}
            for t, h, c in entries:
                per_t[t] = per_t.get(t, 0.0) + float(h.grad.square().sum())
                cell_per_t[t] = cell_per_t.get(t, 0.0) + float(c.grad.square().sum())
            for t in range(steps):
                expected.sumsq[slot][t] = expected.sumsq[slot].get(t, 0.0) + per_t.get(t, 0.0)
                expected.cell_sumsq[slot][t] = expected.cell_sumsq[slot].get(t, 0.0) + cell_per_t.get(t, 0.0)
                expected.passes[slot][t] = expected.passes[slot].get(t, 0) + 1
    return loss


def module_pass(fast, x, lengths, hx, loss_weights, backward=True):
    """The same pass through fastlstm.LSTM: x [T, B, I] padded, packed (unsorted allowed) when lengths given."""
    inp = x if lengths is None else pack(x, lengths, False, enforce_sorted=False)
    out, (h_n, c_n) = fast(inp, hx)
    if lengths is not None:
        out, _ = pad_packed_sequence(out, total_length=x.shape[0])
    w_out, w_h, w_c = loss_weights
    loss = (out * w_out).sum() + (h_n * w_h).sum() + (c_n * w_c).sum()
    if backward:
        loss.backward()
    return loss


def random_pass_inputs(ref, steps, batch, scale=2.0):
    dirs = 2 if ref.bidirectional else 1
    slots, real = ref.num_layers * dirs, ref.proj_size or ref.hidden_size
    x = torch.randn(steps, batch, ref.input_size, dtype=F64) * scale
    hx = (torch.randn(slots, batch, real, dtype=F64), torch.randn(slots, batch, ref.hidden_size, dtype=F64))
    weights = (torch.randn(steps, batch, dirs * real, dtype=F64), torch.randn_like(hx[0]), torch.randn_like(hx[1]))
    return x, hx, weights


def assert_window(snap: fastlstm.Snapshot, expected: Expected, ref: nn.LSTM, grads=True):
    dirs = 2 if ref.bidirectional else 1
    assert len(snap.layers) == ref.num_layers * dirs
    for slot, lt in enumerate(snap.layers):
        where = f"slot {slot}"
        assert (lt.layer, lt.direction) == divmod(slot, dirs), where
        assert lt.elements == expected.elements[slot], where
        assert set(lt.gate_saturation) == set(GATES), where
        for k, gate in enumerate(GATES):
            assert lt.gate_saturation[gate] == pytest.approx(expected.sat[slot, k] / expected.elements[slot], abs=1e-12)
        assert lt.forget_gate_mean == pytest.approx(expected.forget[slot] / expected.elements[slot], rel=1e-12)
        assert lt.cell_absmax == pytest.approx(expected.cell_absmax[slot], rel=1e-12)
        if grads:
            np.testing.assert_array_equal(lt.backward_passes, expected.backward_passes(slot), err_msg=where)
            np.testing.assert_allclose(lt.grad_norm_per_step, expected.grad_norm(slot), rtol=1e-10, err_msg=where)
            np.testing.assert_allclose(
                lt.cell_grad_norm_per_step, expected.grad_norm(slot, cell=True), rtol=1e-10, err_msg=where
            )
    # the case must be discriminating: some activations saturated, most not
    assert 0 < expected.sat.sum() < 0.8 * 4 * expected.elements.sum()


CONFIGS = {
    "1layer": {"num_layers": 1},
    "2layer-bidir-proj": {"num_layers": 2, "bidirectional": True, "proj_size": P},
}


@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_fields_match_recomputation(cfg, packed):
    ref, fast = make_pair(I, H, weight_scale=0.8, **CONFIGS[cfg])
    steps, batch = 6, 4
    lengths = mixed_lengths(steps, batch, sorted_=False) if packed else None
    x, hx, weights = random_pass_inputs(ref, steps, batch)
    expected = Expected(len(fast.telemetry.snapshot().layers))
    manual_pass(ref, x, lengths, hx, weights, expected)
    module_loss = module_pass(fast, x, lengths, hx, weights)
    snap = fast.telemetry.snapshot()
    assert_window(snap, expected, ref)
    assert snap.first_nonfinite is None
    assert snap.launches == 2 * len(snap.layers)  # one forward and one backward per layer-direction
    # the sanity of the recomputation itself: same loss as the module's
    manual_loss = manual_pass(ref, x, lengths, hx, weights, Expected(8), backward=False)
    assert module_loss.item() == pytest.approx(manual_loss.item(), rel=1e-12)


@pytest.mark.parametrize("loss_scale", [1e25, 1e-25], ids=["exploding", "vanishing"])
def test_float32_grad_norms_are_those_of_a_float64_sum_of_squares(loss_scale):
    """Gradients of 1e25 (or 1e-25) are finite float32 values whose squares are not: the rows must still hold
    the norms a float64 sum of squares gives, not inf or 0 (exploding gradients are what they are for)."""
    ref = make_pair(I, H, weight_scale=0.8, num_layers=2, proj_size=P)[0]
    fast = fast_like(ref.float())
    ref.double()
    steps, batch = 6, 3
    lengths = mixed_lengths(steps, batch, sorted_=False)
    x, hx, weights = random_pass_inputs(ref, steps, batch)
    weights = tuple(w * loss_scale for w in weights)
    expected = Expected(len(fast.telemetry.snapshot().layers))
    manual_pass(ref, x, lengths, hx, weights, expected)
    module_pass(fast, x.float(), lengths, tuple(t.float() for t in hx), tuple(w.float() for w in weights))
    for slot, lt in enumerate(fast.telemetry.snapshot().layers):
        for cell in (False, True):
            recorded = lt.cell_grad_norm_per_step if cell else lt.grad_norm_per_step
            np.testing.assert_allclose(recorded, expected.grad_norm(slot, cell), rtol=1e-4, err_msg=f"{slot} {cell}")


def test_packed_equals_sequences_one_by_one():
    """A packed batch and the same sequences run one at a time give identical forward telemetry."""
    ref, fast = make_pair(I, H, weight_scale=0.8, num_layers=2, bidirectional=True, proj_size=P)
    alone = fast_like(ref)
    steps, batch = 7, 4
    lengths = mixed_lengths(steps, batch, sorted_=False)
    x, hx, _ = random_pass_inputs(ref, steps, batch)
    fast(pack(x, lengths, False, enforce_sorted=False), hx)
    for b, n in enumerate(lengths):
        alone(x[:n, b : b + 1], tuple(t[:, b : b + 1] for t in hx))
    together, separate = fast.telemetry.snapshot(), alone.telemetry.snapshot()
    for a, s in zip(together.layers, separate.layers):
        assert a.elements == s.elements == sum(lengths) * H
        for gate in GATES:
            assert a.gate_saturation[gate] == pytest.approx(s.gate_saturation[gate], abs=1e-12)
        assert a.forget_gate_mean == pytest.approx(s.forget_gate_mean, rel=1e-12)
        assert a.cell_absmax == pytest.approx(s.cell_absmax, rel=1e-12)


def test_accumulation_reset_and_snapshot_reset():
    ref, fast = make_pair(I, H, weight_scale=0.8, num_layers=2, bidirectional=True, proj_size=P)
    tel = fast.telemetry
    expected = Expected(4)
    runs = [(6, 3, None), (4, 4, [2, 4, 1, 3])]  # different lengths: later timesteps see fewer passes
    for steps, batch, lengths in runs:
        x, hx, weights = random_pass_inputs(ref, steps, batch)
        manual_pass(ref, x, lengths, hx, weights, expected)
        module_pass(fast, x, lengths, hx, weights)
    snap = tel.snapshot()
    assert_window(snap, expected, ref)
    np.testing.assert_array_equal(snap.layers[0].backward_passes, [2, 2, 2, 2, 1, 1])
    assert tel.snapshot().to_dict() == snap.to_dict()  # reading does not change the window

    # a forward without backward adds forward statistics only
    x, hx, weights = random_pass_inputs(ref, 5, 2)
    module_pass(fast, x, None, hx, weights, backward=False)
    manual_pass(ref, x, None, hx, weights, expected, backward=False)
    assert_window(tel.snapshot(), expected, ref)

    # an inference pass (no autograd) adds nothing, unless record_inference asks for its forward statistics
    x, hx, weights = random_pass_inputs(ref, 4, 3)
    with torch.inference_mode():
        module_pass(fast, x, None, hx, weights, backward=False)
    with torch.no_grad():
        module_pass(fast, x, None, hx, weights, backward=False)
    assert_window(tel.snapshot(), expected, ref)
    fast.telemetry.record_inference = True
    with torch.no_grad():
        module_pass(fast, x, None, hx, weights, backward=False)
    fast.telemetry.record_inference = False
    manual_pass(ref, x, None, hx, weights, expected, backward=False)
    assert_window(tel.snapshot(), expected, ref)

    # snapshot(reset=True) returns the window and starts an empty one
    captured = tel.snapshot(reset=True)
    assert_window(captured, expected, ref)
    empty = tel.snapshot()
    assert empty.launches == 0 and empty.first_nonfinite is None
    for lt in empty.layers:
        assert lt.elements == 0 and lt.grad_norm_per_step.size == 0 and lt.backward_passes.size == 0
        assert lt.forget_gate_mean is None and lt.cell_absmax is None
    # the captured snapshot is not affected by the reset or later passes
    x3, hx3, w3 = random_pass_inputs(ref, 3, 2)
    module_pass(fast, x3, None, hx3, w3)
    assert captured.layers[0].elements == expected.elements[0]

    # reset() and a fresh window that holds exactly the next pass
    tel.reset()
    fresh = Expected(4)
    x, hx, weights = random_pass_inputs(ref, 3, 2)
    manual_pass(ref, x, None, hx, weights, fresh)
    module_pass(fast, x, None, hx, weights)
    assert_window(tel.snapshot(), fresh, ref)


def test_poll_on_cpu(monkeypatch):
    ref, fast = make_pair(I, H, weight_scale=0.8)
    tel = fast.telemetry

    def blocked(*args, **kwargs):
        raise AssertionError("poll() synchronised")

    monkeypatch.setattr(torch.cuda, "synchronize", blocked)
    monkeypatch.setattr(torch.cuda.Event, "synchronize", blocked)
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", blocked)
    first = tel.poll()
    assert isinstance(first, fastlstm.Snapshot) and all(lt.elements == 0 for lt in first.layers)
    expected = Expected(1)
    x, hx, weights = random_pass_inputs(ref, 5, 3)
    manual_pass(ref, x, None, hx, weights, expected)
    module_pass(fast, x, None, hx, weights)
    polled = tel.poll()
    assert isinstance(polled, fastlstm.Snapshot)
    assert_window(polled, expected, ref)
    assert tel.latest is polled
    assert tel.poll(reset=True).to_dict() == polled.to_dict()
    assert tel.poll().layers[0].elements == 0


def test_to_dict_is_json():
    _, fast = make_pair(I, H, num_layers=2, bidirectional=True, proj_size=P)
    x = torch.randn(5, 3, I, dtype=F64)
    fast(x)[0].sum().backward()
    x2 = torch.randn(7, 2, I, dtype=F64)  # longer than the first pass: steps 5, 6 have a single pass
    x2[2, 1, 0] = float("nan")
    fast(x2)[0].sum().backward()
    snap = fast.telemetry.snapshot()
    d = snap.to_dict()
    text = json.dumps(d, allow_nan=False)  # strict JSON: NaN/inf must have been made JSON-safe
    back = json.loads(text)
    assert back["first_nonfinite"] == {"layer": 0, "direction": 0, "timestep": 2, "stage": "forward", "tensor": "input"}
    assert back["launches"] == snap.launches
    for lt, ld in zip(snap.layers, back["layers"]):
        assert ld["elements"] == lt.elements
        assert ld["backward_passes"] == lt.backward_passes.tolist()
        assert len(ld["grad_norm_per_step"]) == lt.grad_norm_per_step.size
        assert set(ld["gate_saturation"]) == set(GATES)
    # a clean window round-trips its numbers exactly
    fast.telemetry.reset()
    fast(x)[0].sum().backward()
    clean = fast.telemetry.snapshot()
    back = json.loads(json.dumps(clean.to_dict(), allow_nan=False))
    for lt, ld in zip(clean.layers, back["layers"]):
        assert ld["grad_norm_per_step"] == lt.grad_norm_per_step.tolist()
        assert ld["gate_saturation"] == lt.gate_saturation
        assert ld["forget_gate_mean"] == lt.forget_gate_mean and ld["cell_absmax"] == lt.cell_absmax


def test_batch_size_zero_records_nothing():
    ref, fast = make_pair(I, H, weight_scale=0.8, num_layers=2, bidirectional=True)
    x = torch.randn(5, 0, I, dtype=F64, requires_grad=True)
    out, (h, c) = fast(x)
    (out.sum() + h.sum() + c.sum()).backward()
    snap = fast.telemetry.snapshot()
    assert snap.launches == 0 and snap.first_nonfinite is None
    for lt in snap.layers:
        assert lt.elements == 0 and lt.forget_gate_mean is None and lt.cell_absmax is None
        assert lt.backward_passes.size == 0 and lt.grad_norm_per_step.size == 0
    # an empty batch inside a window leaves it exactly as the non-empty passes make it (no zero-norm passes)
    expected = Expected(4)
    xs, hx, weights = random_pass_inputs(ref, 4, 3)
    manual_pass(ref, xs, None, hx, weights, expected)
    module_pass(fast, xs, None, hx, weights)
    out, (h, c) = fast(torch.randn(4, 0, I, dtype=F64, requires_grad=True))
    (out.sum() + h.sum() + c.sum()).backward()
    assert_window(fast.telemetry.snapshot(), expected, ref)


# ---- first non-finite value ----

T = 6


def _nan_case(name):
    """(model config, how to poison (module, x, hx) -> None, backward gradient maker or None, expected record)."""
    nan, inf = float("nan"), float("inf")

    def set_param(pname, value, row=0):
        def poison(m, x, hx):
            with torch.no_grad():
                getattr(m, pname)[row, 0] = value

        return poison

    cases = {
        # forward, input: layer 0, the timestep of the NaN (direction 0 runs first, even when bidirectional)
        "input_nan": ({}, lambda m, x, hx: x[3, 1].fill_(nan), None, (0, 0, 3, "forward", "input")),
        "input_two_nans": (
            {"num_layers": 2, "bidirectional": True},
            lambda m, x, hx: (x[4, 0, 1].fill_(nan), x[2, 2, 0].fill_(inf)),
            None,
            (0, 0, 2, "forward", "input"),
        ),
        "input_nan_last_step": (
            {"bidirectional": True},
            lambda m, x, hx: x[T - 1, 0].fill_(nan),
            None,
            (0, 0, T - 1, "forward", "input"),
        ),
        "w_ih_reverse": (
            {"bidirectional": True},
            set_param("weight_ih_l0_reverse", nan),
            None,
            (0, 1, T - 1, "forward", "input"),
        ),
        "w_hh_inf": ({"num_layers": 2}, set_param("weight_hh_l0", inf), None, (0, 0, 0, "forward", "gates")),
        "w_hh_inf_layer1_reverse": (
            {"num_layers": 2, "bidirectional": True},
            set_param("weight_hh_l1_reverse", inf),
            None,
            (1, 1, T - 1, "forward", "gates"),
        ),
        "h0_nan_reverse": (
            {"bidirectional": True},
            lambda m, x, hx: hx[0][1, 2].fill_(nan),
            None,
            (0, 1, T - 1, "forward", "gates"),
        ),
        "c0_nan": ({}, lambda m, x, hx: hx[1][0, 1, 2].fill_(nan), None, (0, 0, 0, "forward", "cell")),
        "c0_nan_reverse": (
            {"bidirectional": True},
            lambda m, x, hx: hx[1][1, 0].fill_(nan),
            None,
            (0, 1, T - 1, "forward", "cell"),
        ),
        "w_hr_nan": (
            {"proj_size": P, "num_layers": 2},
            set_param("weight_hr_l1", nan),
            None,
            (1, 0, 0, "forward", "hidden"),
        ),
        # backward
        "loss_nan": ({"num_layers": 2}, None, "loss_nan", (1, 0, T - 1, "backward", "grad_output")),
        "grad_out_reverse_half": ({"bidirectional": True}, None, "reverse_half", (0, 1, 1, "backward", "grad_output")),
        "grad_out_forward_half": ({"bidirectional": True}, None, "forward_half", (0, 0, 4, "backward", "grad_output")),
        "grad_h_n": ({}, None, "h_n", (0, 0, T - 1, "backward", "grad_hidden")),
        "grad_c_n": ({}, None, "c_n", (0, 0, T - 1, "backward", "grad_cell")),
    }
    return cases[name]


NAN_CASES = [
    "input_nan",
    "input_two_nans",
    "input_nan_last_step",
    "w_ih_reverse",
    "w_hh_inf",
    "w_hh_inf_layer1_reverse",
    "h0_nan_reverse",
    "c0_nan",
    "c0_nan_reverse",
    "w_hr_nan",
    "loss_nan",
    "grad_out_reverse_half",
    "grad_out_forward_half",
    "grad_h_n",
    "grad_c_n",
]


def _backward_with(kind, out, h_n, c_n):
    nan = float("nan")
    g_out, g_h, g_c = torch.randn_like(out), torch.randn_like(h_n), torch.randn_like(c_n)
    if kind == "loss_nan":
        ((out * g_out).sum() * nan).backward()
        return
    half = out.shape[-1] // 2
    if kind == "reverse_half":
        g_out[[1, 4], 0, half:] = nan  # the reverse direction's backward runs t ascending: 1 comes first
    elif kind == "forward_half":
        g_out[[1, 4], 2, :half] = nan  # the forward direction's backward runs t descending: 4 comes first
    elif kind == "h_n":
        g_h[0, 1, 0] = nan
    elif kind == "c_n":
        g_c[0, 0, 1] = nan
    torch.autograd.backward([out, h_n, c_n], [g_out, g_h, g_c])


@pytest.mark.parametrize("name", NAN_CASES)
def test_first_nonfinite(name):
    cfg, poison, grad_kind, expected = _nan_case(name)
    ref, fast = make_pair(I, H, **cfg)
    x, hx, _ = random_pass_inputs(ref, T, 3)
    x = x.clone()
    # a clean pass first: the window's first event must come from the later pass
    out, (h_n, c_n) = fast(x, hx)
    (out.sum() + h_n.sum() + c_n.sum()).backward()
    assert fast.telemetry.snapshot().first_nonfinite is None
    if poison is not None:
        poison(fast, x, hx)
    out, (h_n, c_n) = fast(x, hx)
    if grad_kind is None:
        (out.sum() + h_n.sum() + c_n.sum()).backward()
    else:
        _backward_with(grad_kind, out, h_n, c_n)
    record = fast.telemetry.snapshot().first_nonfinite
    assert record is not None
    assert (record.layer, record.direction, record.timestep, record.stage, record.tensor) == expected


def test_first_nonfinite_packed_reverse():
    """Packed input: the reverse direction starts at each sequence's own last step; the first event in its time
    order is at the longest sequence's last step."""
    ref, fast = make_pair(I, H, bidirectional=True)
    lengths = [3, 5, 2]
    x, hx, _ = random_pass_inputs(ref, 5, 3)
    with torch.no_grad():
        fast.weight_hh_l0_reverse[0, 0] = float("inf")
    _out, (_h, _c) = fast(pack(x, lengths, False, enforce_sorted=False), hx)
    r = fast.telemetry.snapshot().first_nonfinite
    assert (r.layer, r.direction, r.timestep, r.stage, r.tensor) == (0, 1, 4, "forward", "gates")


def test_first_nonfinite_bidirectional_loss_nan_top_layer():
    _, fast = make_pair(I, H, num_layers=2, bidirectional=True, proj_size=P)
    x = torch.randn(T, 2, I, dtype=F64)
    (fast(x)[0].sum() * float("nan")).backward()
    r = fast.telemetry.snapshot().first_nonfinite
    assert (r.layer, r.stage, r.tensor) == (1, "backward", "grad_output")
    assert (r.direction, r.timestep) in ((0, T - 1), (1, 0))  # the first step of that direction's backward


def test_first_nonfinite_earliest_pass_wins_and_reset_clears():
    _, fast = make_pair(I, H, num_layers=2)
    for t in (4, 1):
        x = torch.randn(T, 2, I, dtype=F64)
        x[t, 0, 0] = float("nan")
        fast(x)[0].sum().backward()
    assert fast.telemetry.snapshot().first_nonfinite.timestep == 4
    fast.telemetry.reset()
    assert fast.telemetry.snapshot().first_nonfinite is None
    x = torch.randn(T, 2, I, dtype=F64)
    x[1, 1, 2] = float("nan")
    fast(x)
    assert fast.telemetry.snapshot().first_nonfinite.timestep == 1


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_a_backward_after_a_reset_stays_earlier_than_the_next_pass(backend):
    # Pass A's forward ran before the reset, its backward after it; pass B follows. A's backward NaN is the window's
    # first event (with the pass count restarted by the reset, A and B shared a number and B's forward won).
    _, fast = make_pair(I, H)
    fast.backend = backend
    out, _ = fast(torch.randn(T, 2, I, dtype=F64))
    fast.telemetry.reset()
    weights = torch.ones_like(out)
    weights[2, 0, 0] = float("nan")
    (out * weights).sum().backward()
    x = torch.randn(T, 2, I, dtype=F64)
    x[T - 1, 0, 0] = float("nan")
    fast(x)
    first = fast.telemetry.snapshot().first_nonfinite
    assert (first.stage, first.tensor, first.timestep) == ("backward", "grad_output", 2)


# ---- switching telemetry off ----


def test_telemetry_off_records_nothing_and_changes_nothing():
    ref, on = make_pair(I, H, num_layers=2, bidirectional=True, proj_size=P)
    off = fast_like(ref, telemetry=False)
    assert not off.telemetry.enabled
    x, hx, weights = random_pass_inputs(ref, 5, 3)
    results = []
    for m in (on, off):
        xl = x.clone().requires_grad_(True)
        hl = tuple(t.clone().requires_grad_(True) for t in hx)
        out, (h, c) = m(xl, hl)
        ((out * weights[0]).sum() + (h * weights[1]).sum() + (c * weights[2]).sum()).backward()
        results.append([out, h, c, xl.grad, *(t.grad for t in hl), *(p.grad for p in m.parameters())])
    for a, b in zip(*results):
        assert torch.equal(a, b)
    snap = off.telemetry.snapshot()
    assert snap.launches == 0 and snap.first_nonfinite is None
    assert all(lt.elements == 0 and lt.backward_passes.size == 0 for lt in snap.layers)
    assert on.telemetry.snapshot().layers[0].elements > 0

    # a NaN is not recorded either
    x_nan = x.clone()
    x_nan[0, 0, 0] = float("nan")
    off(x_nan)[0].sum().backward()
    assert off.telemetry.snapshot().first_nonfinite is None

    # switching off at run time freezes the window
    before = on.telemetry.snapshot().to_dict()
    on.telemetry.enabled = False
    on(x_nan)[0].sum().backward()
    assert on.telemetry.snapshot().to_dict() == before
    on.telemetry.enabled = True
    on(x)[0].sum().backward()
    assert on.telemetry.snapshot().layers[0].elements == 2 * before["layers"][0]["elements"]


# ---- no host synchronisation in forward and backward ----


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_no_host_sync(packed):
    ref, fast = make_pair(I, H, num_layers=2, bidirectional=True, proj_size=P)
    x, hx, _weights = random_pass_inputs(ref, 5, 3)
    inp = pack(x, [3, 5, 2], False, enforce_sorted=False) if packed else x
    fast(inp, hx)  # warm-up allocates the counters
    with HostReadGuard() as guard:
        if packed:
            guard.allow(inp.batch_sizes)  # PackedSequence keeps batch_sizes on the host by contract
        out, (h, c) = fast(inp, hx)
        data = out.data if packed else out
        ((data * torch.randn_like(data)).sum() + h.sum() + c.sum()).backward()
        fast.telemetry.reset()
    assert guard.reads == [], f"host synchronisation in forward/backward: {guard.reads}"
    assert fast.telemetry.snapshot().launches == 0  # the reset happened, and telemetry did run before it
