"""One LSTM layer in one direction: two torch.library ops for the time loops and the autograd Function around them.

  forward:  input projection (one GEMM over all T*B rows) -> fastlstm::recurrence_forward (time loop)
  backward: fastlstm::recurrence_backward (reverse time loop) -> gate gradients of every step
            -> weight and input gradients as GEMMs over all T*B rows

The backend (reference.py or the Triton kernels) only runs the time loops; everything around them is shared here,
so both backends produce gradients through the same GEMMs. The loops are registered as custom ops, with shape-only
fake implementations, so that torch.compile traces the module as a graph of opaque ops instead of breaking on them.
The ops mutate the telemetry tensors in place and therefore cannot carry autograd themselves (torch.library only
accepts autograd formulas on functional ops): the Function below does.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .backends import backend_module
from .reference import compute_dtype
from .telemetry import LayerProbe, StageProbe


def lstm_layer(x, h0, c0, weights, lengths, reverse: bool, backend: str, probe: LayerProbe | None):
    """One layer-direction. x: [T, B, I]; weights: (w_ih, w_hh, b_ih, b_hh, w_hr) with None for absent ones;
    backend: "reference" | "triton"; probe: where telemetry goes, or None. Returns (out, h_n, c_n)."""
    if probe is None:
        telemetry = (None, None, 0, None, None, 0, None)
    else:
        fwd, bwd = probe  # both stages share the pass number, which autograd.Function must receive only once
        telemetry = (fwd.target, fwd.first, fwd.order, bwd.target, bwd.first, bwd.order, fwd.seq)
    return _LSTMLayer.apply(x, h0, c0, *weights, lengths, *telemetry, reverse, backend)


@torch.library.custom_op("fastlstm::recurrence_forward", mutates_args=("stats", "first"))
def recurrence_forward(
    xw: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], lengths: Optional[Tensor],
    stats: Optional[Tensor], first: Optional[Tensor], seq: Optional[Tensor], order: int, reverse: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(out, h_n, c_n, gates, cells): see reference.recurrence_forward."""
    probe = None if stats is None else StageProbe(stats, first, seq, order)
    result = backend_module(backend).recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse, probe)
    return (result.out, result.h_n, result.c_n, *result.saved)


@recurrence_forward.register_fake
def _(xw, h0, c0, w_hh, w_hr, lengths, stats, first, seq, order, reverse, backend):
    steps, batch, four_h = xw.shape
    state = compute_dtype(xw.dtype)
    return (
        xw.new_empty(steps, batch, h0.shape[-1]),
        xw.new_empty(batch, h0.shape[-1]),
        xw.new_empty(batch, four_h // 4),
        xw.new_empty(steps, batch, four_h, dtype=state),
        xw.new_empty(steps, batch, four_h // 4, dtype=state),
    )


@torch.library.custom_op("fastlstm::recurrence_backward", mutates_args=("grad", "first"))
def recurrence_backward(
    grad_out: Tensor, grad_hn: Tensor, grad_cn: Tensor, c0: Tensor, gates: Tensor, cells: Tensor, w_hh: Tensor,
    w_hr: Optional[Tensor], lengths: Optional[Tensor], grad: Optional[Tensor], first: Optional[Tensor],
    seq: Optional[Tensor], order: int, reverse: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """(grad_gates, grad_h0, grad_c0, grad_hidden, hidden_full): see reference.recurrence_backward; the last two
    are empty without a projection (custom ops cannot return None)."""
    probe = None if grad is None else StageProbe(grad, first, seq, order)
    result = backend_module(backend).recurrence_backward(
        grad_out, grad_hn, grad_cn, c0, (gates, cells), w_hh, w_hr, lengths, reverse, probe
    )
    grad_hidden = gates.new_empty(0) if result.grad_hidden is None else result.grad_hidden
    hidden_full = gates.new_empty(0) if result.hidden_full is None else result.hidden_full
    return result.grad_gates, result.grad_h0, result.grad_c0, grad_hidden, hidden_full


@recurrence_backward.register_fake
def _(grad_out, grad_hn, grad_cn, c0, gates, cells, w_hh, w_hr, lengths, grad, first, seq, order, reverse, backend):
    steps, batch, four_h = gates.shape
    has_proj = w_hr is not None
    return (
        torch.empty_like(gates),
        gates.new_empty(batch, grad_hn.shape[-1]),
        gates.new_empty(batch, four_h // 4),
        gates.new_empty((steps, batch, grad_hn.shape[-1]) if has_proj else (0,)),
        gates.new_empty((steps, batch, four_h // 4) if has_proj else (0,)),
    )


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths,
        stats, first_forward, forward_order, grad, first_backward, backward_order, seq, reverse, backend,
    ):  # fmt: skip
        bias = None if b_ih is None else b_ih + b_hh
        xw = F.linear(x, w_ih, bias)
        out, h_n, c_n, gates, cells = recurrence_forward(
            xw, h0, c0, w_hh, w_hr, lengths, stats, first_forward, seq, forward_order, reverse, backend
        )
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, lengths, out, gates, cells, seq)
        # Other layers' backwards write these between this forward and its backward, so they are kept as plain
        # references: save_for_backward would reject them for having been modified in place.
        ctx.telemetry = (grad, first_backward, backward_order)
        ctx.config = (reverse, backend, b_ih is not None)
        return out, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_hn, grad_cn):
        x, h0, c0, w_ih, w_hh, w_hr, lengths, out, gates, cells, seq = ctx.saved_tensors
        grad, first, order = ctx.telemetry
        reverse, backend, has_bias = ctx.config
        dgates_raw, grad_h0, grad_c0, grad_hidden, hidden_full = recurrence_backward(
            grad_out.contiguous(), grad_hn.contiguous(), grad_cn.contiguous(), c0, gates, cells, w_hh, w_hr,
            lengths, grad, first, seq, order, reverse, backend,
        )  # fmt: skip
        needs = ctx.needs_input_grad
        dgates = dgates_raw.to(x.dtype).flatten(0, 1)
        grad_x = (dgates @ w_ih).view_as(x) if needs[0] else None
        grad_w_ih = dgates.t() @ x.flatten(0, 1) if needs[3] else None
        grad_w_hh = None
        if needs[4]:
            h_prev = _previous_hidden(out, h0, lengths, reverse)
            grad_w_hh = dgates.t() @ h_prev.flatten(0, 1)
        grad_bias = dgates_raw.sum(dim=(0, 1)).to(x.dtype) if has_bias and (needs[5] or needs[6]) else None
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
            *([None] * 11),
        )


def _previous_hidden(out, h0, lengths, reverse):
    """h_{t-1} as seen by step t, for every t: [T, B, P]. Only steps inside a sequence matter (others have zero
    gate gradients), but there the first processed step must see h0."""
    h0 = h0.to(out.dtype).unsqueeze(0)
    if not reverse:
        return torch.cat((h0, out[:-1]))
    following = torch.cat((out[1:], h0))
    if lengths is None:
        return following
    steps = out.shape[0]
    starts = torch.arange(1, steps + 1, device=out.device).unsqueeze(1) >= lengths.unsqueeze(0)
    return torch.where(starts.unsqueeze(-1), h0, following)
