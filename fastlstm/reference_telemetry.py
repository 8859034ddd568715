"""The reference backend's telemetry (docs/telemetry.md), reduced after a time loop from the tensors it stored.

Nothing here runs per step: every quantity is one or two vectorised reductions over all steps at once, chosen for
what eager PyTorch does fast on a CPU (measured with torch 2.13 on the project's 2-core machines: reductions in the
tensor's own dtype are several times faster than float64 accumulation, and anything that writes or reads a bool
tensor several times slower than the same work in float).

  * A step's tensor holds a NaN/±inf exactly when its maximum or its minimum is not finite (amax and amin
    propagate NaN): two read-only passes, exact.
  * The pre-activations are x_t W_ihᵀ + b + h_{t−1} W_hhᵀ, so wherever the input projection is not finite, neither
    are they: the input projection is only checked at the first step whose pre-activations are not, to tell
    "input" from "gates". Likewise dL/dh_t = dL/dy_t + the recurrence's part, so the incoming gradient is checked
    only at the first step whose dL/dh_t is not. Without a projection h_t = o·tanh(c_t) is finite wherever o and
    c_t are, so the "hidden" check can never be the first and is skipped.
  * Gradient norms are taken in the compute dtype (float32 for 16-bit storage), of each step's values divided by
    their largest magnitude (which the non-finite check has already found), and rescaled in float64: the squared
    norm is what a float64 sum of squares gives, without its cost, and without the overflow of a float32 sum of
    squares past |g| ~ 1e19 (exploding gradients are what these rows are for) or its underflow below ~1e-19.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import constants as C
from .scratch import scratch

# Saturation thresholds of the four gate blocks (docs/telemetry.md): below LOW[k] or above HIGH is saturated.
# The candidate g is tanh: |g| > TANH_HIGH is g < -TANH_HIGH or g > TANH_HIGH, and TANH_HIGH == 1 - SIGMOID_LOW.
LOW = (C.SIGMOID_LOW, C.SIGMOID_LOW, -C.TANH_HIGH, C.SIGMOID_LOW)
HIGH = 1.0 - C.SIGMOID_LOW
assert C.TANH_HIGH == HIGH, "one comparison serves all four gates only while the high thresholds agree"


def record_forward(probe, xw, pre, gates, cells, out, active, reverse: bool) -> None:
    """Add one forward launch to probe.target (the slot's stats row) and its first non-finite value to probe.first.
    xw, pre, gates: [T, B, 4H]; cells: [T, B, H]; out: [T, B, P] with a projection, else None. xw, which is read at
    one step only, may also be a function of a step index tensor [1] returning that step's rows [1, B, 4H]. pre is
    overwritten (its buffer serves as scratch once it has been checked): the callers' pre is theirs to discard."""
    steps, batch, _ = gates.shape
    if steps * batch == 0:
        probe.target[C.STAT_LAUNCHES] += 1
        return
    pre_bad = _nonfinite_and_absmax(pre, active)[0]
    saturated, elements, forget_sum = _gate_stats(gates, active, scratch=pre)  # its buffer holds flags from here on
    cell_bad, cell_absmax = _nonfinite_and_absmax(cells, active)
    out_bad = None if out is None else _nonfinite_and_absmax(out, active)[0]
    reduced = ForwardReductions(pre_bad, cell_bad, cell_absmax, saturated, elements, forget_sum, out_bad)
    record_reduced(probe, xw, reduced, active, reverse)


class ForwardReductions(NamedTuple):
    """What the forward's telemetry keeps of a launch, from record_forward's reductions or from a loop that reduced
    as it went (reference.py's compiled loops)."""

    pre_bad: torch.Tensor  # [T] bool: a counted pre-activation of step t is NaN/inf
    cell_bad: torch.Tensor  # [T] bool: likewise a cell state
    cell_absmax: torch.Tensor  # [T] the largest counted |c_t| (NaN if one is)
    saturated: torch.Tensor  # [4] float64: saturated elements of each gate block
    elements: torch.Tensor  # float64: counted elements of one gate block
    forget_sum: torch.Tensor  # float64: the sum of the counted forget-gate values
    out_bad: torch.Tensor | None  # [T] bool: likewise the projected output; None without a projection


def record_reduced(probe, xw, reduced: ForwardReductions, active, reverse: bool) -> None:
    """record_forward from its reductions (xw as there)."""
    steps = reduced.pre_bad.shape[0]
    stats = probe.target
    stats[C.STAT_LAUNCHES] += 1
    order = _launch_order(steps, ascending=not reverse, device=reduced.pre_bad.device)
    key_gates = _first_key(probe, C.STAGE_FORWARD, reduced.pre_bad, order, tensor=1)
    stats[C.STAT_SATURATED : C.STAT_SATURATED + 4] += reduced.saturated
    stats[C.STAT_ELEMENTS] += reduced.elements
    stats[C.STAT_FORGET_SUM] += reduced.forget_sum
    stats[C.STAT_CELL_ABSMAX] = torch.maximum(stats[C.STAT_CELL_ABSMAX], reduced.cell_absmax.amax().double())
    keys = [
        key_gates,
        _earlier_at(key_gates, xw, active, reverse, steps),
        _first_key(probe, C.STAGE_FORWARD, reduced.cell_bad, order, 2),
    ]
    if reduced.out_bad is not None:
        keys.append(_first_key(probe, C.STAGE_FORWARD, reduced.out_bad, order, tensor=3))
    _fold(probe, keys)


def record_backward(probe, grad_out, grad_hidden, grad_cell, grad_gates, active, reverse: bool) -> None:
    """Add one backward launch to probe.target (the slot's [NUM_GRAD_ROWS, capacity] rows) and its first
    non-finite value to probe.first. grad_hidden: dL/dh_t, zero past each sequence's end; grad_cell: dL/dc_t as
    the loop carried it (also past the end, where it is not counted, and where it is overwritten with zeros)."""
    steps, batch, _ = grad_gates.shape
    if steps * batch == 0:
        probe.target[C.GRAD_PASSES, :steps] += 1
        return
    if active is not None:
        grad_cell.masked_fill_(~active.unsqueeze(-1), 0.0)
    hidden_bad, hidden_absmax = _nonfinite_and_absmax(grad_hidden, active)
    cell_bad, cell_absmax = _nonfinite_and_absmax(grad_cell, active)
    reduced = BackwardReductions(
        hidden_bad,
        _squared_norms(grad_hidden, hidden_absmax),
        cell_bad,
        _squared_norms(grad_cell, cell_absmax),
        _nonfinite_and_absmax(grad_gates, active)[0],
    )
    record_backward_reduced(probe, grad_out, reduced, active, reverse)


class BackwardReductions(NamedTuple):
    """What the backward's telemetry keeps of a launch, from record_backward's reductions or from a loop that
    reduced as it went (reference.py's compiled loops)."""

    hidden_bad: torch.Tensor  # [T] bool: a counted element of dL/dh_t is NaN/inf
    hidden_sumsq: torch.Tensor  # [T] float64: the squared norm of dL/dh_t
    cell_bad: torch.Tensor  # [T] bool: likewise dL/dc_t
    cell_sumsq: torch.Tensor  # [T] float64
    gates_bad: torch.Tensor  # [T] bool: likewise the gate gradients


def record_backward_reduced(probe, grad_out, reduced: BackwardReductions, active, reverse: bool) -> None:
    """record_backward from its reductions (grad_out [T, B, P], read at one step only)."""
    steps = reduced.hidden_bad.shape[0]
    rows = probe.target
    rows[C.GRAD_PASSES, :steps] += 1
    rows[C.GRAD_SUMSQ, :steps] += reduced.hidden_sumsq
    rows[C.GRAD_CELL_SUMSQ, :steps] += reduced.cell_sumsq
    # The backward walks time in reverse of its forward: ascending for the reverse direction.
    order = _launch_order(steps, ascending=reverse, device=reduced.hidden_bad.device)
    stage = C.STAGE_BACKWARD
    key_hidden = _first_key(probe, stage, reduced.hidden_bad, order, tensor=1)
    keys = [
        key_hidden,
        _earlier_at(key_hidden, grad_out, active, not reverse, steps),
        _first_key(probe, stage, reduced.cell_bad, order, tensor=2),
        _first_key(probe, stage, reduced.gates_bad, order, tensor=3),
    ]
    _fold(probe, keys)


def _squared_norms(x: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """[T] float64: the squared norm of each step of x [T, B, F] (zero where not counted), absmax [T] its largest
    |value|. A step holding a NaN or ±inf is not scaled, so its norm is NaN or inf as the float64 sum would be."""
    scale = torch.where(torch.isfinite(absmax) & (absmax > 0), absmax, 1.0)
    scaled = torch.div(x, scale.view(-1, 1, 1), out=scratch("scaled", x.shape, x.dtype, x.device))
    norms = torch.linalg.vector_norm(scaled, dim=(1, 2))
    return (norms.double() * scale.double()).square()


def _gate_stats(gates, active, scratch) -> tuple:
    """(saturated elements of each gate block [4], counted elements of one block, the forget gate's sum), float64."""
    steps, batch, four_h = gates.shape
    hidden = four_h // 4
    rows = gates.view(steps * batch, four_h)
    # Over [T·B, 4H] with one threshold per column: over the [T, B, 4, H] view the same comparison is slower.
    low = torch.tensor(LOW, dtype=gates.dtype, device=gates.device).repeat_interleave(hidden)
    counted = rows.new_ones(rows.shape[0]) if active is None else active.view(-1).to(gates.dtype)
    # The flags are written as 0/1 in the gates' own dtype and counted by a matrix-vector product with the rows'
    # weights (1, or 0 past a sequence's end): on the CPU, comparisons that write bool and reductions of bool or
    # over the first dimension run several times slower (torch 2.13, [32000, 256] float32, one thread: a comparison
    # 10 ms into bool against 3.4 into float32, a column sum 2.4 ms against 1.4 for the product).
    flags = scratch.view(steps * batch, four_h)
    saturated = _per_column_count(torch.lt(rows, low, out=flags), counted)
    saturated += _per_column_count(torch.gt(rows, HIGH, out=flags), counted)  # disjoint from the low side
    elements = counted.sum(dtype=torch.float64) * hidden
    return saturated.view(4, hidden).sum(dim=1), elements, (counted @ rows[:, hidden : 2 * hidden]).sum().double()


# A float32 sum of 0/1 values is exact while every partial sum stays below 2**24, whatever the order it adds in:
# the flags are counted in slices of at most that many rows.
_EXACT_ROWS = 2**24


def _per_column_count(flags: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """float64 [C]: the sum over rows of flags [R, C] (0 or 1) weighted by counted [R] (0 or 1); exact."""
    total = flags.new_zeros(flags.shape[1], dtype=torch.float64)
    for start in range(0, flags.shape[0], _EXACT_ROWS):
        total += (counted[start : start + _EXACT_ROWS] @ flags[start : start + _EXACT_ROWS]).double()
    return total


def _nonfinite_and_absmax(x: torch.Tensor, active) -> tuple:
    """Per step t of x [T, B, F]: whether a counted element is NaN or ±inf ([T] bool), and the largest |value|
    among the counted elements ([T], NaN if one is NaN)."""
    if active is None:
        high, low = x.amax(dim=(1, 2)), x.amin(dim=(1, 2))
        return ~(torch.isfinite(high) & torch.isfinite(low)), torch.maximum(high, -low)
    high, low = x.amax(dim=2), x.amin(dim=2)  # [T, B]
    bad = ~(torch.isfinite(high) & torch.isfinite(low)) & active
    absmax = torch.where(active, torch.maximum(high, -low), 0.0).amax(dim=1)
    return bad.any(dim=1), absmax


def _launch_order(steps: int, ascending: bool, device) -> torch.Tensor:
    """The step field of the first-non-finite key for t = 0..T-1: earlier in the launch's own time order is smaller."""
    time = torch.arange(steps, device=device, dtype=torch.int64)
    return time if ascending else C.STEP_MAX - time


def _first_key(probe, stage: int, bad: torch.Tensor, order: torch.Tensor, tensor: int) -> torch.Tensor:
    """The key of the first step flagged in `bad` [T] for `tensor` (docs/telemetry.md), or NO_NONFINITE."""
    launch = (probe.seq << C.SEQ_SHIFT) + (stage << C.STAGE_SHIFT) + (probe.order << C.ORDER_SHIFT)
    keys = launch + (order << C.STEP_SHIFT) + tensor
    return torch.where(bad, keys, C.NO_NONFINITE).amin()


def _earlier_at(key: torch.Tensor, earlier, active, descending: bool, steps: int) -> torch.Tensor:
    """The key of tensor `key - 1` (the one checked just before) at the step of `key`, if `earlier` [T, B, F] (or
    the rows [1, B, F] that `earlier(step)` returns) is not finite there; NO_NONFINITE otherwise. `earlier` is
    non-finite only where the later tensor is too, so this one step decides. `descending`: the launch runs t = T-1
    down to 0 (its key stores STEP_MAX - t)."""
    field = (key >> C.STEP_SHIFT) & C.STEP_MAX
    step = (C.STEP_MAX - field if descending else field).clamp(0, steps - 1).view(1)  # garbage when key is NO
    row_active = None if active is None else active.index_select(0, step)
    rows = earlier.index_select(0, step) if isinstance(earlier, torch.Tensor) else earlier(step)
    bad = _nonfinite_and_absmax(rows, row_active)[0][0]
    return torch.where(bad & (key != C.NO_NONFINITE), key - 1, C.NO_NONFINITE)


def _fold(probe, keys: list) -> None:
    first = torch.stack(keys).amin()
    probe.first.copy_(torch.minimum(probe.first, first))
