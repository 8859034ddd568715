"""One LSTM layer in one direction, as an autograd Function.

  forward:  input projection (one GEMM over all T*B rows) -> backend recurrence (time loop)
  backward: backend reverse-time recurrence -> gate gradients for every step -> weight and input gradients as GEMMs

The backend (reference.py or the Triton kernels) only runs the time loops; everything around them is shared here,
so both backends produce gradients through the same GEMMs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable


def lstm_layer(x, h0, c0, weights, lengths, reverse, backend, telemetry, layer, direction):
    """Run one layer-direction. x: [T, B, I]; weights: (w_ih, w_hh, b_ih, b_hh, w_hr), biases/w_hr may be None."""
    return _LSTMLayer.apply(x, h0, c0, *weights, lengths, reverse, backend, telemetry, layer, direction)


def _probe(telemetry, layer, direction, device, steps):
    if telemetry is None or not telemetry.enabled:
        return None
    return telemetry.probe(layer, direction, device, steps)


class _LSTMLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse, backend, telemetry, layer, direction):
        steps = x.shape[0]
        bias = None if b_ih is None else b_ih + b_hh
        xw = F.linear(x, w_ih, bias)
        probe = _probe(telemetry, layer, direction, x.device, steps)
        result = backend.recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse, probe)
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, w_hr, lengths, result.out, *result.saved)
        ctx.config = (reverse, backend, telemetry, layer, direction, b_ih is not None)
        ctx.mark_non_differentiable(*(t for t in (lengths,) if t is not None))
        return result.out, result.h_n, result.c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_hn, grad_cn):
        x, h0, c0, w_ih, w_hh, w_hr, lengths, out, *saved = ctx.saved_tensors
        reverse, backend, telemetry, layer, direction, has_bias = ctx.config
        steps, batch, _ = x.shape
        probe = _probe(telemetry, layer, direction, x.device, steps)
        grads = backend.recurrence_backward(
            grad_out.contiguous(),
            grad_hn.contiguous(),
            grad_cn.contiguous(),
            c0,
            tuple(saved),
            w_hh,
            w_hr,
            lengths,
            reverse,
            probe,
        )
        needs = ctx.needs_input_grad
        dgates = grads.grad_gates.to(x.dtype).flatten(0, 1)
        grad_x = (dgates @ w_ih).view_as(x) if needs[0] else None
        grad_w_ih = dgates.t() @ x.flatten(0, 1) if needs[3] else None
        grad_w_hh = None
        if needs[4]:
            h_prev = _previous_hidden(out, h0, lengths, reverse)
            grad_w_hh = dgates.t() @ h_prev.flatten(0, 1)
        grad_bias = grads.grad_gates.sum(dim=(0, 1)).to(x.dtype) if has_bias and (needs[5] or needs[6]) else None
        grad_w_hr = None
        if w_hr is not None and needs[7]:
            hidden_grad = grads.grad_hidden.flatten(0, 1)
            grad_w_hr = (hidden_grad.t() @ grads.hidden_full.flatten(0, 1)).to(x.dtype)
        return (
            grad_x,
            grads.grad_h0.to(h0.dtype) if needs[1] else None,
            grads.grad_c0.to(c0.dtype) if needs[2] else None,
            grad_w_ih,
            grad_w_hh,
            grad_bias,
            grad_bias,
            grad_w_hr,
            None,
            None,
            None,
            None,
            None,
            None,
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

