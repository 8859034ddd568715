"""The compiled step of the CPU loops (fastlstm/fused_step.py, fastlstm/csrc/fused_step.c): each step's pointwise
work as one C call in float32 loops without lengths, restarts or projection, PyTorch ops everywhere else.

Held to float64: its sigmoid against float64's over the whole float32 range and at ±inf and NaN; float32 modules
whose loops take it against a float64 nn.LSTM through autograd; their telemetry against the same modules' with the
PyTorch-op loops. Also what happens without it: no compiler, a failing compiler, the switch off.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import fastlstm
from fastlstm import fused_step, reference

try:
    from support import assert_float32_parity, float32_pair, mixed_lengths, pack
except ImportError:  # tests/ turned into a package
    from tests.support import assert_float32_parity, float32_pair, mixed_lengths, pack

needs_library = pytest.mark.skipif(fused_step.library() is None, reason="no C compiler on this machine")


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the loops that ran the compiled step, by direction of time ('forward' or 'backward' loop)."""
    calls = []
    for name, kind in (("_fused_forward_loop", "forward"), ("_fused_backward", "backward")):
        original = getattr(reference, name)

        def counting(*args, _original=original, _kind=kind):
            calls.append(_kind)
            return _original(*args)

        monkeypatch.setattr(reference, name, counting)
    return calls


@pytest.fixture
def without_library(monkeypatch):
    monkeypatch.setattr(fused_step, "library", lambda: None)


def _forward_step(pre: torch.Tensor, c_prev: torch.Tensor):
    """The C forward loop over one step on [B, 4H] pre-activations, with h_{t-1} and W_hh zero (which adds exactly
    0 to each, so the step sees `pre` as it is): (gates, c_t, h_t)."""
    batch, four_h = pre.shape
    hidden_size = four_h // 4
    pre = pre.clone()
    gates, cell, hidden = torch.empty_like(pre), torch.empty_like(c_prev), torch.empty_like(c_prev)
    w_t, h_prev = torch.zeros(hidden_size, four_h), torch.zeros(batch, hidden_size)
    loop = fused_step.library().fastlstm_forward_loop
    fused_step.run_loop(loop, (w_t, pre, h_prev, c_prev, gates, cell, hidden), 1, batch, hidden_size, False, None)
    return gates, cell, hidden


@needs_library
def test_the_sigmoid_is_float64_s_to_a_few_ulp_over_the_float32_range():
    # Every 97th float32 bit pattern of the finite values in [-120, 120] (past that the sigmoid is 0 or 1 in float32),
    # and the ends of the range. All four gate blocks hold them; the candidate's block gives 2σ(x) − 1.
    patterns = torch.arange(0, 2**31, 97, dtype=torch.int64).to(torch.int32).view(torch.float32)
    values = torch.cat([patterns[patterns.abs() <= 120], -patterns[patterns.abs() <= 120]])
    hidden = 16  # the loop multiplies by a zero W_hh of H² elements per row: small H keeps that cheap
    values = values[: values.numel() // (4 * hidden) * 4 * hidden].view(-1, 4 * hidden)
    gates, _, _ = _forward_step(values, torch.zeros(values.shape[0], hidden))
    exact = torch.sigmoid(values.double())
    exact[:, 2 * hidden : 3 * hidden] = 2 * exact[:, 2 * hidden : 3 * hidden] - 1
    ulp = torch.finfo(torch.float32).eps
    # Relative to the value, except near tanh's zero, where 2σ(x) − 1 loses digits to cancellation in any method:
    # there the error is measured against 1 (the scale σ(x) is computed at).
    scale = exact.abs().clone()
    scale[:, 2 * hidden : 3 * hidden] = 1.0
    error = ((gates.double() - exact).abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)).max().item()
    assert error <= 4 * ulp, f"largest error {error / ulp:.2f} ulp"


