"""How close a result must be to its reference: the relative error and the budgets per precision.

One definition for the test suite (tests/support.py builds its assertions on it) and for the benchmark's correctness
gate (fastlstm/bench/providers.py), so that "passes the tests" and "passes the gate" mean the same numbers.
"""

from __future__ import annotations

import math

import torch

# Budgets on rel_err against a float64 torch.nn.LSTM with the same weights and (rounded) inputs, per precision of the
# candidate's storage and matmuls:
# - fp64: the same maths in the same precision; only the order of the sums differs (a few ulps of float64, grown
#   over the time steps).
# - fp32: float32 storage with exact-float32 matmuls; the recurrence adds about one float32 rounding per step.
# - tf32: float32 storage, matmuls on TF32 tensor cores (10-bit mantissa inputs).
# - bf16/fp16: 16-bit storage of weights, inputs and saved activations, float32 accumulation. A 16-bit nn.LSTM is no
#   reference here: its generic loop accumulates weight gradients in 16 bits (about 4e-2 off at T=1024).
TOLERANCES = {"fp64": 1e-12, "fp32": 1e-5, "tf32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}

_PRECISION_OF_DTYPE = {torch.float64: "fp64", torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def tolerance(precision: torch.dtype | str) -> float:
    """The budget of TOLERANCES for a precision name ("fp32", "tf32", ...) or a storage dtype (torch.float32 means
    exact float32 matmuls; TF32 has no dtype of its own, ask for "tf32")."""
    key = _PRECISION_OF_DTYPE.get(precision, precision)
    if key not in TOLERANCES:
        raise KeyError(f"no tolerance for {precision!r}; known: {', '.join(TOLERANCES)} or their torch dtypes")
    return TOLERANCES[key]


def rel_err(actual: torch.Tensor | None, expected: torch.Tensor) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂, computed in float64.

    Zero denominator: when `expected` is all zeros the result is the absolute error ‖actual‖₂ (a zero reference
    is matched only by a result that is zero to within the same budget). Missing, wrong-shaped or non-finite:
    `actual` None, a shape different from `expected`'s, or a NaN/inf anywhere gives math.inf, which exceeds every
    budget and sorts as the worst of a set of errors."""
    if actual is None or actual.shape != expected.shape:
        return math.inf
    actual, expected = actual.detach().double(), expected.detach().to(device=actual.device, dtype=torch.float64)
    num, den = float((actual - expected).norm()), float(expected.norm())
    err = num / den if den > 0 else num
    return err if math.isfinite(err) else math.inf
