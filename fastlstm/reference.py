"""The reference backend: the recurrence of one layer and direction as a plain-torch step loop.

This is the executable specification the Triton kernels are held to: same inputs, same outputs, same saved state,
same telemetry (docs/telemetry.md). It runs on any device and never imports triton.

Shapes: T timesteps, B sequences, H hidden units, P = proj_size or H (the size of h_t).
  xw      [T, B, 4H]  input projection x_t W_ihᵀ + b_ih + b_hh, gate blocks in nn.LSTM order i, f, g, o
  h0, c0  [B, P], [B, H]
  lengths [B] int64 on the device, or None when every sequence spans all T steps
A sequence b takes part in step t only while t < lengths[b]; past its end its state is left untouched and its
output is zero. In the reverse direction the same rule makes each sequence start from its own last step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import constants as C


class ForwardResult(NamedTuple):
    out: torch.Tensor  # [T, B, P], zero past each sequence's end
    h_n: torch.Tensor  # [B, P]
    c_n: torch.Tensor  # [B, H]
    saved: tuple  # what recurrence_backward needs: activated gates [T, B, 4H] and carried cell states [T, B, H]


class BackwardResult(NamedTuple):
    grad_gates: torch.Tensor  # [T, B, 4H] gradient of the gate pre-activations (zero past each sequence's end)
    grad_h0: torch.Tensor  # [B, P]
    grad_c0: torch.Tensor  # [B, H]
    grad_hidden: torch.Tensor | None  # [T, B, P] total dL/dh_t, only with a projection (for dW_hr)
    hidden_full: torch.Tensor | None  # [T, B, H] o_t * tanh(c_t) before the projection, only with a projection


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """16-bit storage is computed in float32; float32 and float64 in themselves."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def time_order(steps: int, reverse: bool) -> range:
    return range(steps - 1, -1, -1) if reverse else range(steps)


def active_mask(lengths: torch.Tensor | None, steps: int) -> torch.Tensor | None:
    """[T, B] bool, True where sequence b takes part in step t; None when all do."""
    if lengths is None:
        return None
    return torch.arange(steps, device=lengths.device).unsqueeze(1) < lengths.unsqueeze(0)


def recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse: bool, probe=None) -> ForwardResult:
    steps, batch, _ = xw.shape
    hidden = c0.shape[-1]
    dtype = compute_dtype(xw.dtype)
    w_hh_t = w_hh.to(dtype).t()
    w_hr_t = None if w_hr is None else w_hr.to(dtype).t()
    active = active_mask(lengths, steps)

    h, c = h0.to(dtype), c0.to(dtype)
    out = xw.new_empty(steps, batch, h0.shape[-1], dtype=dtype)
    gates = xw.new_empty(steps, batch, 4 * hidden, dtype=dtype)
    cells = xw.new_empty(steps, batch, hidden, dtype=dtype)
    pre_nonfinite = xw.new_zeros(steps, batch, dtype=torch.bool) if probe is not None else None
    sigmoid_gates = (slice(0, 2 * hidden), slice(3 * hidden, 4 * hidden))
    for t in time_order(steps, reverse):
        pre = torch.addmm(xw[t].to(dtype), h, w_hh_t)
        act = gates[t]
        for block in sigmoid_gates:
            torch.sigmoid(pre[:, block], out=act[:, block])
        torch.tanh(pre[:, 2 * hidden : 3 * hidden], out=act[:, 2 * hidden : 3 * hidden])
        i, f, g, o = act.chunk(4, dim=1)
        c_new = torch.addcmul(f * c, i, g)
        h_new = o * torch.tanh(c_new)
        if w_hr_t is not None:
            h_new = h_new @ w_hr_t
        if active is None:
            c, h = c_new, h_new
            out[t] = h_new
        else:
            keep = active[t].unsqueeze(1)
            c = torch.where(keep, c_new, c)
            h = torch.where(keep, h_new, h)
            out[t] = torch.where(keep, h_new, 0.0)
        cells[t] = c
        if pre_nonfinite is not None:
            pre_nonfinite[t] = ~torch.isfinite(pre).all(dim=1)

    if probe is not None:
        _record_forward(probe, xw, gates, cells, out, pre_nonfinite, active, reverse)
    return ForwardResult(out.to(xw.dtype), h.to(xw.dtype), c.to(xw.dtype), (gates, cells))


