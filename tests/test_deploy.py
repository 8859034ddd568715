"""fastlstm.LSTM wherever nn.LSTM goes (docs/deploy.md), each path checked against nn.LSTM's own results:
exported, traced and scripted programs hold PyTorch's LSTM op and run in a process where fastlstm cannot be
imported; ONNX files from both exporters run in onnxruntime at other shapes; torch.func transforms; exact second
derivatives; quantize_dynamic; whole-model pickles under weights_only; revert()."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastlstm

try:
    from support import assert_rel, fast_like, leaf, make_pair, mixed_lengths, pack, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_rel, fast_like, leaf, make_pair, mixed_lengths, pack, tolerance

pytestmark = [
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit, torch.ao.quantization, legacy ONNX
]


class _Tagger(nn.Module):
    """A small model around an LSTM, as a user would deploy one."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.lstm = nn.LSTM(4, 6, 2, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        y, (_h, c) = self.lstm(torch.tanh(self.embed(x)))
        return self.head(y) + c[-1].sum(-1, keepdim=True).unsqueeze(1)


class _PackedEncoder(nn.Module):
    """PackedSequence in, final states out: the packed native path, also under TorchScript."""

    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2)

    def forward(self, x, lengths):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, (h, c) = self.lstm(packed)
        return out.data.sum() + h.sum(0) + c.sum(0).sum(-1, keepdim=True)


