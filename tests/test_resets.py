"""State resets inside the loop (`forward(..., resets=mask)`, docs/resets.md) on the reference backend, against
torch.nn.LSTM in float64 run separately on every episode (tests/support.py, segmented_lstm): outputs, final states
and the gradients of the input, of hx (summed over the episodes' starts) and of every weight. The kernels' twins of
these checks run under the interpreter (tests/test_kernels_interpreter.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import routing

try:
    from support import assert_rel, assert_resets_parity, fast_like, mixed_lengths, pack, random_resets, tolerance
except ImportError:  # tests/ turned into a package
    from tests.support import assert_rel, assert_resets_parity, fast_like, mixed_lengths, pack, random_resets, tolerance

pytestmark = pytest.mark.usefixtures("single_cpu_thread")

STEPS, BATCH, INPUTS, HIDDEN = 7, 4, 3, 5

CONFIGURATIONS = {
    "one-layer": {},
    "two-layers": {"num_layers": 2},
    "bidirectional": {"bidirectional": True},
    "two-layers-bidirectional-proj": {"num_layers": 2, "bidirectional": True, "proj_size": 3},
    "proj": {"proj_size": 2},
    "batch-first": {"batch_first": True},
    "no-bias": {"bias": False},
}


def pair(dtype=torch.float64, **options):
    """(float64 time-major nn.LSTM, fastlstm.LSTM of `dtype` with its weights and the options' layout)."""
    batch_first = options.pop("batch_first", False)
    ref = nn.LSTM(INPUTS, HIDDEN, dtype=torch.float64, **options)
    fast = fast_like(ref, backend="reference").to(dtype)
    fast.batch_first = batch_first
    return ref, fast


def random_hx(ref, batch=BATCH):
    slots = ref.num_layers * (2 if ref.bidirectional else 1)
    return (
        torch.randn(slots, batch, ref.proj_size or ref.hidden_size, dtype=torch.float64),
        torch.randn(slots, batch, ref.hidden_size, dtype=torch.float64),
    )


@pytest.mark.parametrize("with_hx", [True, False], ids=["hx", "zeros"])
@pytest.mark.parametrize("config", list(CONFIGURATIONS))
def test_resets_restart_every_episode_from_hx(config, with_hx):
    ref, fast = pair(**CONFIGURATIONS[config])
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    hx = random_hx(ref) if with_hx else None
    assert_resets_parity(fast, ref, x, hx, random_resets(STEPS, BATCH), tolerance(torch.float64))


@pytest.mark.parametrize("enforce_sorted", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_input_takes_resets_and_ignores_those_past_a_sequence_end(bidirectional, enforce_sorted):
    ref, fast = pair(bidirectional=bidirectional, num_layers=2)
    lengths = mixed_lengths(STEPS, BATCH, sorted_=enforce_sorted)
    resets = random_resets(STEPS, BATCH)
    short = lengths.index(min(lengths))
    resets[min(lengths) :, short] = True  # past its end: no effect
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    assert_resets_parity(
        fast, ref, x, random_hx(ref), resets, tolerance(torch.float64), lengths=lengths, enforce_sorted=enforce_sorted
    )


def test_packed_batch_first_resets_are_batch_major():
    ref, fast = pair(batch_first=True, bidirectional=True)
    lengths = mixed_lengths(STEPS, BATCH, sorted_=False)
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    resets = random_resets(STEPS, BATCH)
    assert_resets_parity(fast, ref, x, random_hx(ref), resets, tolerance(torch.float64), lengths=lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_resets_in_lower_precisions(dtype):
    ref, fast = pair(dtype, bidirectional=True)
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    assert_resets_parity(fast, ref, x, random_hx(ref), random_resets(STEPS, BATCH), tolerance(dtype))


def test_integer_resets_mean_nonzero():
    ref, fast = pair()
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    resets = random_resets(STEPS, BATCH)
    hx = random_hx(ref)
    as_bool = fast(x, hx, resets=resets)
    as_int = fast(x, hx, resets=resets.to(torch.int64) * 3)
    assert torch.equal(as_bool[0], as_int[0]) and torch.equal(as_bool[1][0], as_int[1][0])


def test_unbatched_input_takes_a_time_mask():
    ref, fast = pair(num_layers=2)
    x = torch.randn(STEPS, INPUTS, dtype=torch.float64)
    resets = random_resets(STEPS, 2)[:, 1]  # holds consecutive resets
    h0, c0 = (t[:, 0] for t in random_hx(ref, 1))
    out, (h_n, c_n) = fast(x, (h0, c0), resets=resets)
    batched, (bh, bc) = fast(x.unsqueeze(1), (h0.unsqueeze(1), c0.unsqueeze(1)), resets=resets.unsqueeze(1))
    assert torch.equal(out, batched.squeeze(1)) and torch.equal(h_n, bh.squeeze(1)) and torch.equal(c_n, bc.squeeze(1))
    assert_resets_parity(
        fast, ref, x.unsqueeze(1), (h0.unsqueeze(1), c0.unsqueeze(1)), resets.unsqueeze(1), tolerance(torch.float64)
    )


def _close(a, b) -> bool:
    """Equal up to float32 rounding, through nested telemetry dicts and lists."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == pytest.approx(b, rel=1e-5, abs=1e-7, nan_ok=True)
    return a == b


@pytest.mark.parametrize("config", ["one-layer", "two-layers-bidirectional-proj"])
def test_all_false_resets_give_the_results_of_no_resets(config):
    # To rounding, not to the bit: a restart's state is a fresh tensor where the step without one reads a view of the
    # output, and the CPU's BLAS may round a product of differently aligned operands differently (8e-8 seen).
    _, fast = pair(**CONFIGURATIONS[config])
    fast.float()
    x = torch.randn(STEPS, BATCH, INPUTS)
    lengths = mixed_lengths(STEPS, BATCH, sorted_=False)
    for input_of in (lambda x: x, lambda x: pack(x, lengths, False, False)):
        results = []
        for resets in (None, torch.zeros(STEPS, BATCH, dtype=torch.bool)):
            fast.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out, (h_n, c_n) = fast(input_of(xi), resets=resets)
            data = out.data if hasattr(out, "batch_sizes") else out
            (data.sin().sum() + h_n.cos().sum() + c_n.sum()).backward()
            results.append([data, h_n, c_n, xi.grad, *(p.grad for p in fast.parameters())])
            results[-1].append(fast.telemetry.snapshot().to_dict())
            fast.telemetry.reset()
        *tensors_none, tel_none = results[0]
        *tensors_false, tel_false = results[1]
        for a, b in zip(tensors_none, tensors_false, strict=True):
            assert_rel(a, b, 1e-6)
        assert _close(tel_none, tel_false)


def test_gradient_is_cut_at_a_reset():
    """Nothing after a reset depends on anything before it: the loss of the second episode has zero gradient
    with respect to the first episode's inputs (an independent check of the cut, by autograd alone)."""
    _, fast = pair(num_layers=2, proj_size=2)
    x = torch.randn(STEPS, 1, INPUTS, dtype=torch.float64, requires_grad=True)
    resets = torch.zeros(STEPS, 1, dtype=torch.bool)
    resets[4] = True
    out, _ = fast(x, resets=resets)
    out[4:].sum().backward()
    assert torch.count_nonzero(x.grad[:4]) == 0 and torch.count_nonzero(x.grad[4:]) > 0


def test_auto_never_routes_a_pass_with_resets_to_the_native_op():
    ref, _ = pair()
    fast = fastlstm.LSTM(INPUTS, HIDDEN, dtype=torch.float64, telemetry=False)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    resets = random_resets(STEPS, BATCH)
    out, _ = fast(x, resets=resets)
    assert type(out.grad_fn).__name__ == "_LSTMLayerBackward"  # fastlstm's op, not aten::lstm
    with torch.no_grad():  # an inference pass records nothing, and would run natively without resets
        assert torch.equal(fast(x, resets=resets)[0], out.detach())
    for records in (False, True):  # recording, native-recorded (PyTorch's op layer by layer) is refused too
        assert routing.choose("auto", torch.device("cpu"), torch.float32, records_telemetry=records, resets=True) == (
            "reference"
        )
    assert routing.choose("auto", torch.device("cpu"), torch.float32, records_telemetry=True) == (
        routing.NATIVE_RECORDED
    )
    recording = fastlstm.LSTM(INPUTS, HIDDEN)
    out, _ = recording(x.float(), resets=resets)
    assert type(out.grad_fn).__name__ == "_LSTMLayerBackward"  # the reference's op
    assert routing.choose("auto", torch.device("cuda"), torch.float32, records_telemetry=False, resets=True) in (
        "triton",
        "reference",  # where triton is not importable
    )


# ---- bad input ----


def test_resets_refused_where_the_native_op_runs():
    fast = fastlstm.LSTM(INPUTS, HIDDEN, backend="native")
    x = torch.randn(STEPS, BATCH, INPUTS)
    with pytest.raises(RuntimeError, match="cannot restart states"):
        fast(x, resets=torch.zeros(STEPS, BATCH, dtype=torch.bool))
    auto = fastlstm.LSTM(INPUTS, HIDDEN)
    resets = torch.zeros(STEPS, BATCH, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"LSTM op \(torch.func\), which cannot restart"):
        torch.func.vjp(lambda x: auto(x, resets=resets)[0], x)
    with pytest.raises(RuntimeError, match=r"LSTM op \(tracing\), which cannot restart"):
        torch.jit.trace(lambda x: auto(x, resets=resets)[0], (x,))


@pytest.mark.parametrize(
    ("resets", "error", "match"),
    [
        (
            torch.zeros(BATCH, STEPS, dtype=torch.bool),
            RuntimeError,
            r"Expected resets of shape \[7, 4\] \[time, batch\]",
        ),
        (torch.zeros(STEPS, BATCH, 1, dtype=torch.bool), RuntimeError, "Expected resets of shape"),
        (torch.zeros(STEPS, dtype=torch.bool), RuntimeError, "Expected resets of shape"),
        (torch.zeros(STEPS, BATCH), RuntimeError, "bool or integer tensor, got torch.float32"),
        (torch.zeros(STEPS, BATCH, device="meta", dtype=torch.bool), RuntimeError, "resets is on meta"),
        ([[False] * BATCH] * STEPS, TypeError, "resets must be a Tensor or None, got list"),
    ],
    ids=["transposed", "3-D", "1-D", "float", "device", "list"],
)
def test_bad_resets_get_a_clear_error(resets, error, match):
    _, fast = pair()
    with pytest.raises(error, match=match):
        fast(torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64), resets=resets)


def test_bad_resets_of_batch_first_and_unbatched_input_name_their_layout():
    _, fast = pair(batch_first=True)
    with pytest.raises(RuntimeError, match=r"Expected resets of shape \[4, 7\] \[batch, time\] \(batch_first\)"):
        fast(torch.randn(BATCH, STEPS, INPUTS, dtype=torch.float64), resets=torch.zeros(STEPS, BATCH, dtype=bool))
    with pytest.raises(RuntimeError, match=r"Expected resets of shape \[7\] \[time\] \(unbatched input\)"):
        fast(torch.randn(STEPS, INPUTS, dtype=torch.float64), resets=torch.zeros(STEPS, 1, dtype=bool))


def test_resets_are_keyword_only_and_scripting_still_compiles_the_native_path():
    _, fast = pair()
    x = torch.randn(STEPS, BATCH, INPUTS, dtype=torch.float64)
    with pytest.raises(TypeError):
        fast(x, None, torch.zeros(STEPS, BATCH, dtype=torch.bool))
    scripted = torch.jit.script(_Wrapper(fast))  # TorchScript rejects keyword-only arguments: a twin class is scripted
    assert torch.allclose(scripted(x), fast.to_torch()(x)[0], rtol=0, atol=1e-12)
    assert isinstance(fast, fastlstm.LSTM)
    fast(x, resets=torch.zeros(STEPS, BATCH, dtype=torch.bool))  # the next call from Python is an LSTM's again
    assert type(fast) is fastlstm.LSTM


class _Wrapper(nn.Module):
    def __init__(self, lstm):
        super().__init__()
        self.lstm = lstm

    def forward(self, x):
        return self.lstm(x)[0]


def test_double_backward_with_resets_matches_finite_differences():
    """create_graph=True recomputes the layer from plain ops (function.differentiable_layer), resets included:
    gradcheck and gradgradcheck hold its first and second derivatives to finite differences."""
    torch.manual_seed(3)
    fast = fastlstm.LSTM(2, 3, bidirectional=True, dtype=torch.float64, backend="reference", telemetry=False)
    resets = torch.tensor([[False, True], [True, False], [False, True], [False, False]])
    x = torch.randn(4, 2, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)

    def run(x, h0, c0):
        out, (h_n, c_n) = fast(x, (h0, c0), resets=resets)
        return out, h_n, c_n

    assert torch.autograd.gradcheck(run, (x, h0, c0))
    assert torch.autograd.gradgradcheck(run, (x, h0, c0))