def recurrence_backward(grad_out, grad_hn, grad_cn, c0, saved, w_hh, w_hr, lengths, reverse: bool, probe=None):
    gates, cells = saved
    steps, batch, _ = gates.shape
    hidden = cells.shape[-1]
    dtype = gates.dtype
    w_hh_c = w_hh.to(dtype)
    w_hr_c = None if w_hr is None else w_hr.to(dtype)
    active = active_mask(lengths, steps)
    c0 = c0.to(dtype)

    grad_h, grad_c = grad_hn.to(dtype), grad_cn.to(dtype)
    grad_gates = gates.new_empty(steps, batch, 4 * hidden)
    grad_hidden = gates.new_zeros(steps, batch, grad_h.shape[-1]) if w_hr is not None else None
    watch = probe is not None
    if watch:
        sumsq = gates.new_zeros(steps, dtype=torch.float64)
        cell_sumsq = gates.new_zeros(steps, dtype=torch.float64)
        step_nonfinite = gates.new_zeros(steps, batch, 2, dtype=torch.bool)  # grad_hidden, grad_cell

    for t in time_order(steps, not reverse):
        keep = None if active is None else active[t].unsqueeze(1)
        dh = grad_out[t].to(dtype) + grad_h
        if keep is not None:
            dh = torch.where(keep, dh, 0.0)
        if w_hr_c is not None:
            grad_hidden[t] = dh
            dh_full = dh @ w_hr_c
        else:
            dh_full = dh
        i, f, g, o = gates[t].chunk(4, dim=1)
        tanh_c = torch.tanh(cells[t])
        c_prev = _previous(cells, t, reverse, c0)
        dc = grad_c + dh_full * o * (1 - tanh_c * tanh_c)
        d_pre = torch.cat(
            (dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g), dh_full * tanh_c * o * (1 - o)),
            dim=1,
        )
        if keep is not None:
            d_pre = torch.where(keep, d_pre, 0.0)
        grad_gates[t] = d_pre
        dh_prev, dc_prev = d_pre @ w_hh_c, dc * f
        if keep is None:
            grad_h, grad_c = dh_prev, dc_prev
        else:
            grad_h = torch.where(keep, dh_prev, grad_h)
            grad_c = torch.where(keep, dc_prev, grad_c)
        if watch:
            sumsq[t] = dh.double().square().sum()
            # dc is the total gradient reaching c_t (through h_t and through step t+1's forget gate); past a
            # sequence's end it holds the carried gradient of a state that step t does not produce: not counted.
            counted_dc = dc if keep is None else torch.where(keep, dc, 0.0)
            cell_sumsq[t] = counted_dc.double().square().sum()
            step_nonfinite[t, :, 0] = ~torch.isfinite(dh).all(dim=1)
            step_nonfinite[t, :, 1] = ~torch.isfinite(dc).all(dim=1)

    hidden_full = None
    if w_hr is not None:
        hidden_full = gates[..., 3 * hidden :] * torch.tanh(cells)
    if watch:
        _record_backward(probe, grad_out, grad_gates, sumsq, cell_sumsq, step_nonfinite, active, reverse)
    return BackwardResult(grad_gates, grad_h, grad_c, grad_hidden, hidden_full)


def _previous(states: torch.Tensor, t: int, reverse: bool, initial: torch.Tensor) -> torch.Tensor:
    """The carried state before step t (states holds the carried state after every step)."""
    prev = t + 1 if reverse else t - 1
    return initial if prev < 0 or prev >= states.shape[0] else states[prev]


