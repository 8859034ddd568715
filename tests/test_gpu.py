"""GPU checks of the Triton backend: parity with nn.LSTM (cuDNN) at real sizes, torch.compile, and no host syncs.

They run with the same test command on a machine with CUDA and skip cleanly elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Relative-error budgets of docs/design.md §6, against nn.LSTM in float64 (cuDNN's float64) with the same weights and
# inputs rounded to the tested dtype: a bf16 nn.LSTM is no reference (cuDNN refuses bf16, and the generic loop
# accumulates its weight gradients in bf16, ~4e-2 off at T=1024).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def rel(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm())


@pytest.fixture(autouse=True)
def exact_fp32_matmuls(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def pair(input_size, hidden, dtype, **kwargs):
    """(float64 nn.LSTM, fastlstm.LSTM in dtype) sharing the dtype-rounded weights."""
    fast = fastlstm.LSTM(input_size, hidden, device="cuda", backend="triton", **kwargs).to(dtype)
    ref = nn.LSTM(input_size, hidden, device="cuda", dtype=torch.float64, **kwargs)
    ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    return ref, fast


def forward_backward(model, x, weights):
    out, (h_n, c_n) = model(x)
    data = out.data if hasattr(out, "batch_sizes") else out
    loss = (data.double() * weights).sum() + h_n.double().sum() + c_n.double().pow(2).sum()
    leaf = x.data if hasattr(x, "batch_sizes") else x
    grads = torch.autograd.grad(loss, [leaf, *model.parameters()])
    return data, h_n, c_n, grads


def assert_parity(expected, actual, tol):
    for name, e, a in zip(("out", "h_n", "c_n"), expected[:3], actual[:3]):
        assert rel(a, e) <= tol, name
    for k, (e, a) in enumerate(zip(expected[3], actual[3])):
        assert rel(a, e) <= tol, f"gradient {k}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize(
    "hidden,steps,batch", [(256, 128, 16), (1024, 128, 16), (256, 1024, 64), (512, 256, 256)], ids=str
)
def test_parity_with_nn_lstm_float64(dtype, hidden, steps, batch):
    assert_single_layer_parity(dtype, hidden, steps, batch)


def assert_single_layer_parity(dtype, hidden, steps, batch):
    ref, fast = pair(64, hidden, dtype)
    x = torch.randn(steps, batch, 64, device="cuda", dtype=dtype)
    weights = torch.randn(steps, batch, hidden, device="cuda", dtype=torch.float64)
    expected = forward_backward(ref, x.double().requires_grad_(), weights)
    actual = forward_backward(fast, x.requires_grad_(), weights)
    assert_parity(expected, actual, TOLERANCE[dtype])


def test_parity_bidirectional_projection_packed():
    ref, fast = pair(32, 256, torch.float32, num_layers=2, bidirectional=True, proj_size=64)
    lengths = torch.randint(1, 200, (32,))
    lengths[0] = 200
    x = torch.randn(200, 32, 32, device="cuda")
    weights = torch.randn(int(lengths.sum()), 128, device="cuda", dtype=torch.float64)
    results = []
    for model, inputs in ((ref, x.double()), (fast, x)):
        packed = pack_padded_sequence(inputs.requires_grad_(), lengths, enforce_sorted=False)
        results.append(forward_backward(model, packed, weights))
    assert_parity(*results, TOLERANCE[torch.float32])


def assert_training_step_never_synchronises(model, x):
    model(x)[0].sum().backward()  # warm-up: compilation and allocation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out, _ = model(x)
        out.square().mean().backward()
        model.telemetry.poll()
        model.telemetry.reset()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_training_step_never_synchronises():
    model = fastlstm.LSTM(16, 128, num_layers=2, device="cuda", backend="triton")
    assert_training_step_never_synchronises(model, torch.randn(64, 8, 16, device="cuda"))


def test_torch_compile_matches_eager():
    model = fastlstm.LSTM(16, 64, device="cuda", backend="triton")
    x = torch.randn(32, 4, 16, device="cuda")
    compiled = torch.compile(model)
    eager_out, _ = model(x)
    compiled_out, _ = compiled(x)
    assert rel(compiled_out, eager_out) <= 1e-6


# ---- the persistent kernels (kernels/persistent.py), forced on: they are off by default ----


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("hidden,batch", [(512, 1), (768, 16), (1024, 64), (2048, 16)], ids=str)
def test_persistent_parity_with_nn_lstm_float64(persistent_launches, dtype, hidden, batch):
    assert_single_layer_parity(dtype, hidden, 256, batch)
    assert len(persistent_launches) == 2


def test_persistent_parity_bidirectional_packed(persistent_launches):
    ref, fast = pair(32, 512, torch.bfloat16, num_layers=2, bidirectional=True)
    lengths = torch.randint(1, 300, (16,))
    lengths[0] = 300
    x = torch.randn(300, 16, 32, device="cuda", dtype=torch.bfloat16)
    weights = torch.randn(int(lengths.sum()), 1024, device="cuda", dtype=torch.float64)
    results = []
    for model, inputs in ((ref, x.double()), (fast, x)):
        packed = pack_padded_sequence(inputs.requires_grad_(), lengths, enforce_sorted=False)
        results.append(forward_backward(model, packed, weights))
    assert_parity(*results, TOLERANCE[torch.bfloat16])
    assert len(persistent_launches) == 8


@pytest.mark.parametrize("hidden", [512, 768, 1024, 2048], ids=lambda h: f"{h // 16}programs")
def test_persistent_barrier_never_deadlocks_over_1000_launches(persistent_launches, hidden):
    """Every grid size the benchmarks use, 1000 forward and backward launches back to back; a program that gave up
    waiting at the barrier trips the launcher's device-side assert, which the synchronize surfaces."""
    from fastlstm.kernels import launch

    assert launch.persistent_programs(hidden) <= torch.cuda.get_device_properties(0).multi_processor_count
    model = fastlstm.LSTM(hidden, hidden, device="cuda", backend="triton", dtype=torch.bfloat16)
    x = torch.randn(16, 16, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    first, _ = model(x)
    for _ in range(500):
        out, _ = model(x)
        out.float().square().mean().backward()
    torch.cuda.synchronize()
    assert len(persistent_launches) == 1002
    out, _ = model(x)
    assert torch.equal(out, first)  # deterministic: no program ran ahead of a step it needed


def test_persistent_host_stepped_mode_matches_the_barrier(monkeypatch):
    from fastlstm.kernels import launch

    # The same step code compiled two ways (with and without the barrier loop): equal up to the compiler's own
    # choices of operation order, in fp32 with exact dots.
    model = fastlstm.LSTM(64, 768, device="cuda", backend="triton")
    x = torch.randn(64, 8, 64, device="cuda", requires_grad=True)
    results = []
    for mode in ("on", "host-stepped"):
        monkeypatch.setattr(launch, "PERSISTENT", mode)
        out, (h_n, c_n) = model(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        results.append((out, h_n, c_n, *grads))
    for on, stepped in zip(*results):
        assert rel(stepped, on) <= 1e-6


def test_persistent_training_step_never_synchronises(persistent_launches):
    model = fastlstm.LSTM(16, 512, device="cuda", backend="triton")
    assert_training_step_never_synchronises(model, torch.randn(64, 8, 16, device="cuda"))
    assert len(persistent_launches) == 4
