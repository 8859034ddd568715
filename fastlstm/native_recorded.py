"""A recording pass on the CPU: PyTorch's own LSTM op runs the forward, and what telemetry and the analytic backward
need is rebuilt from its outputs in a few operations over all steps at once.

What `backend="auto"` runs on the CPU for a pass that records telemetry (routing.py, "native-recorded"). The
reference's step loop (reference.py) issues one GEMM and six pointwise ops per step from Python; PyTorch's op
(oneDNN or its C++ loop) runs the same recurrence without that overhead. It runs layer by layer, each call covering
both directions of one layer, so that every layer's outputs are at hand:

  1. out, h_n, c_n   the op on the layer's input; these are the module's results, those of nn.LSTM under
                     torch.no_grad() to the bit (native_layer says why not those of its training kernels), with
                     dropout applied between the calls where nn.LSTM applies it, drawing the same masks
  2. per direction   h_{t-1} for every t is the output shifted by one step in the direction's own order (h0 first;
                     with lengths, each sequence's first step sees h0): the pre-activations of all steps are then one
                     GEMM, x W_ihᵀ + b + h_{t-1} W_hhᵀ, and the activated gates one sigmoid
  3. cell states     c_t = f_t · c_{t-1} + i_t · g_t is the only step-by-step part left: one multiply-add per step
  4. telemetry       reduced from those tensors by the reference's own code (reference_telemetry.record_forward)

The backward is the reference's analytic backward (reference.recurrence_backward, called directly rather than
through function.py's op, so that its gate gradients can be a scratch buffer) on the rebuilt gates and cell states,
followed by the weight and input gradients as GEMMs over all T·B rows, so gradients and gradient telemetry are the
reference's up to float rounding. A backward asked for a
differentiable result (create_graph=True) differentiates function.differentiable_layer instead, as the reference
backend does.

The rebuilt gates differ from the op's internal ones only by rounding; the first non-finite value is located on
them as the reference locates it on its own (a NaN or inf in h_{t-1}, c_{t-1} or the input makes the same step's
pre-activations or cell state non-finite in both).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import _VF
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import reference
from .function import _previous_hidden, differentiable_layer
from .padding import dropout_between_layers
from .reference import _candidate_scale, active_mask, gate_blocks, time_order
from .reference_telemetry import record_forward
from .scratch import scratch
from .telemetry import PassProbe, StageProbe, telemetry_of

_WEIGHTS = 5  # w_ih, w_hh, b_ih, b_hh, w_hr per direction, None where absent
_PER_DIRECTION = 2 + _WEIGHTS  # h0, c0 and the weights: the differentiable inputs of one direction


def run_layers(
    x, h0, c0, weights, lengths, *, bias: bool, batch_first: bool, dropout: float, num_directions: int, probes: list
):
    """Every layer of a pass, as module.LSTM._run_layers runs them: x [T, B, I] time-major padded (sorted by
    length when `lengths` is given), h0/c0 [L·D, B, *], weights[slot] = (w_ih, w_hh, b_ih, b_hh, w_hr), dropout
    the probability applied between layers (0 outside training), probes[slot] a PassProbe or None (nothing
    recorded). Returns (out [T, B, D·P], h_n [L·D, B, P], c_n [L·D, B, H]). The CPU only: lengths are on the host.
    batch_first: x is the transpose of a batch-first input."""
    batch_sizes = None if lengths is None else active_mask(lengths, x.shape[0]).sum(dim=1)
    num_layers = h0.shape[0] // num_directions
    h_n, c_n = [], []
    layer_input = x
    for layer in range(num_layers):
        slots = range(layer * num_directions, (layer + 1) * num_directions)
        config = _LayerConfig(bias, batch_sizes, tuple(probes[s] for s in slots), layer == 0, batch_first)
        tensors = [t for s in slots for t in (h0[s], c0[s], *weights[s])]
        out, h, c = _NativeRecordedLayer.apply(config, layer_input, lengths, *tensors)
        h_n.append(h)
        c_n.append(c)
        layer_input = out
        if dropout > 0 and layer < num_layers - 1:
            layer_input = dropout_between_layers(layer_input, dropout, lengths)  # where and as nn.LSTM drops
    return layer_input, torch.cat(h_n), torch.cat(c_n)


class _LayerConfig(NamedTuple):
    bias: bool
    batch_sizes: torch.Tensor | None  # host int64, the packed form of `lengths`; None without lengths
    probes: tuple  # PassProbe (or None) per direction
    first_layer: bool  # the layer's input is the module's (native_layer says why that matters)
    batch_first: bool  # the module's input is batch-first

    @property
    def directions(self) -> int:
        return len(self.probes)


def native_layer(x, h0, c0, flat_weights: list, config: _LayerConfig, lengths):
    """PyTorch's LSTM op on one layer (both directions), called as nn.LSTM calls it under torch.no_grad(), so that
    its results are those of nn.LSTM under no_grad to the bit: (out [T, B, D·P] padded with zeros past each
    sequence's end, h_n [D, B, P], c_n [D, B, H]). With lengths the op runs on the packed sequence.

    Which kernels the op runs, and so the last bits of its results, depend on more than the values (torch 2.13,
    CPU). oneDNN's float32 path runs other kernels in grad mode, whose results differ in the last bits and which
    cost up to 2.7× more at the CPU targets' shapes (one thread, benchmarks/README.md): the route runs the no_grad ones,
    whatever the pass, since its backward is its own. PyTorch's own C++ path (float64, projections) depends on the
    layout of the input and on which tensors require grad (matmul folds a 3-D input differently then): the op
    sees the input in the module's layout and aliases carrying the requires_grad that nn.LSTM's call would see
    (the user's tensors' own; False for a layer above the first, an intermediate result under no_grad)."""
    x_flag = x.requires_grad and config.first_layer
    x = x.detach().requires_grad_(x_flag)
    h0, c0, *flat_weights = (t.detach().requires_grad_(t.requires_grad) for t in (h0, c0, *flat_weights))
    bidirectional = config.directions == 2
    with torch.no_grad():
        if lengths is None:
            batch_first = config.batch_first and config.first_layer
            layer_input = x.transpose(0, 1) if batch_first else x
            out, h_n, c_n = _VF.lstm(
                layer_input, (h0, c0), flat_weights, config.bias, 1, 0.0, False, bidirectional, batch_first
            )
            out = out.transpose(0, 1) if batch_first else out
        else:
            data = pack_padded_sequence(x, lengths).data
            out, h_n, c_n = _VF.lstm(
                data, config.batch_sizes, (h0, c0), flat_weights, config.bias, 1, 0.0, False, bidirectional
            )
            out, _ = pad_packed_sequence(PackedSequence(out, config.batch_sizes), total_length=x.shape[0])
    return out, h_n, c_n


class _Rebuilt(NamedTuple):
    """What one direction's recurrence went through, rebuilt from the op's outputs."""

    gates: torch.Tensor  # [T, B, 4H] activated gates i, f, g, o (g = tanh)
    cells: torch.Tensor  # [T, B, H] c_t, the carried state past each sequence's end (as the reference saves it)
    operands: torch.Tensor  # [T, B, I + P (+ 1)] what step t multiplied by the weights: x_t, h_{t-1} (and a 1)


def rebuild(x, out, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, reverse: bool, probe: StageProbe | None):
    """The gates and cell states of one direction whose outputs `out` [T, B, P] the op produced, and its forward
    telemetry into `probe` (reference_telemetry.record_forward, as the reference backend records it)."""
    steps, batch, _ = out.shape
    four_h = w_hh.shape[0]
    hidden = four_h // 4
    active = active_mask(lengths, steps)
    operands = _operands(x, out, h0, lengths, reverse, b_ih is not None)
    # The candidate's rows doubled, so that its tanh comes from the one sigmoid of all gates (reference.py,
    # TANH_VIA_SIGMOID): exact scaling, the same pre-activations the reference loop checks.
    scale = _candidate_scale(four_h, w_hh.dtype, w_hh.device).unsqueeze(1)
    w_ih_s = w_ih * scale
    bias_s = None if b_ih is None else (b_ih + b_hh) * scale.squeeze(1)
    # x_t W_ihᵀ + b + h_{t−1} W_hhᵀ of every step as one product, [x, h_{t−1}, 1] [W_ih, W_hh, b]ᵀ: the input
    # projection on its own is read at one step only, by the non-finite check (input_at).
    weights = [w_ih_s, w_hh * scale] + ([] if bias_s is None else [bias_s.unsqueeze(1)])
    rows = operands.flatten(0, 1)
    pre = torch.mm(rows, torch.cat(weights, dim=1).t(), out=scratch("pre", (rows.shape[0], four_h), x.dtype, x.device))
    gates = torch.sigmoid(pre)
    i, f, g, _ = gate_blocks(gates)
    torch.add(gates.new_full((), -1.0), g, alpha=2.0, out=g)  # 2σ(2x) − 1 = tanh(x)
    cell_input = torch.mul(i, g, out=scratch("cell_input", (rows.shape[0], hidden), x.dtype, x.device))
    cells = _cell_states(cell_input, f, c0, active, reverse, (steps, batch, hidden))
    if probe is not None:

        def input_at(step):  # unscaled, as the reference checks it: the doubled candidate rows could overflow
            return F.linear(x.index_select(0, step), w_ih, None if b_ih is None else b_ih + b_hh)

        pre, gates = pre.view(steps, batch, four_h), gates.view(steps, batch, four_h)
        record_forward(probe, input_at, pre, gates, cells, out if w_hr is not None else None, active, reverse)
    return _Rebuilt(gates.view(steps, batch, four_h), cells, operands)


# On the CPU the products over all T·B rows are fastest with the bias as a column of ones beside the inputs, and with
# the rows of those operands as the reduced dimension of the weight gradient (torch 2.13, one thread; at input 8,
# hidden 64, 32000 rows: the forward's product 12 ms against 25 for addmm on a concatenation, the weight and bias
# gradients 11 ms against 21 for three separate reductions).
def _operands(x, out, h0, lengths, reverse: bool, bias: bool) -> torch.Tensor:
    """[T, B, I + P (+ 1)]: x_t, the h_{t-1} step t saw (function._previous_hidden) and, with a bias, a 1."""
    steps, batch, inputs = x.shape
    width = out.shape[-1]
    operands = x.new_empty(steps, batch, inputs + width + int(bias))
    operands[..., :inputs] = x
    h_prev = operands[..., inputs : inputs + width]
    if reverse and lengths is not None:  # each sequence's first step is its last one: per-sequence starts
        h_prev.copy_(_previous_hidden(out, h0, lengths, reverse))
    else:
        first, rest, source = (
            (0, slice(1, None), slice(None, -1)) if not reverse else (-1, slice(None, -1), slice(1, None))
        )
        h_prev[first] = h0
        h_prev[rest] = out[source]
    if bias:
        operands[..., -1] = 1.0
    return operands


def _cell_states(ig, f, c0, active, reverse: bool, shape) -> torch.Tensor:
    """c_t = f_t · c_{t−1} + (i·g)_t in the direction's time order, from ig [T·B, H] (overwritten) and f (a
    [T·B, H] view). Past a sequence's end f is taken as 1 and i·g as 0, which carries the state exactly, as the
    reference does."""
    steps, batch, _ = shape
    ig = ig.view(shape)
    f = f.unflatten(0, (steps, batch))
    if active is not None:
        keep = active.unsqueeze(-1)
        f = torch.where(keep, f, 1.0)
        ig.masked_fill_(~keep, 0.0)
    cells = ig.new_empty(shape)
    cells_t, f_t, ig_t = cells.unbind(0), f.unbind(0), ig.unbind(0)
    c = c0
    for t in time_order(steps, reverse):
        c = torch.addcmul(ig_t[t], f_t[t], c, out=cells_t[t])
    return cells


def _forward_probe(probe: PassProbe | None, device) -> StageProbe | None:
    """The forward counters of a PassProbe, looked up now (as function.py's forward op does at run time)."""
    if probe is None:
        return None
    return StageProbe(telemetry_of(probe.key).stats_row(device, probe.slot), probe.first_forward, probe.seq, probe.slot)


def _backward_probe(probe: PassProbe | None, device, steps: int) -> StageProbe | None:
    """The per-step gradient rows of a PassProbe, looked up now (as function.py's backward op does)."""
    if probe is None:
        return None
    rows = telemetry_of(probe.key).step_rows(device, steps)[probe.slot]
    return StageProbe(rows, probe.first_backward, probe.seq, probe.backward_order)


class _Direction(NamedTuple):
    """The differentiable inputs of one direction, in the order _NativeRecordedLayer takes them."""

    h0: torch.Tensor
    c0: torch.Tensor
    w_ih: torch.Tensor
    w_hh: torch.Tensor
    b_ih: torch.Tensor | None
    b_hh: torch.Tensor | None
    w_hr: torch.Tensor | None


def _directions(tensors) -> list:
    return [_Direction(*tensors[k : k + _PER_DIRECTION]) for k in range(0, len(tensors), _PER_DIRECTION)]


class _NativeRecordedLayer(torch.autograd.Function):
    """One layer, all directions: the op's forward, the rebuilt state, the reference's analytic backward."""

    @staticmethod
    def forward(ctx, config: _LayerConfig, x, lengths, *tensors):
        directions = _directions(tensors)
        flat = [w for d in directions for w in (d.w_ih, d.w_hh, d.b_ih, d.b_hh, d.w_hr) if w is not None]
        h0 = torch.stack([d.h0 for d in directions])
        c0 = torch.stack([d.c0 for d in directions])
        out, h_n, c_n = native_layer(x, h0, c0, flat, config, lengths)
        width = out.shape[-1] // len(directions)
        saved = []
        for k, d in enumerate(directions):
            probe = _forward_probe(config.probes[k], x.device)
            out_d = out[..., k * width : (k + 1) * width]
            saved.extend(rebuild(x, out_d, *d, lengths, k == 1, probe))
        ctx.save_for_backward(x, lengths, *tensors, *saved)
        ctx.config = config
        return out, h_n, c_n

    @staticmethod
    def backward(ctx, grad_out, grad_hn, grad_cn):
        config = ctx.config
        x, lengths, *rest = ctx.saved_tensors
        count = len(config.probes)
        directions = _directions(rest[: count * _PER_DIRECTION])
        saved = rest[count * _PER_DIRECTION :]
        width = grad_out.shape[-1] // count
        grad_outputs = [(grad_out[..., k * width : (k + 1) * width], grad_hn[k], grad_cn[k]) for k in range(count)]
        create_graph = torch.is_grad_enabled()
        needs_x, needs = ctx.needs_input_grad[1], ctx.needs_input_grad[3:]
        grad_x, grads = None, []
        for k, d in enumerate(directions):
            if create_graph and config.probes[k] is None:
                continue  # the telemetry is all the analytic backward would be run for
            with torch.no_grad():
                grad_x_k, grads_k = _direction_backward(
                    grad_outputs[k],
                    x,
                    d,
                    _Rebuilt(*saved[3 * k : 3 * k + 3]),
                    lengths,
                    k == 1,
                    config.probes[k],
                    needs_x,
                    needs[k * _PER_DIRECTION : (k + 1) * _PER_DIRECTION],
                )
            grad_x = grad_x_k if grad_x is None else grad_x + grad_x_k
            grads.extend(grads_k)
        if create_graph:  # the gradients as a graph; the telemetry was recorded above
            grads = _differentiable_grads(x, lengths, directions, needs_x, needs, grad_outputs)
            return None, grads[0], None, *grads[1:]
        return None, grad_x, None, *grads


def _direction_backward(grad_outputs, x, d: _Direction, state: _Rebuilt, lengths, reverse, probe, needs_x, needs):
    """(grad x or None, [grads of h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr]) of one direction: the reference's analytic
    backward (telemetry included), then products over all T·B rows. The gate gradients stay inside this function,
    so they are a scratch buffer (scratch.py), which function.py's op, whose outputs they would be, cannot use."""
    grad_out, grad_hn, grad_cn = (g.contiguous() for g in grad_outputs)
    gates = state.gates
    dgates, grad_h0, grad_c0, grad_hidden, hidden_full = reference.recurrence_backward(
        grad_out,
        grad_hn,
        grad_cn,
        d.c0,
        (gates, state.cells),
        d.w_hh,
        d.w_hr,
        lengths,
        reverse,
        _backward_probe(probe, gates.device, gates.shape[0]),
        grad_gates=scratch("grad_gates", gates.shape, gates.dtype, gates.device),
    )
    rows = dgates.flatten(0, 1)
    grad_w_hr = None
    if d.w_hr is not None and needs[6]:
        grad_w_hr = grad_hidden.flatten(0, 1).t() @ hidden_full.flatten(0, 1)
    inputs, width = x.shape[-1], d.w_hh.shape[1]
    grad_weights = [None, None, None]  # of w_ih, w_hh and the bias: one product gives all three (_operands)
    if needs[2] or needs[3] or (d.b_ih is not None and (needs[4] or needs[5])):
        full = (state.operands.flatten(0, 1).t() @ rows).t()
        grad_weights = [full[:, :inputs], full[:, inputs : inputs + width], full[:, -1] if d.b_ih is not None else None]
    grad_w_ih, grad_w_hh, grad_bias = grad_weights
    return (rows @ d.w_ih).unflatten(0, x.shape[:2]) if needs_x else None, [
        grad_h0 if needs[0] else None,
        grad_c0 if needs[1] else None,
        grad_w_ih if needs[2] else None,
        grad_w_hh if needs[3] else None,
        grad_bias if needs[4] else None,
        grad_bias if needs[5] else None,
        grad_w_hr,
    ]


def _differentiable_grads(x, lengths, directions: list, needs_x: bool, needs, grad_outputs: list) -> list:
    """[grad x, then per direction the grads of its _Direction] as a graph autograd can differentiate again: every
    direction rebuilt from ordinary torch ops (function.differentiable_layer), as the reference backend does."""
    inputs = [x, *(t for d in directions for t in d)]
    wanted = [k for k, (t, need) in enumerate(zip(inputs, (needs_x, *needs))) if need and t is not None]
    outputs = [t for k, d in enumerate(directions) for t in differentiable_layer(x, *d, lengths, k == 1)]
    found = torch.autograd.grad(
        outputs,
        [inputs[k] for k in wanted],
        [g for gs in grad_outputs for g in gs],
        create_graph=True,
        allow_unused=True,
    )
    grads: list = [None] * len(inputs)
    for k, grad in zip(wanted, found):
        grads[k] = torch.zeros_like(inputs[k]) if grad is None else grad
    return grads
