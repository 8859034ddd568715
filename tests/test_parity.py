"""Numerical parity of fastlstm.LSTM (reference backend) with torch.nn.LSTM: outputs, final states and every gradient
over nn.LSTM's full option grid, plus gradcheck, dropout, batch size 0, hx forms and packed final states."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

import fastlstm

try:
    from support import assert_module_parity, assert_rel, leaf, make_pair, mixed_lengths, pack, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_module_parity, assert_rel, leaf, make_pair, mixed_lengths, pack, tolerance

INPUT, HIDDEN, PROJ, STEPS = 4, 5, 3, 6
KINDS = ("padded", "packed_sorted", "packed_unsorted", "unbatched")

# nn.LSTM's own notice that oneDNN has no projections; it says nothing about fastlstm.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def _make_input(kind, batch_first, dtype, steps=STEPS, batch=3):
    """(leaf tensor x, function x -> module input, lengths or None, batch size)."""
    if kind == "unbatched":
        return leaf(torch.randn(steps, INPUT, dtype=dtype)), (lambda x: x), None, None
    if kind == "padded":
        shape = (batch, steps, INPUT) if batch_first else (steps, batch, INPUT)
        return leaf(torch.randn(shape, dtype=dtype)), (lambda x: x), None, batch
    batch = 4
    enforce_sorted = kind == "packed_sorted"
    lengths = mixed_lengths(steps, batch, sorted_=enforce_sorted)
    shape = (batch, steps, INPUT) if batch_first else (steps, batch, INPUT)
    return (
        leaf(torch.randn(shape, dtype=dtype)),
        (lambda x: pack(x, lengths, batch_first, enforce_sorted)),
        lengths,
        batch,
    )


def _make_hx(module: nn.LSTM, batch, dtype):
    slots = module.num_layers * (2 if module.bidirectional else 1)
    real = module.proj_size or module.hidden_size
    lead = (slots,) if batch is None else (slots, batch)
    return leaf(torch.randn(*lead, real, dtype=dtype)), leaf(torch.randn(*lead, module.hidden_size, dtype=dtype))


GRID = list(itertools.product((True, False), (False, True), (False, True), (0, PROJ), (1, 3), KINDS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(
    "bias,batch_first,bidirectional,proj_size,num_layers,kind",
    GRID,
    ids=[f"bias{int(b)}-bf{int(f)}-bi{int(d)}-proj{p}-L{n}-{k}" for b, f, d, p, n, k in GRID],
)
def test_option_grid(bias, batch_first, bidirectional, proj_size, num_layers, kind, dtype):
    ref, fast = make_pair(
        INPUT,
        HIDDEN,
        num_layers,
        bias=bias,
        batch_first=batch_first,
        bidirectional=bidirectional,
        proj_size=proj_size,
        dtype=dtype,
    )
    x, to_input, _, batch = _make_input(kind, batch_first, dtype)
    assert_module_parity(fast, ref, x, _make_hx(ref, batch, dtype), tolerance(dtype), to_input=to_input)


@pytest.mark.parametrize("kind", KINDS)
def test_hx_none_is_zero_state(kind):
    ref, fast = make_pair(INPUT, HIDDEN, 2, bidirectional=True, proj_size=PROJ, batch_first=True)
    x, to_input, _, _ = _make_input(kind, True, torch.float64)
    assert_module_parity(fast, ref, x, None, tolerance(torch.float64), to_input=to_input)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("kind", ["padded", "packed_unsorted"])
def test_a_cell_state_beyond_half_the_largest_float(backend, kind):
    # nn.LSTM takes a finite c0 of any size; a loop that carried 2·c_t overflowed to an infinite c_n here.
    ref, _ = make_pair(INPUT, HIDDEN, dtype=torch.float32)
    fast = fastlstm.LSTM(INPUT, HIDDEN, backend=backend)
    fast.load_state_dict(ref.state_dict())
    x, to_input, _, batch = _make_input(kind, False, torch.float32)
    h0, c0 = _make_hx(ref, batch, torch.float32)
    with torch.no_grad():
        c0[0, 0, :2] = torch.tensor([2e38, -3e38])  # float32's largest is 3.4e38
    assert_module_parity(fast, ref, x, (h0, c0), tolerance(torch.float32), to_input=to_input)


@pytest.mark.parametrize("form", [tuple, list])
def test_hx_tuple_and_list(form):
    ref, fast = make_pair(INPUT, HIDDEN, 2, proj_size=PROJ)
    x, to_input, _, batch = _make_input("padded", False, torch.float64)
    h0, c0 = _make_hx(ref, batch, torch.float64)
    assert_module_parity(fast, ref, x, form((h0, c0)), tolerance(torch.float64), to_input=to_input)
    # and the two forms give the same result
    a = fast(x, (h0, c0))
    b = fast(x, [h0, c0])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1][0], b[1][0]) and torch.equal(a[1][1], b[1][1])


# ---- gradcheck (float64, finite differences against our backward) ----


def _functional(fast, kind, lengths, batch_first):
    names = [n for n, _ in fast.named_parameters()]

    def fn(x, h0, c0, *params):
        inp = x if kind != "packed" else pack(x, lengths, batch_first, enforce_sorted=False)
        out, (h_n, c_n) = torch.func.functional_call(fast, dict(zip(names, params)), (inp, (h0, c0)))
        data = out.data if isinstance(out, PackedSequence) else out
        return data, h_n, c_n

    return fn, [p.detach().clone().requires_grad_(True) for _, p in fast.named_parameters()]


@pytest.mark.parametrize(
    "kind,num_layers,bidirectional,proj_size,bias,fast_mode",
    [
        ("padded", 1, False, 0, True, False),
        ("packed", 1, True, 2, True, False),
        ("padded", 2, False, 2, False, False),
        ("packed", 2, True, 2, True, True),  # random projections of the full Jacobian: the big case stays fast
    ],
)
def test_gradcheck(kind, num_layers, bidirectional, proj_size, bias, fast_mode):
    _, fast = make_pair(3, 4, num_layers, bidirectional=bidirectional, proj_size=proj_size, bias=bias)
    steps, batch = 4, 3
    lengths = [3, 4, 2] if kind == "packed" else None
    fn, params = _functional(fast, kind, lengths, False)
    x = leaf(torch.randn(steps, batch, 3, dtype=torch.float64))
    h0, c0 = _make_hx(fast, batch, torch.float64)
    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast_mode)


# ---- dropout ----


def test_dropout_one_layer_warns_like_nn_lstm():
    with warnings.catch_warnings(record=True) as expected:
        warnings.simplefilter("always")
        nn.LSTM(INPUT, HIDDEN, 1, dropout=0.3)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        fastlstm.LSTM(INPUT, HIDDEN, 1, dropout=0.3)
    assert len(expected) == 1
    assert [(w.category, str(w.message)) for w in got] == [(w.category, str(w.message)) for w in expected]


@pytest.mark.parametrize("mode", ["eval_p0.4", "train_p0"])
def test_dropout_eval_and_zero_match_nn_lstm(mode):
    p = 0.4 if mode.startswith("eval") else 0.0
    ref, fast = make_pair(INPUT, HIDDEN, 3, dropout=p, bidirectional=True)
    ref.train(mode.startswith("train"))
    fast.train(mode.startswith("train"))
    x, to_input, _, batch = _make_input("padded", False, torch.float64)
    assert_module_parity(fast, ref, x, _make_hx(ref, batch, torch.float64), tolerance(torch.float64), to_input=to_input)


def test_dropout_train_differs_from_eval_and_between_calls():
    _, fast = make_pair(INPUT, HIDDEN, 2, dropout=0.5)
    x = torch.randn(STEPS, 3, INPUT, dtype=torch.float64)
    fast.eval()
    ev = fast(x)[0]
    assert torch.equal(ev, fast(x)[0])  # eval is deterministic
    fast.train()
    tr1, tr2 = fast(x)[0], fast(x)[0]
    assert not torch.allclose(tr1, ev)
    assert not torch.allclose(tr1, tr2)  # a fresh mask every call
    # the first layer is never dropped: a 1-layer model with dropout > 0 is deterministic in train mode
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, one = make_pair(INPUT, HIDDEN, 1, dropout=0.5)
    one.train()
    assert torch.equal(one(x)[0], one.eval()(x)[0])


def test_dropout_mask_statistics():
    """Observe the mask between layers exactly: layer 1 is wired so that its unit k outputs
    tanh(tanh(dropped layer-0 output k)), i.e. exactly 0 where the mask dropped that element and
    tanh(tanh(y / (1 - p))) where it kept it (y: layer 0's output, computed independently by nn.LSTM)."""
    p, hidden, steps, batch = 0.3, 8, 7, 4
    fast = fastlstm.LSTM(INPUT, hidden, 2, dropout=p, backend="reference", dtype=torch.float64)
    layer0 = nn.LSTM(INPUT, hidden, 1, dtype=torch.float64)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(fast, f"{name}_l0").copy_(getattr(layer0, f"{name}_l0"))
        big = 1000.0  # sigmoid(±1000) is exactly 1 / 0 in float64 -> i = o = 1, f = 0
        fast.weight_ih_l1.zero_()
        fast.weight_ih_l1[2 * hidden : 3 * hidden] = torch.eye(hidden, dtype=torch.float64)  # g_k = dropped y_k
        fast.weight_hh_l1.zero_()
        fast.bias_hh_l1.zero_()
        fast.bias_ih_l1.copy_(torch.cat([torch.full((hidden,), v) for v in (big, -big, 0.0, big)]))
    x = torch.randn(steps, batch, INPUT, dtype=torch.float64)
    y = layer0(x)[0].detach()
    assert (y != 0).all()
    fast.train()
    dropped = []
    for _ in range(12):
        out = fast(x)[0].detach()
        mask = out != 0
        dropped.append((~mask).double().mean())
        kept = torch.tanh(torch.tanh(y / (1 - p)))
        torch.testing.assert_close(out[mask], kept[mask], rtol=1e-12, atol=1e-12)
    rate = torch.stack(dropped).mean().item()
    n = 12 * steps * batch * hidden
    assert abs(rate - p) < 5 * (p * (1 - p) / n) ** 0.5, rate


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_dropout_train_same_rng_as_nn_lstm(kind):
    """On the CPU nn.LSTM draws one dropout mask per layer boundary from the global generator, on the time-major
    layer output (a PackedSequence's data only: the steps each sequence has); fastlstm does the same, so with equal
    seeds the training-mode results and gradients agree."""
    ref, fast = make_pair(INPUT, HIDDEN, 3, dropout=0.5, batch_first=True, bidirectional=True)
    ref.train(), fast.train()
    x, to_input, _, batch = _make_input(kind, True, torch.float64)
    hx = _make_hx(ref, batch, torch.float64)
    seed = int(torch.randint(0, 2**31, ()).item())
    assert_module_parity(fast, ref, x, hx, tolerance(torch.float64), to_input=to_input, seed=seed)


# ---- batch size 0 ----


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("proj_size,bidirectional,with_hx", [(0, False, False), (2, True, True)])
def test_batch_size_zero(batch_first, proj_size, bidirectional, with_hx):
    ref, fast = make_pair(INPUT, HIDDEN, 2, batch_first=batch_first, proj_size=proj_size, bidirectional=bidirectional)
    shape = (0, STEPS, INPUT) if batch_first else (STEPS, 0, INPUT)
    results = []
    for module in (ref, fast):
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        hx = _make_hx(ref, 0, torch.float64) if with_hx else None
        out, (h, c) = module(x, hx)
        (out.sum() + h.sum() + c.sum()).backward()
        results.append((out.shape, h.shape, c.shape, out.dtype, x.grad.shape))
    assert results[1] == results[0]


# ---- packed input: final states at each sequence's own last step ----


@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_final_states_per_sequence(bidirectional, enforce_sorted):
    ref, fast = make_pair(INPUT, HIDDEN, 2, bidirectional=bidirectional, proj_size=PROJ)
    batch, steps = 4, 7
    lengths = mixed_lengths(steps, batch, sorted_=enforce_sorted)
    x = torch.randn(steps, batch, INPUT, dtype=torch.float64)
    h0, c0 = (t.detach() for t in _make_hx(ref, batch, torch.float64))
    out, (h_n, c_n) = fast(pack(x, lengths, False, enforce_sorted), (h0, c0))
    padded, out_lengths = pad_packed_sequence(out)
    assert out_lengths.tolist() == lengths
    for b, n in enumerate(lengths):
        xb, hb, cb = x[:n, b : b + 1], h0[:, b : b + 1], c0[:, b : b + 1]
        for module in (ref, fast):  # the sequence alone, through nn.LSTM and through fastlstm
            o_b, (h_b, c_b) = module(xb, (hb, cb))
            assert_rel(
                h_n[:, b : b + 1], h_b, tolerance(torch.float64), f"h_n of sequence {b} ({type(module).__module__})"
            )
            assert_rel(c_n[:, b : b + 1], c_b, tolerance(torch.float64), f"c_n of sequence {b}")
            assert_rel(padded[:n, b : b + 1], o_b, tolerance(torch.float64), f"output of sequence {b}")
        assert (padded[n:, b] == 0).all()