@needs_library
def test_the_sigmoid_at_infinities_and_nan_is_pytorch_s():
    specials = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -0.0, 89.0, -89.0, 1e-30])
    pre = specials.repeat(4, 1).t().reshape(2, 16)  # every value in every gate block
    gates, _, _ = _forward_step(pre, torch.zeros(2, 4))
    expected = torch.sigmoid(pre)
    expected.view(2, 4, 4)[:, 2] = 2 * expected.view(2, 4, 4)[:, 2] - 1
    torch.testing.assert_close(gates, expected, rtol=0, atol=1e-7, equal_nan=True)
    assert torch.equal(gates.isnan(), pre.isnan())


@needs_library
@pytest.mark.parametrize(
    "options", [{}, {"bidirectional": True}, {"num_layers": 2, "bidirectional": True}], ids=["plain", "bi", "2-layer"]
)
@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_loops_with_the_compiled_step_match_float64_nn_lstm(fused_calls, backend, options):
    torch.manual_seed(0)
    ref, fast = float32_pair(backend, **options)
    assert_float32_parity(ref, fast, torch.randn(9, 4, 6, dtype=torch.float64))
    directions = 2 if options.get("bidirectional") else 1
    loops = directions * options.get("num_layers", 1)
    if backend == "reference":
        assert fused_calls.count("forward") == loops
    assert fused_calls.count("backward") == loops  # auto's backward is the reference's (native_recorded.py)


@needs_library
@pytest.mark.parametrize(
    "dtype,options,packed",
    [(torch.float64, {}, False), (torch.float32, {"proj_size": 5}, False), (torch.float32, {}, True)],
    ids=["float64", "projection", "lengths"],
)
def test_what_the_compiled_step_does_not_cover_runs_pytorch_ops(fused_calls, dtype, options, packed):
    torch.manual_seed(1)
    ref, fast = float32_pair("reference", **options)
    fast.to(dtype)
    steps, batch = 9, 4
    x = torch.randn(steps, batch, 6, dtype=torch.float64)
    to_input = None
    if packed:
        lengths = mixed_lengths(steps, batch, sorted_=False)
        to_input = lambda t: pack(t, lengths, False, False)
    if dtype == torch.float32:
        assert_float32_parity(ref, fast, x, to_input)
    else:
        out, _ = fast(x if to_input is None else to_input(x))
        out.sum().backward()
    assert fused_calls == []


def _telemetry_of_a_pass(x, poison):
    """The telemetry snapshot of one float32 training pass of the reference backend: x and a random (h0, c0),
    poisoned where `poison` says (None, "input": a NaN in x[5, 1, 2], "c0": an inf in c0[1, 2, 3], "loss": a NaN
    in the loss's gradient at step 6, both directions)."""
    torch.manual_seed(2)
    _, fast = float32_pair("reference", bidirectional=True)
    x = x.float().clone()
    h0, c0 = torch.randn(2, x.shape[1], 12), torch.randn(2, x.shape[1], 12)
    if poison == "input":
        x[5, 1, 2] = math.nan
    elif poison == "c0":
        c0[1, 2, 3] = math.inf
    out, (h_n, c_n) = fast(x, (h0, c0))
    weights = torch.ones_like(out)
    if poison == "loss":
        weights[6, 0, 1] = math.nan
    (weights * out.square()).sum().add(h_n.sum() + c_n.sum()).backward()
    return fast.telemetry.snapshot()


