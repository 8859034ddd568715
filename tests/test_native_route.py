"""Passes that record no telemetry run PyTorch's own LSTM op under backend="auto": nn.LSTM's results to the bit.

The route is observed two ways: the autograd node of the output (nn.LSTM's own, not fastlstm's _LSTMLayer) and a
spy on fastlstm.native.lstm / lstm_packed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import fastlstm
from fastlstm import module as module_impl
from fastlstm import routing

try:
    from support import leaf, mixed_lengths, pack
except ImportError:  # tests/ turned into a package
    from tests.support import leaf, mixed_lengths, pack

FUSED_NODE = "_LSTMLayerBackward"
# nn.LSTM's own note that oneDNN has no projection path on the CPU: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
CONFIGS = {
    "plain": {},
    "2layer-bidir-proj": {"num_layers": 2, "bidirectional": True, "proj_size": 3},
    "batch_first-nobias": {"batch_first": True, "bias": False},
}


@pytest.fixture
def native_calls(monkeypatch):
    """Names of the native entry points called, in order."""
    calls = []
    for name in ("lstm", "lstm_packed"):
        original = getattr(module_impl.native, name)
        monkeypatch.setattr(module_impl.native, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    return calls


def _pair(telemetry=True, **config):
    ref = nn.LSTM(4, 6, **config)
    fast = fastlstm.LSTM(4, 6, **config, telemetry=telemetry)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(module, x, hx):
    """Output data, h_n, c_n and every gradient (input, state, parameters) of a loss using all three outputs, and
    the name of the output's autograd node."""
    if isinstance(x, PackedSequence):
        x_leaf = leaf(x.data)
        x = PackedSequence(x_leaf, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    else:
        x = x_leaf = leaf(x)
    hx = tuple(leaf(t) for t in hx)
    out, (h_n, c_n) = module(x, hx)
    data = out.data if isinstance(out, PackedSequence) else out
    node = type(data.grad_fn).__name__
    weights = torch.Generator(device=data.device).manual_seed(7)
    loss = (data * torch.randn(data.shape, generator=weights, device=data.device)).sum() + h_n.sum() + (c_n**2).sum()
    loss.backward()
    return node, [data, h_n, c_n, x_leaf.grad, *(t.grad for t in hx), *(p.grad for p in module.parameters())]


def _inputs(ref, packed: bool):
    steps, batch = 7, 4
    dirs = 2 if ref.bidirectional else 1
    real = ref.proj_size or ref.hidden_size
    hx = (torch.randn(ref.num_layers * dirs, batch, real), torch.randn(ref.num_layers * dirs, batch, ref.hidden_size))
    x = torch.randn(batch, steps, 4) if ref.batch_first else torch.randn(steps, batch, 4)
    if packed:
        x = pack(x, mixed_lengths(steps, batch, sorted_=False), ref.batch_first, enforce_sorted=False)
    return x, hx


def _switch_off(fast, how: str) -> None:
    if how == "enabled":
        fast.telemetry.enabled = False
    elif how == "suspended":
        fast.telemetry.suspended = True  # what a sampling Monitor does on its uninstrumented steps


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("how", ["constructor", "enabled", "suspended"])
def test_uninstrumented_passes_are_nn_lstm_to_the_bit(cfg, packed, how, native_calls):
    ref, fast = _pair(telemetry=how != "constructor", **CONFIGS[cfg])
    _switch_off(fast, how)
    x, hx = _inputs(ref, packed)
    node_ref, expected = _run(ref, x, hx)
    node, actual = _run(fast, x, hx)
    assert node == node_ref and node != FUSED_NODE
    assert native_calls == ["lstm_packed" if packed else "lstm"]
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)
    assert fast.telemetry.snapshot().launches == 0


def test_unbatched_input_and_no_hx_take_the_native_route_too(native_calls):
    ref, fast = _pair(telemetry=False, num_layers=2)
    x = torch.randn(5, 4)
    out_ref, (h_ref, c_ref) = ref(x)
    out, (h, c) = fast(x)
    assert torch.equal(out, out_ref) and torch.equal(h, h_ref) and torch.equal(c, c_ref)
    assert native_calls == ["lstm"]


