"""fastlstm.LSTM keeps torch.nn.LSTM's module contract: constructor, validation, parameters, init, state_dict, repr,
parameter replacement, functional_call, parametrizations, dtype/device moves, copying, input errors, conversion."""

from __future__ import annotations

import copy
import inspect
import io
import math
import typing

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm

import fastlstm
from fastlstm.input_checks import HiddenStateFormError

try:
    from support import assert_module_parity, assert_rel, fast_like, leaf, make_pair, pack, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_module_parity, assert_rel, fast_like, leaf, make_pair, pack, tolerance

I, H, P, T, B = 4, 6, 3, 5, 3
F64 = torch.float64

pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def _randn(*shape, dtype=F64):
    return torch.randn(*shape, dtype=dtype)


# ---- constructor ----


def test_signature_matches_nn_lstm():
    ours = inspect.signature(fastlstm.LSTM.__init__).parameters.values()
    positional = [(p.name, p.kind, p.default) for p in ours if p.kind != inspect.Parameter.KEYWORD_ONLY]
    # nn.LSTM.__init__ is (*args, **kwargs) at run time; its typed overload and nn.RNNBase (minus `mode`) say the rest
    base = [(p.name, p.kind, p.default) for p in inspect.signature(nn.RNNBase.__init__).parameters.values()]
    assert positional == [p for p in base if p[0] != "mode"]
    typed = [s for s in map(inspect.signature, typing.get_overloads(nn.LSTM.__init__)) if len(s.parameters) > 3]
    for sig in typed:
        assert positional == [(p.name, p.kind, p.default) for p in sig.parameters.values()]
    extras = {p.name: p.default for p in ours if p.kind == inspect.Parameter.KEYWORD_ONLY}
    assert extras == {"backend": "auto", "telemetry": True}


def test_positional_construction_and_defaults():
    args = (I, H, 2, False, True, 0.25, True, P)
    ours, theirs = fastlstm.LSTM(*args), nn.LSTM(*args)
    attrs = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional", "proj_size")
    assert [getattr(ours, a) for a in attrs] == [getattr(theirs, a) for a in attrs] == list(args)
    d_ours, d_theirs = fastlstm.LSTM(I, H), nn.LSTM(I, H)
    assert [getattr(d_ours, a) for a in attrs] == [getattr(d_theirs, a) for a in attrs]
    assert d_ours.training and d_ours.weight_ih_l0.dtype == torch.get_default_dtype()


BAD_CONFIGS = [
    {"dropout": 1.5},
    {"dropout": -0.1},
    {"dropout": True},
    {"dropout": "x"},
    {"proj_size": H},
    {"proj_size": H + 2},
    {"proj_size": -1},
    {"hidden_size": 0},
    {"hidden_size": -3},
    {"hidden_size": 2.0},
    {"input_size": 0},
    {"num_layers": 0},
    {"num_layers": 1.5},
    {"bias": 1},
    {"bias": "yes"},
    {"batch_first": 1},
]


@pytest.mark.parametrize("bad", BAD_CONFIGS, ids=[f"{k}={v!r}" for d in BAD_CONFIGS for k, v in d.items()])
def test_constructor_validation_matches_nn_lstm(bad):
    kwargs = {"input_size": I, "hidden_size": H}
    kwargs.update(bad)
    with pytest.raises(Exception) as expected:
        nn.LSTM(**kwargs)
    with pytest.raises(expected.type) as got:
        fastlstm.LSTM(**kwargs)
    assert str(got.value) == str(expected.value)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend"):
        fastlstm.LSTM(I, H, backend="cudnn")


# ---- parameters, init, state_dict, repr ----

