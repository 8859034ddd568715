"""One LSTM layer in one direction: two torch.library ops for the time loops and the autograd Function around them.

  forward:  input projection (one GEMM over all T*B rows) -> fastlstm::recurrence_forward (time loop)
  backward: fastlstm::recurrence_backward (reverse time loop) -> gate gradients of every step
            -> weight and input gradients as GEMMs over all T*B rows

The implementation (reference.py or the Triton kernels, routing.time_loops) only runs the time loops; everything
around them is shared here, so both produce gradients through the same GEMMs. The loops are registered as custom ops,
with shape-only fake implementations, so that torch.compile traces the module as a graph of opaque ops instead of
breaking on them. The ops mutate the telemetry tensors in place and therefore cannot carry autograd themselves
(torch.library only accepts autograd formulas on functional ops): the Function below does.

A backward asked for a differentiable result (create_graph=True: gradient penalties, double backward) recomputes
the layer from ordinary torch ops and differentiates that, so every higher derivative is exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import active_mask, compute_dtype, counted_restarts, time_order
from .routing import time_loops
from .scratch import scratch
from .telemetry import PassProbe, StageProbe, telemetry_of


def lstm_layer(x, h0, c0, weights, lengths, reverse: bool, implementation: str, probe: PassProbe | None, restarts=None):
    """One layer-direction. x: [T, B, I]; weights: (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent ones;
    implementation: "reference" | "triton"; probe: where telemetry goes, or None; restarts: [T, B] bool, the steps
    whose entering state is (h0, c0) (reference.py), or None. Returns (out, h_n, c_n)."""
    telemetry = (None, None, None, 0, 0, None) if probe is None else tuple(probe)
    return _LSTMLayer.apply(x, h0, c0, *weights, lengths, restarts, *telemetry, reverse, implementation)


# Both ops take the telemetry's registry key instead of its counter rows and find the rows at run time (eagerly,
# also inside a compiled graph): telemetry.PassProbe says why. `first` is the one telemetry tensor they mutate
# visibly, which also keeps them from ever being treated as pure.


@torch.library.custom_op("fastlstm::recurrence_forward", mutates_args=("first",))
def recurrence_forward(
    xw: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    restarts: Tensor | None,
    first: Tensor | None,
    seq: Tensor | None,
    telemetry_key: Tensor | None,
    slot: int,
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(out, h_n, c_n, gates, cells): see reference.recurrence_forward. No telemetry when `first` is None."""
    probe = None
    if first is not None:
        probe = StageProbe(telemetry_of(telemetry_key).stats_row(xw.device, slot), first, seq, slot)
    loops = time_loops(backend)
    result = loops.recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse, probe, restarts=restarts)
    return (result.out, result.h_n, result.c_n, *result.saved)


