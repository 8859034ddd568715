"""GPU checks of the Triton backend: parity with nn.LSTM (cuDNN) at real sizes, torch.compile, and no host syncs.

They run with the same test command on a machine with CUDA and skip cleanly elsewhere.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastlstm

try:
    from support import assert_resets_parity, random_resets, rel_err, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_resets_parity, random_resets, rel_err, tolerance

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


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
        assert rel_err(a, e) <= tol, name
    for k, (e, a) in enumerate(zip(expected[3], actual[3])):
        assert rel_err(a, e) <= tol, f"gradient {k}"


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
    assert_parity(expected, actual, tolerance(dtype))


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
    assert_parity(*results, tolerance(torch.float32))


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
    assert rel_err(compiled_out, eager_out) <= 1e-6


# ---- every kernel family the launcher plans (kernels/planning.py) ----


@pytest.fixture
def launched(monkeypatch):
    """(kernel, plan kind, mode) of each pass the launcher made."""
    from fastlstm.kernels import launch

    passes = []
    original = launch._record
    monkeypatch.setattr(launch, "_record", lambda *a: passes.append((a[0], a[1].kind, a[2])) or original(*a))
    return passes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize(
    "hidden,batch,kind",
    [
        (32, 16, "single"),
        (64, 300, "single"),
        (256, 16, "split"),  # fp32: programs of 4 units (planning.SPLIT_NARROW_UNITS)
        (200, 16, "split"),  # not a multiple of 16: the Gluon kernels' exchange through registers (no cp.async)
        (512, 1, "split"),
        (512, 64, "split"),  # the Gluon kernels' wide batch tile (planning.GLUON_WIDE_BLOCK_B)
        (768, 16, "split"),
        (1024, 16, "split"),
        (1024, 48, "split"),  # the wide tile in the forward only: 2 forward launches, 3 backward ones
        (1000, 16, "split"),
        (2048, 16, "streaming"),
    ],
    ids=str,
)
def test_parity_of_each_kernel_family_with_nn_lstm_float64(launched, dtype, hidden, batch, kind):
    from fastlstm.kernels import planning

    k_pad = 1 << (hidden - 1).bit_length()  # the split kernels' padded H (planning.split_config)
    if kind == "single" and k_pad > planning.SINGLE_MAX_PAD[dtype]:
        kind = "split"  # fp32 single programs hold at most 32 units
    limit = planning.split_max_pad(dtype, "ieee", planning.aligned(hidden), cooperative=not planning.host_stepped())
    if kind == "split" and k_pad > limit:
        kind = "streaming"  # fp32 split programs hold a share of at most split_max_pad units
    assert_single_layer_parity(dtype, hidden, 256, batch)
    assert {k for _, k, _ in launched} == {kind}


@pytest.mark.parametrize("hidden", [512, 1000], ids=["aligned", "unaligned"])
def test_split_kernels_telemetry_matches_the_reference_backend(launched, hidden):
    """Every telemetry field of the routed split kernels (Gluon on sm_80+: the gradient norms through time are
    summed a step late, in the next step's poll; at H=1000 the exchange goes through registers) against the reference
    backend on the same weights and inputs."""
    import numpy as np

    models = {b: fastlstm.LSTM(64, hidden, device="cuda", backend=b) for b in ("triton", "reference")}
    models["triton"].load_state_dict(models["reference"].state_dict())
    for model in models.values():
        model.to(torch.float16)  # 16 bits, as the Gluon kernels take, with fp16's finer rounding than bf16's
    x = torch.randn(96, 16, 64, device="cuda", dtype=torch.float16)
    weights = torch.randn(96, 16, hidden, device="cuda", dtype=torch.float16)
    snapshots = {}
    for name, model in models.items():
        out, _ = model(x)
        (out * weights).sum().backward()
        snapshots[name] = model.telemetry.snapshot()
    assert {k for _, k, _ in launched} == {"split"}
    (fast,), (ref,) = snapshots["triton"].layers, snapshots["reference"].layers
    assert fast.elements == ref.elements
    assert fast.gate_saturation == pytest.approx(ref.gate_saturation, abs=0.01)
    assert fast.forget_gate_mean == pytest.approx(ref.forget_gate_mean, rel=0.02)
    assert np.array_equal(fast.backward_passes, ref.backward_passes)
    for field in ("grad_norm_per_step", "cell_grad_norm_per_step"):
        np.testing.assert_allclose(getattr(fast, field), getattr(ref, field), rtol=0.03, err_msg=field)


def test_tf32_fp32_layers_up_to_512_units_split_and_match_nn_lstm_float64(launched, monkeypatch):
    """Where TF32 is allowed the plan takes fp32 layers of up to a 512 pad to the split kernels (4-unit programs,
    kernels/planning.py); TF32 rounds operands to 10 mantissa bits, as fp16 does."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    ref, fast = pair(64, 512, torch.float32)
    x = torch.randn(256, 16, 64, device="cuda")
    weights = torch.randn(256, 16, 512, device="cuda", dtype=torch.float64)
    expected = forward_backward(ref, x.double().requires_grad_(), weights)
    actual = forward_backward(fast, x.requires_grad_(), weights)
    assert_parity(expected, actual, tolerance(torch.float16))
    assert {k for _, k, _ in launched} == {"split"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("hidden,kind", [(32, "single"), (128, "split"), (2048, "streaming")], ids=str)
def test_resets_parity_of_each_kernel_family_with_nn_lstm_per_episode(launched, dtype, hidden, kind):
    """State resets at a real length: fastlstm against a float64 nn.LSTM run on every episode (docs/resets.md); the
    16-bit split layers run the Gluon kernels' tl twins."""
    _, fast = pair(16, hidden, dtype, bidirectional=True)
    ref = nn.LSTM(16, hidden, bidirectional=True, device="cuda", dtype=torch.float64)
    ref.load_state_dict({k: v.double() for k, v in fast.state_dict().items()})
    steps, batch = 96, 4
    x = torch.randn(steps, batch, 16, device="cuda", dtype=torch.float64)
    hx = tuple(torch.randn(2, batch, hidden, device="cuda", dtype=torch.float64) for _ in range(2))
    resets = random_resets(steps, batch, p=0.05).cuda()
    assert_resets_parity(fast, ref, x, hx, resets, tolerance(dtype))
    assert {k for _, k, _ in launched} == {kind}


def test_split_parity_bidirectional_packed(launched):
    ref, fast = pair(32, 512, torch.bfloat16, num_layers=2, bidirectional=True)
    lengths = torch.randint(1, 300, (16,))
    lengths[0] = 300
    x = torch.randn(300, 16, 32, device="cuda", dtype=torch.bfloat16)
    weights = torch.randn(int(lengths.sum()), 1024, device="cuda", dtype=torch.float64)
    results = []
    for model, inputs in ((ref, x.double()), (fast, x)):
        packed = pack_padded_sequence(inputs.requires_grad_(), lengths, enforce_sorted=False)
        results.append(forward_backward(model, packed, weights))
    assert_parity(*results, tolerance(torch.bfloat16))
    assert {mode for _, _, mode in launched} == {"cooperative"} and len(launched) == 8


@pytest.mark.parametrize("hidden", [128, 512, 768, 1024], ids=lambda h: f"{-(-h // 8)}programs")
def test_split_exchange_never_deadlocks_over_1000_launches(launched, hidden):
    """Every grid size the benchmarks use, 1000 forward and backward launches back to back; a program that gave up
    waiting trips the launcher's device-side assert, which the synchronize surfaces."""
    model = fastlstm.LSTM(hidden, hidden, device="cuda", backend="triton", dtype=torch.bfloat16)
    x = torch.randn(16, 16, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    first, _ = model(x)
    for _ in range(500):
        out, _ = model(x)
        out.float().square().mean().backward()
    torch.cuda.synchronize()
    assert len(launched) == 1001 and {mode for _, _, mode in launched} == {"cooperative"}
    out, _ = model(x)
    assert torch.equal(out, first)  # deterministic: no program ran ahead of a step it needed


def test_split_kernels_on_two_streams_do_not_deadlock(launched):
    """Two cooperative launches on different streams: each grid is co-resident by the launch itself, so neither can
    hold SMs the other waits for."""
    models = [fastlstm.LSTM(1024, 1024, device="cuda", backend="triton", dtype=torch.bfloat16) for _ in range(2)]
    x = torch.randn(64, 16, 1024, device="cuda", dtype=torch.bfloat16)
    streams = [torch.cuda.Stream() for _ in models]
    for _ in range(20):
        for model, stream in zip(models, streams):
            with torch.cuda.stream(stream):
                model(x)
    torch.cuda.synchronize()
    assert {mode for _, _, mode in launched} == {"cooperative"}


def test_host_stepped_exchange_matches_the_cooperative_one(monkeypatch, launched):
    from fastlstm.kernels import planning

    # The same step code compiled with and without its waits: equal up to the compiler's own choices of operation
    # order, in fp32 with exact dots. 256 units: the largest exact fp32 split size outside a cooperative launch
    # (planning.split_max_pad), so that both modes run the split kernels.
    model = fastlstm.LSTM(64, 256, device="cuda", backend="triton")
    x = torch.randn(64, 8, 64, device="cuda", requires_grad=True)
    results = []
    for mode in ("cooperative", "host-stepped"):
        monkeypatch.setattr(planning, "EXCHANGE", mode)
        launched.clear()
        out, (h_n, c_n) = model(x)
        grads = torch.autograd.grad(out.square().sum(), [x, *model.parameters()])
        assert {(kind, launch_mode) for _, kind, launch_mode in launched} == {("split", mode)}
        results.append((out, h_n, c_n, *grads))
    for cooperative, stepped in zip(*results):
        assert rel_err(stepped, cooperative) <= 1e-6


def test_split_training_step_never_synchronises(launched):
    model = fastlstm.LSTM(16, 512, device="cuda", backend="triton")
    assert_training_step_never_synchronises(model, torch.randn(64, 8, 16, device="cuda"))
    assert {k for _, k, _ in launched} == {"split"}


# ---- the grid of `fastlstm bench --gpu-check` (the performance model's shapes), every kernel that routes there ----

CHECK_SHAPES = [
    (256, 1),
    (256, 16),
    (256, 64),
    (512, 1),
    (512, 16),
    (512, 64),
    (768, 1),
    (768, 16),
    (768, 64),
    (1024, 1),
    (1024, 16),
    (1024, 64),
]
CHECK_FP32 = [(512, 16), (1024, 64)]


def _check_grid():
    from fastlstm.kernels.model import model_shapes

    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    return [pytest.param(dtypes[s.dtype], s.hidden, s.batch, id=s.key) for s in model_shapes()]


def test_check_grid_here_is_the_models():
    from fastlstm.kernels.model import model_shapes

    shapes = {(s.hidden, s.batch, s.dtype) for s in model_shapes()}
    assert shapes == {(h, b, "bf16") for h, b in CHECK_SHAPES} | {(h, b, "fp32") for h, b in CHECK_FP32}


@pytest.mark.parametrize("dtype,hidden,batch", _check_grid())
def test_parity_of_the_routed_kernels_on_the_check_grid(dtype, hidden, batch):
    """The kernels backend="triton" routes each check shape to, at its width and batch (64 steps: the timing run
    covers T = 1024)."""
    assert_single_layer_parity(dtype, hidden, 64, batch)


@pytest.mark.parametrize("batch", [1, 16, 64, 256], ids=lambda b: f"{-(-b // 16)}programs-b{b}")
def test_single_kernel_over_1000_back_to_back_launches_at_every_grid_size(batch):
    """500 forward+backward pairs without a sync in between: results stay deterministic and nothing faults."""
    model = fastlstm.LSTM(64, 64, device="cuda", backend="triton", dtype=torch.bfloat16)
    x = torch.randn(16, batch, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    first, _ = model(x)
    for _ in range(500):
        out, _ = model(x)
        out.float().square().mean().backward()
    torch.cuda.synchronize()
    out, _ = model(x)
    assert torch.equal(out, first)


def test_bf16_training_step_at_a_check_shape_never_synchronises():
    model = fastlstm.LSTM(768, 768, device="cuda", backend="triton", dtype=torch.bfloat16)
    assert_training_step_never_synchronises(model, torch.randn(32, 16, 768, device="cuda", dtype=torch.bfloat16))