CONFIGS = [
    {"num_layers": 1},
    {"num_layers": 2, "bias": False},
    {"num_layers": 2, "bidirectional": True},
    {"num_layers": 3, "bidirectional": True, "proj_size": P},
    {"num_layers": 2, "proj_size": P, "bias": False, "batch_first": True},
]
CONFIG_IDS = ["-".join(f"{k}{v}" for k, v in c.items()) for c in CONFIGS]


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_named_parameters_identical(cfg):
    ours, theirs = fastlstm.LSTM(I, H, **cfg), nn.LSTM(I, H, **cfg)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [
        (n, p.shape, p.dtype) for n, p in theirs.named_parameters()
    ]
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert ours._all_weights == theirs._all_weights


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_init_distribution(cfg):
    m = fastlstm.LSTM(I, H, **cfg)
    bound = 1 / math.sqrt(H)
    for name, p in m.named_parameters():
        assert p.abs().max() <= bound, name
        assert p.unique().numel() > p.numel() // 2, f"{name} is not random"
        # roughly uniform: mean ≈ 0, variance ≈ bound² / 3
        if p.numel() >= 24:
            assert abs(p.mean().item()) < 4 * bound / math.sqrt(3 * p.numel()), name
            assert 0.3 < p.var().item() / (bound**2 / 3) < 1.8, name
    # the same generator draws give exactly nn.LSTM's initial weights
    seed = int(torch.randint(0, 2**31, ()).item())
    torch.manual_seed(seed)
    ours = fastlstm.LSTM(I, H, **cfg)
    torch.manual_seed(seed)
    theirs = nn.LSTM(I, H, **cfg)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_state_dict_both_ways(cfg):
    theirs = nn.LSTM(I, H, dtype=F64, **cfg)
    ours = fastlstm.LSTM(I, H, dtype=F64, backend="reference", **cfg)
    assert list(ours.state_dict().keys()) == list(theirs.state_dict().keys())
    assert [v.shape for v in ours.state_dict().values()] == [v.shape for v in theirs.state_dict().values()]
    x = _randn(T, B, I).transpose(0, 1).contiguous() if cfg.get("batch_first") else _randn(T, B, I)
    # nn.LSTM -> fastlstm
    ours.load_state_dict(theirs.state_dict())
    assert_module_parity(ours, theirs, x)
    # fastlstm -> nn.LSTM (fresh weights on our side first)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(-0.5, 0.5)
    theirs.load_state_dict(ours.state_dict())
    assert_module_parity(ours, theirs, x)
    for (n, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n


@pytest.mark.parametrize(
    "args,kwargs",
    [
        ((I, H), {}),
        ((I, H, 3), {"bias": False, "batch_first": True, "dropout": 0.5, "bidirectional": True, "proj_size": P}),
        ((I, H), {"proj_size": 2}),
        ((I, H, 2), {"dropout": 0.1}),
    ],
)
def test_repr_matches_nn_lstm(args, kwargs):
    ours, theirs = fastlstm.LSTM(*args, **kwargs), nn.LSTM(*args, **kwargs)
    assert ours.extra_repr() == theirs.extra_repr()
    assert repr(ours).replace(type(ours).__name__, "LSTM") == repr(theirs)
    # the extra options show up only when they differ from their defaults
    assert "backend='reference'" in repr(fastlstm.LSTM(*args, backend="reference", **kwargs))
    assert "telemetry=False" in repr(fastlstm.LSTM(*args, telemetry=False, **kwargs))


def test_flatten_parameters_harmless():
    ref, fast = make_pair(I, H, 2, bidirectional=True)
    before = [p for p in fast.parameters()]
    x = _randn(T, B, I)
    out = fast(x)[0]
    fast.flatten_parameters()
    assert [p for p in fast.parameters()] == before  # same Parameter objects
    assert torch.equal(fast(x)[0], out)
    assert_module_parity(fast, ref, x)


def test_telemetry_is_not_module_state():
    """The counters are neither parameters nor buffers (DDP would broadcast buffers from rank 0, `.half()` would
    cast them): named_buffers and state_dict are nn.LSTM's, and load_state_dict(assign=True) on a meta-built
    module brings the telemetry to the loaded parameters' device."""
    ref = nn.LSTM(I, H, 2, proj_size=P, dtype=F64)
    ours = fastlstm.LSTM(I, H, 2, proj_size=P, dtype=F64, device="meta", backend="reference")
    assert list(ours.named_buffers()) == list(ref.named_buffers()) == []
    ours.load_state_dict(ref.state_dict(), assign=True)
    assert ours.weight_hh_l1.device.type == "cpu" and ours.telemetry.passes.device.type == "cpu"
    assert_module_parity(ours, ref, _randn(T, B, I))
    assert ours.telemetry.snapshot().layers[0].elements == T * B * H
    half = copy.deepcopy(ours).half()
    assert half.telemetry.stats.dtype == F64  # counts stay exact whatever the parameters' dtype


# ---- replacing and substituting parameters ----


def test_reassigned_parameter_is_used():
    ref, fast = make_pair(I, H, 2, proj_size=P)
    x = _randn(T, B, I)
    before = fast(x)[0].detach()
    new_hh = torch.randn_like(ref.weight_hh_l0)
    new_hr = torch.randn_like(ref.weight_hr_l1)
    for m in (ref, fast):
        m.weight_hh_l0 = nn.Parameter(new_hh.clone())
        m.weight_hr_l1 = nn.Parameter(new_hr.clone())
    assert not torch.allclose(fast(x)[0], before)
    assert any(p is fast.weight_hh_l0 for p in fast.parameters())
    assert_module_parity(fast, ref, x)
    assert fast.weight_hh_l0.grad is not None and fast.weight_hr_l1.grad is not None


def test_functional_call_matches_nn_lstm():
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=P)
    x = _randn(T, B, I)
    subs = {n: leaf(torch.randn_like(p) * 0.5) for n, p in ref.named_parameters() if n.endswith(("l0", "l1_reverse"))}
    results = []
    for m in (ref, fast):
        for s in subs.values():
            s.grad = None
        out, (h, c) = torch.func.functional_call(m, subs, (x,))
        (out.square().sum() + h.sum() + c.sum()).backward()
        results.append((out, h, c, {n: s.grad.clone() for n, s in subs.items()}))
        assert all(p.grad is None for n, p in m.named_parameters() if n in subs)  # the originals were not used
    (fo, fh, fc, fg), (ro, rh, rc, rg) = results[1], results[0]
    for a, b, what in ((fo, ro, "output"), (fh, rh, "h_n"), (fc, rc, "c_n")):
        assert_rel(a, b, tolerance(F64), what)
    for n in subs:
        assert_rel(fg[n], rg[n], tolerance(F64), n)
    assert not torch.allclose(fast(x)[0], fo)  # and the module's own weights are back afterwards