@needs_library
@pytest.mark.parametrize(
    "poison,where",
    [
        (None, None),
        ("input", (5, "input", "forward")),
        ("c0", (8, "cell", "forward")),  # in the reverse direction, which starts at t = 8
        ("loss", (6, "grad_output", "backward")),
    ],
    ids=["finite", "nan-in-input", "inf-in-c0", "nan-in-loss"],
)
def test_telemetry_through_the_compiled_step_is_the_pytorch_loop_s(fused_calls, monkeypatch, poison, where):
    x = torch.randn(9, 4, 6)
    fused = _telemetry_of_a_pass(x, poison)
    assert fused_calls, "the compiled step ran"
    monkeypatch.setattr(fused_step, "library", lambda: None)
    plain = _telemetry_of_a_pass(x, poison)
    assert fused.first_nonfinite == plain.first_nonfinite
    if where is not None:
        record = fused.first_nonfinite
        assert (record.timestep, record.tensor, record.stage) == where
        return
    for got, want in zip(fused.layers, plain.layers, strict=True):
        assert got.elements == want.elements
        assert got.gate_saturation == pytest.approx(want.gate_saturation, abs=1e-3)
        assert got.forget_gate_mean == pytest.approx(want.forget_gate_mean, rel=1e-5)
        assert got.cell_absmax == pytest.approx(want.cell_absmax, rel=1e-5)
        np.testing.assert_allclose(got.grad_norm_per_step, want.grad_norm_per_step, rtol=1e-5)
        np.testing.assert_allclose(got.cell_grad_norm_per_step, want.cell_grad_norm_per_step, rtol=1e-5)
        np.testing.assert_array_equal(got.backward_passes, want.backward_passes)