@recurrence_forward.register_fake
def _(xw, h0, c0, w_hh, w_hr, lengths, restarts, first, seq, telemetry_key, slot, reverse, backend):
    steps, batch, four_h = xw.shape
    state = compute_dtype(xw.dtype)
    return (
        xw.new_empty(steps, batch, h0.shape[-1]),
        xw.new_empty(batch, h0.shape[-1]),
        xw.new_empty(batch, four_h // 4),
        xw.new_empty(steps, batch, four_h, dtype=state),
        xw.new_empty(steps, batch, four_h // 4, dtype=state),
    )


@torch.library.custom_op("fastlstm::recurrence_backward", mutates_args=("first",))
def recurrence_backward(
    grad_out: Tensor,
    grad_hn: Tensor,
    grad_cn: Tensor,
    c0: Tensor,
    gates: Tensor,
    cells: Tensor,
    w_hh: Tensor,
    w_hr: Tensor | None,
    lengths: Tensor | None,
    restarts: Tensor | None,
    first: Tensor | None,
    seq: Tensor | None,
    telemetry_key: Tensor | None,
    slot: int,
    order: int,
    reverse: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_gates, grad_h0, grad_c0, grad_hidden, hidden_full): see reference.recurrence_backward; the last two
    are empty without a projection (custom ops cannot return None). No telemetry when `first` is None."""
    probe = None
    if first is not None:
        rows = telemetry_of(telemetry_key).step_rows(gates.device, gates.shape[0])
        probe = StageProbe(rows[slot], first, seq, order)
    result = time_loops(backend).recurrence_backward(
        grad_out, grad_hn, grad_cn, c0, (gates, cells), w_hh, w_hr, lengths, reverse, probe, restarts=restarts
    )
    grad_hidden = gates.new_empty(0) if result.grad_hidden is None else result.grad_hidden
    hidden_full = gates.new_empty(0) if result.hidden_full is None else result.hidden_full
    return result.grad_gates, result.grad_h0, result.grad_c0, grad_hidden, hidden_full


@recurrence_backward.register_fake
def _(
    grad_out,
    grad_hn,
    grad_cn,
    c0,
    gates,
    cells,
    w_hh,
    w_hr,
    lengths,
    restarts,
    first,
    seq,
    key,
    slot,
    order,
    reverse,
    backend,
):
    steps, batch, four_h = gates.shape
    has_proj = w_hr is not None
    return (
        torch.empty_like(gates),
        gates.new_empty(batch, grad_hn.shape[-1]),
        gates.new_empty(batch, four_h // 4),
        gates.new_empty((steps, batch, grad_hn.shape[-1]) if has_proj else (0,)),
        gates.new_empty((steps, batch, four_h // 4) if has_proj else (0,)),
    )


def _input_projection(x, w_ih, bias):
    """x W_ihᵀ + b for every step, [T, B, 4H]. On the CPU into a kept buffer (scratch.py): the forward reads it only
    until recurrence_forward returns, and a fresh tensor of that size is faulted in page by page on every pass
    (torch 2.13, 2-core AMD EPYC, input 8, hidden 64, batch 64, 500 steps: F.linear took 14 ms, 9 of them in
    writing the bias into new memory)."""
    # Not under autocast, which takes no out= arguments, nor inside torch.compile, whose graph would guard on the
    # buffer's size (and so recompile whenever a pass is larger than every one before it).
    if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return F.linear(x, w_ih, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = scratch("input_projection", (rows.shape[0], w_ih.shape[0]), x.dtype, x.device)
    if bias is None:
        torch.mm(rows, w_ih.t(), out=out)
    else:
        torch.addmm(bias, rows, w_ih.t(), out=out)
    return out.view(*x.shape[:-1], w_ih.shape[0])


# Positions in _LSTMLayer.forward's argument list.
_DIFFERENTIABLE = 8  # x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr
_NON_DIFFERENTIABLE = 10  # lengths, restarts, the six PassProbe fields, reverse, implementation


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        x,
        h0,
        c0,
        w_ih,
        w_hh,
        b_ih,
        b_hh,
        w_hr,
        lengths,
        restarts,
        first_forward,
        first_backward,
        seq,
        slot,
        backward_order,
        telemetry_key,
        reverse,
        implementation,
    ):
        bias = None if b_ih is None else b_ih + b_hh
        xw = _input_projection(x, w_ih, bias)
        out, h_n, c_n, gates, cells = recurrence_forward(
            xw, h0, c0, w_hh, w_hr, lengths, restarts, first_forward, seq, telemetry_key, slot, reverse, implementation
        )
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, restarts, out, gates, cells, seq)
        # Other layers' backwards write this between this forward and its backward, so it is kept as a plain
        # reference: save_for_backward would reject it for having been modified in place.
        ctx.first_backward = first_backward
        ctx.config = (telemetry_key, slot, backward_order, reverse, implementation)
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn):
        x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, restarts, out, gates, cells, seq = ctx.saved_tensors
        key, slot, order, reverse, implementation = ctx.config
        create_graph = torch.is_grad_enabled()
        if not create_graph or ctx.first_backward is not None:  # with create_graph, only for the telemetry
            with torch.no_grad():
                dgates_raw, grad_h0, grad_c0, grad_hidden, hidden_full = recurrence_backward(
                    grad_out.contiguous(),
                    grad_hn.contiguous(),
                    grad_cn.contiguous(),
                    c0,
                    gates,
                    cells,
                    w_hh,
                    w_hr,
                    lengths,
                    restarts,
                    ctx.first_backward,
                    seq,
                    key,
                    slot,
                    order,
                    reverse,
                    implementation,
                )
        if create_graph:
            inputs = (x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
            grads = _differentiable_grads(
                inputs, ctx.needs_input_grad, (grad_out, grad_hn, grad_cn), lengths, reverse, restarts
            )
            return (*grads, *([None] * _NON_DIFFERENTIABLE))
        needs = ctx.needs_input_grad
        dgates = dgates_raw.to(x.dtype).flatten(0, 1)
        grad_x = (dgates @ w_ih).view_as(x) if needs[0] else None
        grad_w_ih = (x.flatten(0, 1).t() @ dgates).t() if needs[3] else None  # native_recorded.py says why
        grad_w_hh = None
        if needs[4]:
            h_prev = _previous_hidden(out, h0, lengths, reverse, restarts)
            grad_w_hh = dgates.t() @ h_prev.flatten(0, 1)
        grad_bias = dgates_raw.sum(dim=(0, 1)).to(x.dtype) if b_ih is not None and (needs[5] or needs[6]) else None
        grad_w_hr = None
        if w_hr is not None and needs[7]:
            grad_w_hr = (grad_hidden.flatten(0, 1).t() @ hidden_full.flatten(0, 1)).to(x.dtype)
        return (
            grad_x,
            grad_h0.to(h0.dtype) if needs[1] else None,
            grad_c0.to(c0.dtype) if needs[2] else None,
            grad_w_ih,
            grad_w_hh,
            grad_bias,
            grad_bias,
            grad_w_hr,
            *([None] * _NON_DIFFERENTIABLE),
        )


def _previous_hidden(out, h0, lengths, reverse, restarts=None):
    """h_{t-1} as seen by step t, for every t: [T, B, P]. Only steps inside a sequence matter (others have zero
    gate gradients), but there the first processed step and every restarted one must see h0."""
    if restarts is not None:
        return torch.where(restarts.unsqueeze(-1), h0.to(out.dtype), _previous_hidden(out, h0, lengths, reverse))
    # Slicing after the concatenation keeps every size T or T + 1: a T - 1 would make torch.compile specialise
    # (and recompile) at T = 2.
    steps = out.shape[0]
    h0 = h0.to(out.dtype).unsqueeze(0)
    if not reverse:
        return torch.cat((h0, out))[:steps]
    following = torch.cat((out, h0))[1:]
    if lengths is None:
        return following
    starts = torch.arange(1, steps + 1, device=out.device).unsqueeze(1) >= lengths.unsqueeze(0)
    return torch.where(starts.unsqueeze(-1), h0, following)


# ---- differentiable backward (create_graph=True) ----


def _differentiable_grads(inputs, needs_input_grad, grad_outputs, lengths, reverse, restarts) -> list:
    """Gradients of the layer's outputs with respect to `inputs`, as a graph autograd can differentiate again."""
    wanted = [k for k in range(_DIFFERENTIABLE) if needs_input_grad[k] and inputs[k] is not None]
    outputs = differentiable_layer(*inputs, lengths, reverse, restarts)
    found = torch.autograd.grad(
        outputs, [inputs[k] for k in wanted], grad_outputs, create_graph=True, allow_unused=True
    )
    grads: list = [None] * _DIFFERENTIABLE
    for k, grad in zip(wanted, found):
        grads[k] = torch.zeros_like(inputs[k]) if grad is None else grad
    return grads


def differentiable_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse: bool, restarts=None):
    """One layer-direction from ordinary torch ops: reference.recurrence_forward's maths (same dtype rule, same
    handling of lengths and restarts) without telemetry and without in-place writes, so autograd differentiates it
    any number of times. Slow (a few ops per step, all recorded); only double backward uses it. Returns (out, h_n,
    c_n)."""
    dtype = compute_dtype(x.dtype)
    bias = None if b_ih is None else (b_ih + b_hh).to(dtype)
    xw = F.linear(x.to(dtype), w_ih.to(dtype), bias)
    w_hh_t = w_hh.to(dtype).t()
    w_hr_t = None if w_hr is None else w_hr.to(dtype).t()
    steps = x.shape[0]
    active = active_mask(lengths, steps)
    restarts = counted_restarts(restarts, active)
    h0, c0 = h0.to(dtype), c0.to(dtype)
    h, c = h0, c0
    outputs = [None] * steps
    for t in time_order(steps, reverse):
        if restarts is not None:
            restart = restarts[t].unsqueeze(1)
            h, c = torch.where(restart, h0, h), torch.where(restart, c0, c)
        i, f, g, o = (xw[t] + h @ w_hh_t).chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr_t is not None:
            h_new = h_new @ w_hr_t
        if active is None:
            c, h, outputs[t] = c_new, h_new, h_new
        else:
            keep = active[t].unsqueeze(1)
            c, h = torch.where(keep, c_new, c), torch.where(keep, h_new, h)
            outputs[t] = torch.where(keep, h_new, 0.0)
    return torch.stack(outputs).to(x.dtype), h.to(x.dtype), c.to(x.dtype)