@pytest.mark.parametrize("route", ["auto", "auto-no-grad", "reference"])
def test_functional_call_with_parameters_of_another_dtype_matches_nn_lstm(route):
    """float32 parameters through functional_call on a float64 module, float32 input: nn.LSTM runs in float32, so
    every route's checks must read the parameters of the call, not the module's own."""
    ref = nn.LSTM(I, H, 2, dtype=F64)
    fast = fast_like(ref, backend="reference" if route == "reference" else "auto")
    subs = {n: p.detach().float() for n, p in ref.named_parameters()}
    x = _randn(T, B, I).float()
    want, got = (_run_route(route, torch.func.functional_call, m, subs, (x,)) for m in (ref, fast))
    for a, b, what in zip((got[0], *got[1]), (want[0], *want[1]), ("output", "h_n", "c_n")):
        assert a.dtype == torch.float32, what
        assert_rel(a, b, tolerance(torch.float32), what)


class _Symmetric(nn.Module):
    """A simple custom parametrization: W -> (W + flip(W)) / 2 · scale."""

    def forward(self, w):
        return (w + w.flip(0)) * 0.75


@pytest.mark.parametrize("kind", ["custom", "orthogonal", "weight_norm"])
def test_parametrizations_match_nn_lstm(kind):
    ref, fast = make_pair(I, H, 2)
    x = _randn(T, B, I)
    plain = fast(x)[0].detach()
    seed = int(torch.randint(0, 2**31, ()).item())
    for m in (ref, fast):
        torch.manual_seed(seed)
        if kind == "custom":
            parametrize.register_parametrization(m, "weight_hh_l0", _Symmetric())
        elif kind == "orthogonal":
            orthogonal(m, "weight_hh_l0")
        else:
            weight_norm(m, "weight_hh_l0")
            with torch.no_grad():  # make the magnitudes differ from the original norms
                m.parametrizations.weight_hh_l0.original0.mul_(torch.linspace(0.5, 2, 4 * H, dtype=F64)[:, None])
    assert torch.equal(fast.weight_hh_l0, ref.weight_hh_l0)
    assert not torch.allclose(fast(x)[0], plain)
    assert_module_parity(fast, ref, x)
    grads = [p.grad for n, p in fast.named_parameters() if "parametrizations" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# ---- dtype and device ----


@pytest.mark.parametrize("how", ["to", "double"])
def test_to_float64(how):
    ref32 = nn.LSTM(I, H, 2, bidirectional=True, proj_size=P)
    fast32 = fast_like(ref32)
    ref = ref32.to(F64) if how == "to" else ref32.double()
    fast = fast32.to(F64) if how == "to" else fast32.double()
    assert all(p.dtype == F64 for p in fast.parameters())
    assert_module_parity(fast, ref, _randn(T, B, I))


def test_half_runs_close_to_float32():
    ref, fast32 = make_pair(I, H, 2, proj_size=P, dtype=torch.float32)
    x = torch.randn(T, B, I)
    hx = (torch.randn(2, B, P), torch.randn(2, B, H))
    expected = ref(x, hx)
    half = copy.deepcopy(fast32).half()
    assert all(p.dtype == torch.float16 for p in half.parameters())
    x16 = leaf(x.half())
    out, (h, c) = half(x16, tuple(t.half() for t in hx))
    assert out.dtype == h.dtype == c.dtype == torch.float16
    assert_rel(out, expected[0], 1e-2, "output")
    assert_rel(h, expected[1][0], 1e-2, "h_n")
    assert_rel(c, expected[1][1], 1e-2, "c_n")
    out.float().sum().backward()
    assert x16.grad.dtype == torch.float16 and torch.isfinite(x16.grad).all()
    assert all(p.grad.dtype == torch.float16 for p in half.parameters())


def test_meta_construction_and_to_empty():
    m = fastlstm.LSTM(I, H, 2, bidirectional=True, proj_size=P, device="meta", dtype=F64, backend="reference")
    assert all(p.is_meta for p in m.parameters())
    ref = nn.LSTM(I, H, 2, bidirectional=True, proj_size=P, dtype=F64)
    assert [(n, p.shape) for n, p in m.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    m = m.to_empty(device="cpu")
    assert all(p.device.type == "cpu" and p.dtype == F64 for p in m.parameters())
    assert m.telemetry.passes.device.type == "cpu"
    m.load_state_dict(ref.state_dict())
    assert_module_parity(m, ref, _randn(T, B, I))
    # reset_parameters after to_empty gives a valid init again
    m.reset_parameters()
    assert all(p.abs().max() <= 1 / math.sqrt(H) for p in m.parameters())


def test_more_layer_directions_than_telemetry_locates_are_refused_at_construction():
    """The one size nn.LSTM takes and fastlstm does not: past 256 layer-directions, a ValueError at once (with
    telemetry off too: it can be switched on later), never a failure inside a pass."""
    ref = nn.LSTM(1, 1, 128, bidirectional=True, dtype=F64)
    assert_module_parity(fast_like(ref), ref, _randn(2, 1, 1))  # 256: the most it takes
    for build in (
        lambda: fastlstm.LSTM(1, 1, 129, bidirectional=True, telemetry=False),
        lambda: fastlstm.LSTM.from_torch(nn.LSTM(1, 1, 257)),
    ):
        with pytest.raises(ValueError, match="at most 256 layer-directions"):
            build()


# ---- copying and pickling ----


def _trained_copy_check(original, clone, ref):
    x = _randn(T, B, I)
    assert type(clone) is type(original)
    assert clone.backend == original.backend
    assert_module_parity(clone, ref, x)
    for (n, a), (_, b) in zip(clone.named_parameters(), original.named_parameters()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), n
    with torch.no_grad():
        clone.weight_hh_l0.add_(1.0)  # independent storage
    assert not torch.equal(clone.weight_hh_l0, original.weight_hh_l0)
    # the copy's telemetry window works on its own
    clone.telemetry.reset()
    out, (_h, _c) = clone(x)
    out.sum().backward()
    snap = clone.telemetry.snapshot()
    assert snap.layers[0].elements == T * B * H


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_copy_and_pickle(how):
    ref, fast = make_pair(I, H, 2, bidirectional=True, proj_size=P)
    out = fast(_randn(T, B, I))[0]
    out.sum().backward()  # a used module: telemetry counters exist, grads exist
    if how == "deepcopy":
        clone = copy.deepcopy(fast)
    else:
        buf = io.BytesIO()
        torch.save(fast, buf)
        buf.seek(0)
        clone = torch.load(buf, weights_only=False)
    _trained_copy_check(fast, clone, ref)


# ---- input errors: same exception type and message as nn.LSTM ----

BAD_INPUTS = {
    "4d_input": lambda: (_randn(T, B, I, 2), None),
    "1d_input": lambda: (_randn(I), None),
    "feature_size": lambda: (_randn(T, B, I + 1), None),
    "unbatched_feature_size": lambda: (_randn(T, I - 1), None),
    "h0_batch": lambda: (_randn(T, B, I), (_randn(2, B + 1, H), _randn(2, B, H))),
    "c0_size": lambda: (_randn(T, B, I), (_randn(2, B, H), _randn(2, B, H + 1))),
    "h0_layers": lambda: (_randn(T, B, I), (_randn(1, B, H), _randn(1, B, H))),
    "hx_2d_for_3d": lambda: (_randn(T, B, I), (_randn(2, H), _randn(2, H))),
    "hx_3d_for_2d": lambda: (_randn(T, I), (_randn(2, 1, H), _randn(2, 1, H))),
    "input_dtype": lambda: (torch.randn(T, B, I, dtype=torch.float32), None),
    "input_int": lambda: (torch.randint(0, 3, (T, B, I)), None),
    "seq_len_0": lambda: (_randn(0, B, I), None),
    "seq_len_0_unbatched": lambda: (_randn(0, I), None),
}


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_input_errors_match_nn_lstm(case, batch_first):
    ref, fast = make_pair(I, H, 2, batch_first=batch_first)
    x, hx = BAD_INPUTS[case]()
    if batch_first and x.dim() == 3:
        x = x.transpose(0, 1)
    with pytest.raises(Exception) as expected:
        ref(x, hx)
    with pytest.raises(expected.type) as got:
        fast(x, hx)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("with_hx", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_packed_input_of_another_dtype_raises_what_nn_lstm_raises(with_hx, grad):
    """nn.LSTM checks a packed input's dtype only when hx is given (ValueError); without hx its first product fails
    (RuntimeError). fastlstm checks it always, with an error of nn.LSTM's type in both cases, naming both dtypes."""
    ref, fast = make_pair(I, H, 2)
    x = pack(torch.randn(T, B, I), [5, 3, 2], False, True)
    hx = (_randn(2, B, H), _randn(2, B, H)) if with_hx else None
    with torch.set_grad_enabled(grad):
        with pytest.raises(Exception) as expected:
            ref(x, hx)
        for module in (fast, fast_like(ref, backend="auto")):
            with pytest.raises(expected.type, match=r"input dtype \(torch.float32\) does not match weight dtype"):
                module(x, hx)


# Every way a forward can run on the CPU: backend "auto" recording (native-recorded) and not (PyTorch's op, as under
# no_grad, where nothing records), and the reference backend.
ROUTES = {
    "auto": lambda ref: fast_like(ref, backend="auto"),
    "auto-no-grad": lambda ref: fast_like(ref, backend="auto"),
    "reference": lambda ref: fast_like(ref),
}


def _run_route(route, module, *args):
    with torch.set_grad_enabled(route != "auto-no-grad"):
        return module(*args)


HX_FORMS = {
    "one-tensor": lambda h: h,
    "stacked": lambda h: torch.stack([h, h]),
    "one-item": lambda h: (h,),
    "empty": lambda h: (),
    "three-items": lambda h: (h, h, h),
    "none-cell": lambda h: (h, None),
    "nones": lambda h: (None, None),
    "numbers": lambda h: (1.0, 2.0),
}
HX_INPUTS = {
    "batched": lambda: (_randn(T, B, I), _randn(1, B, H)),
    "unbatched": lambda: (_randn(T, I), _randn(1, H)),
    "packed": lambda: (pack(_randn(T, B, I), [5, 3, 2], False, True), _randn(1, B, H)),
    "unsorted": lambda: (pack(_randn(T, B, I), [2, 5, 3], False, False), _randn(1, B, H)),
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("kind", list(HX_INPUTS))
@pytest.mark.parametrize("form", list(HX_FORMS))
def test_hx_not_a_pair_fails_as_nn_lstm_fails_or_says_so(route, kind, form):
    # nn.LSTM does not check hx's form: a malformed one fails where it is first used, with an IndexError,
    # AttributeError, TypeError or RuntimeError by form and input kind, or happens to run. fastlstm says what is wrong
    # with an error of nn.LSTM's type wherever nn.LSTM fails, and refuses the forms that happen to run.
    ref = nn.LSTM(I, H, dtype=F64)
    fast = ROUTES[route](ref)
    x, h = HX_INPUTS[kind]()
    hx = HX_FORMS[form](h)
    try:
        ref(x, hx)
        expected = HiddenStateFormError
    except Exception as error:  # noqa: BLE001 - whatever nn.LSTM raises is the type to match
        expected = type(error)
    with pytest.raises(expected, match="hx") as got:
        _run_route(route, fast, x, hx)
    assert isinstance(got.value, HiddenStateFormError)


@pytest.mark.parametrize("route", list(ROUTES))
def test_input_not_a_tensor_fails_as_nn_lstm_fails(route):
    ref = nn.LSTM(I, H, dtype=F64)
    fast = ROUTES[route](ref)
    for bad in ([[[1.0] * I]], None, 3.0):
        with pytest.raises(Exception) as expected:
            ref(bad)
        with pytest.raises(expected.type, match="expected a Tensor or PackedSequence"):
            _run_route(route, fast, bad)


@pytest.mark.parametrize("route", list(ROUTES))
def test_packed_wrong_hx_batch_and_feature_size(route):
    # Where nn.LSTM permutes an unsorted PackedSequence's hx before checking it (dropping the surplus rows of too
    # large a batch without a word), every route checks it first.
    ref = nn.LSTM(I, H, 2, dtype=F64)
    fast = ROUTES[route](ref)
    lengths = [5, 3, 2]
    packed = pack(_randn(5, 3, I), lengths, False, True)
    unsorted = pack(_randn(5, 3, I), [2, 5, 3], False, False)
    for x in (packed, unsorted):
        for batch in (2, 4):
            with pytest.raises(RuntimeError, match=rf"Expected hidden\[0\] size \(2, 3, 6\), got \[2, {batch}, 6\]"):
                _run_route(route, fast, x, (_randn(2, batch, H), _randn(2, batch, H)))
        with pytest.raises(RuntimeError, match=r"Expected hidden\[1\] size \(2, 3, 6\), got \[2, 4, 6\]"):
            _run_route(route, fast, x, (_randn(2, 3, H), _randn(2, 4, H)))
    with pytest.raises(RuntimeError, match="hx and cx should also be 3-D"):
        _run_route(route, fast, packed, (_randn(3, H), _randn(3, H)))
    for features in (I - 1, I + 1):
        bad = pack(_randn(5, 3, features), lengths, False, True)
        with pytest.raises(RuntimeError, match=f"input_size. Expected {I}, got {features}"):
            _run_route(route, fast, bad)


@pytest.mark.parametrize("route", list(ROUTES))
def test_a_packed_sequence_without_steps_fails_as_nn_lstm_fails(route):
    ref = nn.LSTM(I, H, dtype=F64)
    empty = nn.utils.rnn.PackedSequence(_randn(0, I), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(IndexError):
        ref(empty)
    with pytest.raises(IndexError, match="no steps"):
        _run_route(route, ROUTES[route](ref), empty)


@pytest.mark.parametrize("c0_dtype", [torch.float32, torch.int64, torch.bool])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_narrower_c0_is_widened_as_nn_lstm_does(route, c0_dtype):
    # nn.LSTM runs a float64 layer from a float32, integer or bool c0 (its arithmetic promotes it): so does every
    # route, to its results.
    ref = nn.LSTM(I, H, dtype=F64)
    fast = ROUTES[route](ref)
    x, h0, c0 = _randn(T, B, I), _randn(1, B, H), (torch.randn(1, B, H) * 3).to(c0_dtype)
    expected = ref(x, (h0, c0))
    got = _run_route(route, fast, x, (h0, c0))
    for a, b in zip((got[0], *got[1]), (expected[0], *expected[1])):
        assert a.dtype == b.dtype == F64
        assert_rel(a, b, tolerance(F64))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("c0_dtype", [torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize("route", list(ROUTES))
def test_a_narrower_c0_of_a_float32_layer_is_widened_on_every_route(route, c0_dtype, packed):
    # With float32 weights nn.LSTM's CPU op (oneDNN) refuses the mix instead of promoting; fastlstm converts c0 on
    # every route, to what nn.LSTM gives for the converted c0.
    ref = nn.LSTM(I, H)
    fast = ROUTES[route](ref)
    x, h0 = torch.randn(T, B, I), torch.randn(1, B, H)
    c0 = (torch.randn(1, B, H) * 3).to(c0_dtype)
    x_in = pack(x, [T, T - 1, 2], False, True) if packed else x
    expected = ref(x_in, (h0, c0.float()))
    got = _run_route(route, fast, x_in, (h0, c0))
    expected_out, got_out = (o.data if packed else o for o in (expected[0], got[0]))
    for a, b in zip((got_out, *got[1]), (expected_out, *expected[1])):
        assert a.dtype == b.dtype == torch.float32
        assert_rel(a, b, tolerance(torch.float32))


# ---- conversion ----


def test_from_torch_shares_parameters():
    ref = nn.LSTM(I, H, 2, bias=False, batch_first=True, dropout=0.2, bidirectional=True, proj_size=P, dtype=F64)
    ref.eval()
    fast = fastlstm.LSTM.from_torch(ref, backend="reference")
    assert isinstance(fast, fastlstm.LSTM) and fast.backend == "reference"
    assert not fast.training
    assert repr(fast).replace(", backend='reference'", "") == repr(ref)
    for (n, a), (m, b) in zip(fast.named_parameters(), ref.named_parameters()):
        assert n == m and a is b
    assert_module_parity(fast, ref, _randn(B, T, I))
    assert fast.telemetry.passes.device == ref.weight_ih_l0.device  # built on meta, but its telemetry is not
    assert fast.telemetry.snapshot().layers[0].elements == B * T * H
    with pytest.raises(TypeError):
        fastlstm.LSTM.from_torch(nn.GRU(I, H))
    parametrized = nn.LSTM(I, H)
    parametrize.register_parametrization(parametrized, "weight_hh_l0", _Symmetric())
    with pytest.raises(ValueError, match="weight_hh_l0"):
        fastlstm.LSTM.from_torch(parametrized)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, I)
        self.encoder = nn.LSTM(I, H, 2, batch_first=True, bidirectional=True)
        self.inner = nn.Sequential(nn.Tanh(), nn.LSTM(2 * H, H, proj_size=P, batch_first=True))
        self.head = nn.Linear(P, 2)

    def forward(self, x):
        y, _ = self.encoder(self.embed(x))
        y, (h, _) = self.inner[1](self.inner[0](y))
        return self.head(y + h[-1].unsqueeze(1))


def test_convert_keeps_a_module_held_under_two_names_shared_and_leaves_subclasses_with_their_forward():
    model = nn.Module()
    model.a = nn.LSTM(I, H, dtype=F64)
    model.b = model.a  # named_children() yields it once: conversion must reach both names
    fastlstm.convert(model)
    assert type(model.a) is fastlstm.LSTM and model.b is model.a
    fastlstm.revert(model)
    assert type(model.a) is nn.LSTM and model.b is model.a

    class Doubled(nn.LSTM):
        def forward(self, input, hx=None):
            out, state = super().forward(input, hx)
            return 2 * out, state

    model.c = Doubled(I, H, dtype=F64)
    x = _randn(T, B, I)
    expected = model.c(x)[0]
    with pytest.warns(UserWarning, match="Doubled"):
        fastlstm.convert(model)
    assert type(model.c) is Doubled and type(model.a) is fastlstm.LSTM
    assert torch.equal(model.c(x)[0], expected)


def test_convert_and_revert_refuse_what_is_not_a_module():
    for fn in (fastlstm.convert, fastlstm.revert):
        with pytest.raises(TypeError, match="expected an nn.Module, got NoneType"):
            fn(None)


def test_convert_nested_model():
    model = _Net().double()
    model.inner.eval()  # mixed training modes are kept per module
    x = _randn(B, T, 3)
    before = model(x).detach()
    old_encoder, old_inner = model.encoder, model.inner[1]
    names_before = [n for n, _ in model.named_parameters()]
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    converted = fastlstm.convert(model, backend="reference")
    assert converted is model
    assert isinstance(model.encoder, fastlstm.LSTM) and isinstance(model.inner[1], fastlstm.LSTM)
    assert not any(type(m) is nn.LSTM for m in model.modules())
    assert model.encoder.training and not model.inner[1].training
    assert model.encoder.batch_first and model.encoder.bidirectional and model.inner[1].proj_size == P
    assert all(p.dtype == F64 for p in model.parameters())
    assert [n for n, _ in model.named_parameters()] == names_before
    assert all(a is b for a, b in zip(model.parameters(), params_before))
    assert_rel(model(x), before, tolerance(F64), "converted model output")

    # the optimizer built before the conversion trains the new modules
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    model(x).square().sum().backward()
    assert model.encoder.weight_hh_l1_reverse.grad is not None
    opt.step()
    for n, p in model.named_parameters():
        assert not torch.equal(p, snapshot[n]), f"{n} was not updated"
    assert torch.equal(old_encoder.weight_hh_l0, model.encoder.weight_hh_l0)  # shared, so the old one moved too
    assert torch.equal(old_inner.weight_hr_l0, model.inner[1].weight_hr_l0)

    # a bare nn.LSTM converts to a new module
    lone = nn.LSTM(I, H)
    new = fastlstm.convert(lone)
    assert isinstance(new, fastlstm.LSTM) and new.weight_ih_l0 is lone.weight_ih_l0