@pytest.fixture
def threads():
    """Sets torch's thread count (which the compiled loops split their units over) for one test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# Hidden sizes on either side of step_loop.c's ROW_SPLIT_MAX_WEIGHT_BYTES: 83 units, the threads share the sequences;
# 190, they share the units, several of the loops' column tiles (16 or 32 units) each, the last one partial.
SHARES = pytest.mark.parametrize("hidden", [83, 190], ids=["by-sequence", "by-unit"])


def _wide_pair(hidden: int):
    """(float64 nn.LSTM, float32 reference fastlstm.LSTM), bidirectional, input 6."""
    ref = nn.LSTM(6, hidden, bidirectional=True, dtype=torch.float64)
    fast = fastlstm.LSTM(6, hidden, bidirectional=True, dtype=torch.float32, backend="reference")
    fast.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    return ref, fast


@needs_library
@SHARES
@pytest.mark.parametrize("count", [1, 2, 3])
def test_loops_split_across_threads_match_float64_nn_lstm(fused_calls, threads, count, hidden):
    threads(count)
    torch.manual_seed(3)
    ref, fast = _wide_pair(hidden)
    assert_float32_parity(ref, fast, torch.randn(6, 7, 6, dtype=torch.float64))  # 7 rows: tiles of 4 and 3
    assert fused_calls.count("forward") == fused_calls.count("backward") == 2


def _threaded_and_plain_telemetry(monkeypatch, x, hidden):
    """Snapshots of one training pass of a wide reference module over x: through the compiled loops, then with the
    PyTorch-op loops."""
    torch.manual_seed(4)
    _, fast = _wide_pair(hidden)

    def snapshot():
        out, _ = fast(x)
        out.square().sum().backward()
        return fast.telemetry.snapshot(reset=True)

    compiled = snapshot()
    with monkeypatch.context() as patch:
        patch.setattr(fused_step, "library", lambda: None)
        return compiled, snapshot()


@needs_library
@SHARES
def test_telemetry_of_threaded_loops_is_the_pytorch_loop_s(fused_calls, threads, monkeypatch, hidden):
    threads(3)
    x = torch.randn(6, 7, 6)
    compiled, plain = _threaded_and_plain_telemetry(monkeypatch, x, hidden)
    assert fused_calls, "the compiled loops ran"
    for got, want in zip(compiled.layers, plain.layers, strict=True):
        assert got.gate_saturation == pytest.approx(want.gate_saturation, abs=1e-3)
        assert got.forget_gate_mean == pytest.approx(want.forget_gate_mean, rel=1e-5)
        assert got.cell_absmax == pytest.approx(want.cell_absmax, rel=1e-5)
        np.testing.assert_allclose(got.grad_norm_per_step, want.grad_norm_per_step, rtol=1e-5)
        np.testing.assert_allclose(got.cell_grad_norm_per_step, want.cell_grad_norm_per_step, rtol=1e-5)
    x[4, 2, 1] = math.nan  # reaches every unit of every thread at step 4
    compiled, plain = _threaded_and_plain_telemetry(monkeypatch, x, hidden)
    assert compiled.first_nonfinite == plain.first_nonfinite
    assert (compiled.first_nonfinite.timestep, compiled.first_nonfinite.stage) == (4, "forward")


def test_without_the_library_the_loops_run_pytorch_ops(fused_calls, without_library):
    ref, fast = float32_pair("reference", bidirectional=True)
    assert_float32_parity(ref, fast, torch.randn(9, 4, 6, dtype=torch.float64))
    assert fused_calls == []


def _fresh_library(monkeypatch, tmp_path, **environment):
    monkeypatch.setenv("FASTLSTM_CACHE_DIR", str(tmp_path))
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    fused_step.library.cache_clear()
    try:
        return fused_step.library()
    finally:
        fused_step.library.cache_clear()  # the next caller builds (or finds) the machine's own again


def test_a_failing_compiler_warns_and_leaves_the_pytorch_ops(monkeypatch, tmp_path):
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert _fresh_library(monkeypatch, tmp_path, CC="false") is None
    assert list(tmp_path.glob("*.so")) == []


def test_no_compiler_and_the_switch_off_leave_the_pytorch_ops(monkeypatch, tmp_path):
    assert _fresh_library(monkeypatch, tmp_path, CC="no-such-compiler-here") is None
    assert _fresh_library(monkeypatch, tmp_path, FASTLSTM_FUSED_STEP="0") is None


@needs_library
def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    assert _fresh_library(monkeypatch, tmp_path) is not None
    (built,) = tmp_path.glob("fused_step-*.so")
    stamp = built.stat().st_mtime_ns
    assert _fresh_library(monkeypatch, tmp_path) is not None
    assert built.stat().st_mtime_ns == stamp, "a second load reuses the cached build"


def _gcc() -> str | None:
    """The compiler fused_step.py would use, when it is GCC on x86-64 (whose vectoriser reports per loop)."""
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None or platform.machine() not in ("x86_64", "AMD64"):
        return None
    version = subprocess.run([compiler, "--version"], check=False, capture_output=True, text=True).stdout
    return compiler if "GCC" in version or "Free Software Foundation" in version else None


def _sigmoid_loops(source: str) -> list[int]:
    """The line numbers of the `for` loops whose body calls sigmoid (the innermost loop around each call)."""
    lines = source.splitlines()
    loops = []
    for number, line in enumerate(lines, start=1):
        if "sigmoid(" in line and not line.lstrip().startswith("static"):
            loop = next(k for k in range(number - 1, 0, -1) if lines[k - 1].lstrip().startswith("for ("))
            loops.append(loop)
    return sorted(set(loops))


@pytest.mark.skipif(_gcc() is None, reason="needs GCC on x86-64 to report which loops it vectorised")
def test_the_sigmoid_loops_vectorise_without_masked_arithmetic(tmp_path):
    # AVX2 has no masked arithmetic, so a loop whose sigmoid selects between two computed values vectorises only if
    # the compiler may compute both: the flags must allow it (fused_step._BASE_FLAGS says why it matters).
    flags = fused_step._BASE_FLAGS + fused_step._ISA_FLAGS["AVX2"]
    report = subprocess.run(
        [
            _gcc(),
            *flags,
            "-fopt-info-vec-optimized",
            *(str(source) for source in fused_step._SOURCES),
            "-o",
            str(tmp_path / "step.so"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    vectorised = {int(line.split(":")[1]) for line in report.splitlines() if "loop vectorized" in line}
    loops = _sigmoid_loops(fused_step._SOURCES[0].read_text())
    assert len(loops) == 3, loops  # the forward's gates and tanh(c_t), the backward's tanh(c_t)
    assert set(loops) <= vectorised, f"left scalar: lines {sorted(set(loops) - vectorised)}"