def test_an_explicit_backend_still_runs_its_own_implementation_without_telemetry(native_calls):
    ref, fast = _pair(telemetry=False)
    fast.backend = "reference"
    x, hx = _inputs(ref, packed=False)
    _, expected = _run(ref, x, hx)
    node, actual = _run(fast, x, hx)
    assert node == FUSED_NODE and native_calls == []
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compiled_step", [False, True])
def test_a_pass_that_records_runs_fastlstm_s_own_route_on_the_cpu(native_calls, monkeypatch, compiled_step):
    """Native-recorded, PyTorch's op layer by layer under fastlstm's own autograd node (tests/test_native_recorded.py
    tests it); or, where the reference's loops run the compiled step, the reference (tests/test_fused_step.py)."""
    monkeypatch.setattr(routing, "compiled_step_runs", lambda dtype, shape: compiled_step)
    ref, fast = _pair()
    x, hx = _inputs(ref, packed=False)
    node, _ = _run(fast, x, hx)
    assert node == (FUSED_NODE if compiled_step else "_NativeRecordedLayerBackward")
    assert native_calls == [] and fast.telemetry.snapshot().launches == 2


def test_inference_records_nothing_and_runs_natively_unless_asked_to_record(native_calls):
    ref, fast = _pair(num_layers=2)
    x = torch.randn(6, 3, 4)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            assert torch.equal(fast(x)[0], ref(x)[0])
    assert native_calls == ["lstm", "lstm"] and fast.telemetry.snapshot().launches == 0
    fast.telemetry.record_inference = True
    with torch.no_grad():
        torch.testing.assert_close(fast(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    snapshot = fast.telemetry.snapshot()
    assert native_calls == ["lstm", "lstm"] and snapshot.launches == 2  # two layers, forward only
    assert snapshot.layers[0].elements == 6 * 3 * 6 and snapshot.layers[0].backward_passes.size == 0


def test_cpu_autocast_stays_on_fastlstms_ops_where_pytorchs_op_may_fail(native_calls):
    # Under CPU autocast nn.LSTM's op fails on CPUs without bf16 support in oneDNN (torch 2.13: a RuntimeError) and
    # runs on others (AVX512-BF16, AMX): fastlstm stays on its own ops there, which run everywhere.
    ref, fast = _pair(telemetry=False)
    x = torch.randn(6, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fast(x)
    assert out.dtype == torch.bfloat16 and native_calls == []
    assert ((out.float() - ref(x)[0]).norm() / ref(x)[0].norm()) < 2e-2


def test_under_torch_compile_uninstrumented_passes_stay_on_fastlstms_ops():
    ref, fast = _pair(telemetry=False)
    compiled = torch.compile(fast, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 2, 4)
    torch.testing.assert_close(compiled(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
    assert routing.choose("auto", x.device, x.dtype, records_telemetry=False) == "native"  # eager, for contrast


def test_the_measured_table_sends_covered_shapes_to_the_kernels(monkeypatch):
    shape = routing.PassShape(
        hidden_size=768, proj_size=0, num_layers=1, bidirectional=False, packed=False, batch=16, steps=1024
    )
    cuda = torch.device("cuda")
    monkeypatch.setattr(routing, "_triton_importable", lambda: True)
    assert routing.choose("auto", cuda, torch.bfloat16, records_telemetry=False, shape=lambda: shape) == "native"
    region = routing.KernelsFaster(torch.bfloat16, hidden=(512, 1024), batch=(1, 16), steps=(512, 4096))
    monkeypatch.setattr(routing, "KERNELS_FASTER", (region,))
    assert routing.choose("auto", cuda, torch.bfloat16, records_telemetry=False, shape=lambda: shape) == "triton"
    for other in (shape._replace(batch=64), shape._replace(bidirectional=True), shape._replace(proj_size=128)):
        assert routing.choose("auto", cuda, torch.bfloat16, records_telemetry=False, shape=lambda o=other: o) == (
            "native"
        )
    assert routing.choose("auto", cuda, torch.float16, records_telemetry=False, shape=lambda: shape) == "native"
    # The CPU never consults it, and a recording pass never needs it.
    assert routing.choose("auto", torch.device("cpu"), torch.bfloat16, records_telemetry=False, shape=None) == (
        "native"
    )
    assert routing.choose("auto", cuda, torch.bfloat16, records_telemetry=True) == "triton"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_uninstrumented_passes_run_cudnn_on_cuda():
    ref, fast = _pair(telemetry=False, num_layers=2)
    ref, fast = ref.cuda(), fast.cuda()
    x = torch.randn(9, 5, 4, device="cuda")
    hx = (torch.randn(2, 5, 6, device="cuda"), torch.randn(2, 5, 6, device="cuda"))
    with torch.backends.cudnn.flags(enabled=True, deterministic=True):
        node_ref, expected = _run(ref, x, hx)
        node, actual = _run(fast, x, hx)
    assert node == node_ref == "CudnnRnnBackward0"
    for got, want in zip(actual, expected, strict=True):
        assert torch.equal(got, want)
    assert torch.backends.cudnn.is_available()