def _converted(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(the nn.LSTM model, a converted deep copy of it), both in eval mode."""
    model.eval()
    return model, fastlstm.convert(copy.deepcopy(model))


def _call_targets(program) -> set:
    return {node.target for node in program.graph.nodes if node.op == "call_function"}


# The child process cannot import fastlstm: a meta-path finder refuses it before any other finder is asked.
_CHILD = textwrap.dedent(
    """
    import importlib.abc, sys

    class NoFastlstm(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastlstm" or name.startswith("fastlstm."):
                raise ImportError("fastlstm is blocked in this process")

    sys.meta_path.insert(0, NoFastlstm())
    try:
        import fastlstm  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("fastlstm was importable")
    import torch

    folder = sys.argv[1]
    cases = torch.load(folder + "/cases.pt")
    loaded = {
        "pt2": torch.export.load(folder + "/model.pt2").module(),
        "traced": torch.jit.load(folder + "/traced.pt"),
        "scripted": torch.jit.load(folder + "/scripted.pt"),
        "scripted_packed": torch.jit.load(folder + "/scripted_packed.pt"),
    }
    outputs = [loaded[name](*inputs) for name, inputs, _ in cases]
    assert "fastlstm" not in sys.modules
    torch.save(outputs, folder + "/outputs.pt")
    """
)


def test_exported_traced_and_scripted_programs_hold_aten_lstm_and_run_without_fastlstm(tmp_path):
    ref, model = _converted(_Tagger())
    packed_ref, packed_model = _converted(_PackedEncoder())
    x = torch.randn(2, 3, 3)  # few steps: run_decompositions unrolls aten.lstm over time, as for nn.LSTM
    program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim("batch")},))
    targets = _call_targets(program)
    assert torch.ops.aten.lstm.input in targets
    assert not any("fastlstm" in str(t) for t in targets)
    torch.export.save(program.run_decompositions(), tmp_path / "model.pt2")
    torch.jit.trace(model, x, check_trace=False).save(tmp_path / "traced.pt")
    torch.jit.script(model).save(tmp_path / "scripted.pt")
    torch.jit.script(packed_model).save(tmp_path / "scripted_packed.pt")
    # Scripting compiles the native path in place: the Python models keep their fastlstm modules.
    assert isinstance(model.lstm, fastlstm.LSTM) and isinstance(packed_model.lstm, fastlstm.LSTM)

    cases = []
    with torch.no_grad():
        for batch, steps in ((5, 3), (1, 3)):  # torch.export fixes T (aten.lstm's shape rule), as for nn.LSTM
            xb = torch.randn(batch, steps, 3)
            cases.append(("pt2", (xb,), ref(xb)))
        for name in ("traced", "scripted"):
            for batch, steps in ((4, 7), (3, 12)):
                xb = torch.randn(batch, steps, 3)
                cases.append((name, (xb,), ref(xb)))
        for batch, steps in ((4, 6), (2, 9)):
            xb, lengths = torch.randn(steps, batch, 3), torch.tensor(mixed_lengths(steps, batch, sorted_=False))
            cases.append(("scripted_packed", (xb, lengths), packed_ref(xb, lengths)))
    torch.save(cases, tmp_path / "cases.pt")
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300, check=False
    )
    assert child.returncode == 0, child.stderr[-3000:]
    outputs = torch.load(tmp_path / "outputs.pt")
    assert len(outputs) == len(cases)
    for got, (name, inputs, expected) in zip(outputs, cases):
        assert_rel(got, expected, 1e-6, f"{name} at {tuple(inputs[0].shape)} against nn.LSTM")


def test_scripting_leaves_the_python_model_as_it_was():
    # torch.jit.script puts what __prepare_scriptable__ returns in the parent's place: the module itself under a
    # scriptable class, which its next use from Python turns back into an LSTM.
    ref, model = _converted(_Tagger())
    model.train()
    ref.train()
    lstm = model.lstm
    x = torch.randn(2, 5, 3)
    scripted = torch.jit.script(model)
    assert model.lstm is lstm
    with torch.no_grad():
        assert_rel(scripted(x), ref(x), 1e-6, "scripted")
    model(x).square().sum().backward()
    assert type(model.lstm) is fastlstm.LSTM
    assert lstm.telemetry.snapshot().launches == 4  # the eager pass recorded: each layer's forward and backward
    ref(x).square().sum().backward()
    for (name, got), expected in zip(model.named_parameters(), ref.parameters()):
        assert_rel(got.grad, expected.grad, 1e-5, name)
    torch.jit.script(model)
    lstm(torch.randn(5, 2, 4), resets=torch.zeros(5, 2, dtype=torch.bool))  # resets reach the Python forward again
    torch.jit.script(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with fastlstm.safe_globals([_Tagger, nn.Linear]):
        loaded = torch.load(buffer, weights_only=True)
    assert type(loaded.lstm) is fastlstm.LSTM and type(model.lstm) is fastlstm.LSTM
    torch.jit.script(model)
    assert type(copy.deepcopy(model).lstm) is fastlstm.LSTM


class _NamedLSTM(fastlstm.LSTM):
    """A subclass that adds a method and keeps LSTM's forward."""

    def describe(self) -> str:
        return f"{self.num_layers} layers"


class _DoubledLSTM(fastlstm.LSTM):
    """A subclass with its own forward, which a scripted fastlstm.LSTM (nn.LSTM's forward) would drop."""

    def forward(self, input, hx=None):
        out, state = super().forward(input, hx)
        return out * 2.0, state


class _Holder(nn.Module):
    def __init__(self, lstm: nn.Module):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0]


def test_scripting_keeps_a_subclass_and_refuses_one_with_its_own_forward():
    ref = nn.LSTM(3, 4, 2)
    x = torch.randn(5, 2, 3)
    named = _Holder(_NamedLSTM(3, 4, 2))
    named.lstm.load_state_dict(ref.state_dict())
    scripted = torch.jit.script(named)
    with torch.no_grad():
        assert_rel(scripted(x), ref(x)[0], 1e-6, "scripted subclass")
        named(x)
    assert type(named.lstm) is _NamedLSTM and named.lstm.describe() == "2 layers"
    doubled = _Holder(_DoubledLSTM(3, 4, 2))
    doubled.lstm.load_state_dict(ref.state_dict())
    with pytest.raises(RuntimeError, match="_DoubledLSTM, a subclass of fastlstm.LSTM with its own forward"):
        torch.jit.script(doubled)
    assert type(doubled.lstm) is _DoubledLSTM
    with torch.no_grad():
        assert_rel(doubled(x), 2.0 * ref(x)[0], 1e-6, "the subclass's own forward")


def test_export_and_tracing_record_no_telemetry_and_leave_the_module_as_it_was():
    _, model = _converted(_Tagger())
    lstm = model.lstm
    x = torch.randn(2, 5, 3)
    model(x)
    before = lstm.telemetry.snapshot()
    assert before.launches == 2  # the eager pass did record
    torch.export.export(model, (x,))
    # check_trace=True would compare the trace with one ordinary eager call, which records like any other
    torch.jit.trace(model, x, check_trace=False)
    assert lstm.telemetry.snapshot().to_dict() == before.to_dict()
    assert lstm.backend == "auto" and lstm.telemetry.enabled
    model(x)
    assert lstm.telemetry.snapshot().launches == 4  # and eager passes record again afterwards


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_runs_in_onnxruntime_at_other_batch_sizes_and_lengths(tmp_path, dynamo):
    import onnx
    import onnxruntime

    ref, model = _converted(_Tagger())
    x = torch.randn(2, 7, 3)
    path = str(tmp_path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            # The exporter swaps in a while_loop form of aten.lstm for a dynamic T, but (torch 2.13) an earlier
            # torch.export in the same process leaves aten.lstm's dispatch cached, and T static: nn.LSTM alike.
            getattr(torch.ops.aten.lstm.input, "_dispatch_cache", {}).clear()
            shapes = ({0: Dim("batch"), 1: Dim("steps")},)
            torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=shapes, verbose=False).save(path)
        else:
            axes = {"x": {0: "batch", 1: "steps"}}
            torch.onnx.export(model, (x,), path, dynamo=False, input_names=["x"], dynamic_axes=axes)
    graph = onnx.load(path).graph
    assert "LSTM" in {node.op_type for node in graph.node}  # ONNX's own LSTM operator, which runtimes lower
    assert all(node.domain in ("", "ai.onnx") for node in graph.node)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch, steps in ((5, 11), (1, 3), (3, 7)):
        xb = torch.randn(batch, steps, 3)
        (got,) = session.run(None, {name: xb.numpy()})
        assert_rel(
            torch.from_numpy(got), ref(xb), tolerance(torch.float32), f"onnxruntime at batch {batch}, {steps} steps"
        )


# ---- torch.func and higher derivatives ----


def test_torch_func_transforms_match_nn_lstm_and_record_nothing():
    ref, fast = make_pair(3, 4, 2, bidirectional=True, proj_size=2)  # fast: backend="reference", telemetry on
    params = {name: p.detach() for name, p in ref.named_parameters()}
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    cotangent = torch.randn(5, 2, 4, dtype=torch.float64)
    results = []
    for module in (ref, fast):

        def output(p, x, module=module):
            return torch.func.functional_call(module, p, (x,))[0]

        grads = torch.func.grad(lambda p, x: output(p, x).square().sum())(params, x)
        _, pullback = torch.func.vjp(lambda x: output(params, x), x)
        jacobian = torch.func.jacrev(output, argnums=(0, 1))(params, x)
        results.append((grads, pullback(cotangent)[0], jacobian))
    (r_grads, r_vjp, r_jac), (f_grads, f_vjp, f_jac) = results
    for name in params:
        assert_rel(f_grads[name], r_grads[name], tolerance(torch.float64), f"grad {name}")
        assert_rel(f_jac[0][name], r_jac[0][name], tolerance(torch.float64), f"jacrev {name}")
    assert_rel(f_vjp, r_vjp, tolerance(torch.float64), "vjp")
    assert_rel(f_jac[1], r_jac[1], tolerance(torch.float64), "jacrev input")
    assert fast.telemetry.snapshot().launches == 0  # torch.func passes run PyTorch's op, which records nothing


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_forward_mode_ad_matches_nn_lstm(backend):
    import torch.autograd.forward_ad as fwAD

    ref, _ = make_pair(3, 4, 2, bidirectional=True)
    fast = fast_like(ref, backend=backend)
    x, tangent = torch.randn(5, 2, 3, dtype=torch.float64), torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for module in (ref, fast):
        with fwAD.dual_level():
            out, (h_n, c_n) = module(fwAD.make_dual(x, tangent))
            results.append([fwAD.unpack_dual(t) for t in (out, h_n, c_n)])
    for (r_primal, r_tangent), (f_primal, f_tangent) in zip(*results):
        assert_rel(f_primal, r_primal, tolerance(torch.float64), "primal")
        assert_rel(f_tangent, r_tangent, tolerance(torch.float64), "tangent")


def test_vmap_fails_exactly_as_for_nn_lstm():
    ref, fast = make_pair(3, 4)
    xs = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    with pytest.raises(Exception) as expected:
        torch.func.vmap(lambda x: ref(x)[0])(xs)
    with pytest.raises(expected.type) as got:
        torch.func.vmap(lambda x: fast(x)[0])(xs)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_gradient_penalty_equals_nn_lstm(kind):
    """A second derivative through the fused path (create_graph=True), against nn.LSTM's, for the input and every
    parameter: never None, never zero."""
    ref, fast = make_pair(3, 4, 2, bidirectional=True, proj_size=2)
    lengths = [5, 2, 4] if kind == "packed" else None
    x = leaf(torch.randn(5, 3, 3, dtype=torch.float64))
    results = []
    for module in (ref, fast):
        inputs = pack(x, lengths, False, False) if kind == "packed" else x
        out, (h, c) = module(inputs)
        data = out.data if isinstance(out, PackedSequence) else out
        loss = data.square().sum() + h.sum() + (c * c).sum()
        (dx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (dx * dx).sum()
        names = [n for n, _ in module.named_parameters()]
        second = torch.autograd.grad(penalty, [x, *module.parameters()], allow_unused=True)
        results.append(dict(zip(["input", *names], second)))
    expected, got = results
    for name, value in expected.items():
        assert got[name] is not None and got[name].abs().sum() > 0, name
        assert_rel(got[name], value, 1e-11, f"second derivative for {name}")
    assert fast.telemetry.snapshot().layers[0].backward_passes.max() == 2  # both backwards reached the layers


@pytest.mark.parametrize("kind", ["padded", "packed"])
def test_gradgradcheck_float64(kind):
    _, fast = make_pair(2, 3, 1, bidirectional=True, proj_size=2)
    lengths = [3, 1] if kind == "packed" else None
    names = [n for n, _ in fast.named_parameters()]

    def fn(x, h0, c0, *params):
        inputs = pack(x, lengths, False, False) if kind == "packed" else x
        out, (h, c) = torch.func.functional_call(fast, dict(zip(names, params)), (inputs, (h0, c0)))
        return (out.data if kind == "packed" else out), h, c

    x = leaf(torch.randn(3, 2, 2, dtype=torch.float64))
    h0, c0 = leaf(torch.randn(2, 2, 2, dtype=torch.float64)), leaf(torch.randn(2, 2, 3, dtype=torch.float64))
    params = [leaf(p) for p in fast.parameters()]
    assert torch.autograd.gradgradcheck(fn, (x, h0, c0, *params), fast_mode=True)


# ---- quantization ----


def test_quantize_dynamic_maps_fastlstm_to_pytorchs_dynamic_quantized_lstm():
    from torch.ao.nn.quantized.dynamic import LSTM as QuantizedLSTM
    from torch.ao.quantization import quantize_dynamic

    ref, model = _converted(_Tagger())
    expected = quantize_dynamic(ref, {nn.LSTM, nn.Linear})
    quantized = quantize_dynamic(model, {fastlstm.LSTM, nn.Linear})
    assert type(quantized.lstm) is QuantizedLSTM
    assert isinstance(model.lstm, fastlstm.LSTM)  # not in place: the float model is untouched
    x = torch.randn(3, 6, 3)
    assert torch.equal(quantized(x), expected(x))


def test_quantize_dynamic_warns_when_its_spec_leaves_fastlstm_in_float():
    from torch.ao.quantization import quantize_dynamic

    ref, model = _converted(_Tagger())
    with pytest.warns(UserWarning, match="fastlstm.LSTM stays in floating point"):
        quantized = quantize_dynamic(model, {nn.LSTM, nn.Linear})
    assert isinstance(quantized.lstm, fastlstm.LSTM)
    # the documented alternative: revert first, then the nn.LSTM spec applies
    reverted = quantize_dynamic(fastlstm.revert(model), {nn.LSTM, nn.Linear})
    x = torch.randn(2, 4, 3)
    assert torch.equal(reverted(x), quantize_dynamic(ref, {nn.LSTM, nn.Linear})(x))


# ---- saving whole models ----


def _used(module: fastlstm.LSTM) -> fastlstm.LSTM:
    out, _ = module(torch.randn(4, 2, module.input_size))
    out.sum().backward()
    return module


def test_torch_load_weights_only_needs_one_documented_step():
    lstm = _used(fastlstm.LSTM(3, 4, 2))
    buffer = io.BytesIO()
    torch.save(lstm, buffer)
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError) as refused:  # torch.load defaults to weights_only=True
        torch.load(buffer)
    assert "fastlstm.module.LSTM" in str(refused.value)
    buffer.seek(0)
    with fastlstm.safe_globals():
        loaded = torch.load(buffer)
    assert type(loaded) is fastlstm.LSTM
    assert loaded.telemetry.snapshot().to_dict() == lstm.telemetry.snapshot().to_dict()  # the window travels
    window = loaded.telemetry.snapshot().launches
    _used(loaded)  # the copy's window is its own
    assert loaded.telemetry.snapshot().launches == 2 * window
    assert lstm.telemetry.snapshot().launches == window
    x = torch.randn(5, 2, 3)
    assert torch.equal(loaded(x)[0], lstm(x)[0])


def test_whole_model_with_fastlstm_inside_loads_with_its_own_classes_allowed(tmp_path):
    _, model = _converted(_Tagger())
    path = tmp_path / "model.pt"
    torch.save(model, path)
    with fastlstm.safe_globals([_Tagger, nn.Linear]):
        loaded = torch.load(path)
    x = torch.randn(2, 5, 3)
    assert isinstance(loaded.lstm, fastlstm.LSTM)
    assert torch.equal(loaded(x), model(x))


# ---- back to nn.LSTM ----


def test_revert_gives_nn_lstms_sharing_the_parameters():
    model = fastlstm.convert(_Tagger().double())
    model.lstm.eval()
    params = list(model.parameters())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    before = model(x).detach()
    assert fastlstm.revert(model) is model
    assert type(model.lstm) is nn.LSTM and not model.lstm.training
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert_rel(model(x), before, tolerance(torch.float64), "reverted output")
    lone = fastlstm.LSTM(3, 4, proj_size=2)
    back = fastlstm.revert(lone)
    assert type(back) is nn.LSTM and back.weight_hr_l0 is lone.weight_hr_l0
    assert repr(back) == repr(nn.LSTM(3, 4, proj_size=2))
    parametrize.register_parametrization(lone, "weight_hh_l0", nn.Identity())
    with pytest.raises(ValueError, match="weight_hh_l0"):
        fastlstm.revert(lone)


def test_native_backend_is_nn_lstm_to_the_bit_and_records_nothing():
    ref = nn.LSTM(3, 5, 2, batch_first=True, bidirectional=True)
    fast = fastlstm.LSTM.from_torch(ref, backend="native")
    inputs = (torch.randn(4, 6, 3), torch.randn(6, 3), pack(torch.randn(4, 6, 3), [6, 2, 5, 1], True, False))
    for x in inputs:
        (expected, (h, c)), (got, (h_got, c_got)) = ref(x), fast(x)
        if isinstance(x, PackedSequence):
            expected, got = expected.data, got.data
        assert torch.equal(got, expected) and torch.equal(h_got, h) and torch.equal(c_got, c)
    assert fast.telemetry.snapshot().launches == 0


def test_fx_symbolic_trace_gets_a_clear_error_and_works_after_revert():
    _, model = _converted(_Tagger())
    with pytest.raises(TypeError, match="fastlstm.revert"):
        torch.fx.symbolic_trace(model)
    graph = torch.fx.symbolic_trace(fastlstm.revert(model))
    x = torch.randn(2, 4, 3)
    assert torch.equal(graph(x), model(x))