# ---- telemetry (docs/telemetry.md) ----


def _record_forward(probe, xw, gates, cells, out, pre_nonfinite, active, reverse: bool) -> None:
    steps, batch, _ = gates.shape
    probe.target[C.STAT_LAUNCHES] += 1
    if steps * batch > 0:
        _record_forward_stats(probe.target, gates, cells, active)
    flags = torch.stack(
        (_row_nonfinite(xw), pre_nonfinite, _row_nonfinite(cells), _row_nonfinite(out)), dim=-1
    )  # [T, B, 4] in FORWARD_TENSORS order
    _record_first_nonfinite(probe, flags, active, C.STAGE_FORWARD, ascending=not reverse)


def _record_forward_stats(stats, gates, cells, active) -> None:
    steps, batch, four_h = gates.shape
    hidden = four_h // 4
    blocks = gates.view(steps, batch, 4, hidden)
    saturated = (blocks < C.SIGMOID_LOW) | (blocks > 1.0 - C.SIGMOID_LOW)
    saturated[:, :, 2] = blocks[:, :, 2].abs() > C.TANH_HIGH
    forget = blocks[:, :, 1]
    cell_abs = cells.abs()
    if active is None:
        elements = float(steps * batch * hidden)
    else:
        saturated &= active[:, :, None, None]
        forget = torch.where(active.unsqueeze(-1), forget, 0.0)
        cell_abs = torch.where(active.unsqueeze(-1), cell_abs, 0.0)
        elements = active.sum(dtype=torch.float64) * hidden
    stats[C.STAT_SATURATED : C.STAT_SATURATED + 4] += saturated.sum(dim=(0, 1, 3), dtype=torch.float64)
    stats[C.STAT_ELEMENTS] += elements
    stats[C.STAT_FORGET_SUM] += forget.sum(dtype=torch.float64)
    stats[C.STAT_CELL_ABSMAX] = torch.maximum(stats[C.STAT_CELL_ABSMAX], cell_abs.amax().double())


def _record_backward(probe, grad_out, grad_gates, sumsq, cell_sumsq, step_nonfinite, active, reverse: bool) -> None:
    steps = grad_gates.shape[0]
    probe.target[C.GRAD_SUMSQ, :steps] += sumsq
    probe.target[C.GRAD_CELL_SUMSQ, :steps] += cell_sumsq
    probe.target[C.GRAD_PASSES, :steps] += 1
    flags = torch.cat(
        (_row_nonfinite(grad_out).unsqueeze(-1), step_nonfinite, _row_nonfinite(grad_gates).unsqueeze(-1)), dim=-1
    )  # [T, B, 4] in BACKWARD_TENSORS order
    _record_first_nonfinite(probe, flags, active, C.STAGE_BACKWARD, ascending=reverse)


def _row_nonfinite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).all(dim=-1)


def _record_first_nonfinite(probe, flags, active, stage: int, ascending: bool) -> None:
    """Fold [T, B, tensors] non-finite flags into the stage's first-event key with a device-side minimum."""
    if active is not None:
        flags = flags & active.unsqueeze(-1)
    per_step = flags.any(dim=1)  # [T, tensors]
    steps, tensors = per_step.shape
    time = torch.arange(steps, device=flags.device, dtype=torch.int64)
    order = time if ascending else C.STEP_MAX - time
    tensor_ids = torch.arange(tensors, device=flags.device, dtype=torch.int64)
    launch = (stage << C.STAGE_SHIFT) + (probe.order << C.ORDER_SHIFT)
    keys = (probe.seq << C.SEQ_SHIFT) + launch + (order.unsqueeze(1) << C.STEP_SHIFT) + tensor_ids
    first = torch.where(per_step, keys, C.NO_NONFINITE).amin()
    probe.first.copy_(torch.minimum(probe.first, first))
