"""The reference backend: the recurrence of one layer and direction as a plain-torch step loop.

This is the executable specification the Triton kernels are held to: same inputs, same outputs, same saved state,
same telemetry (docs/telemetry.md). It runs on any device and never imports triton.

Shapes: T timesteps, B sequences, H hidden units, P = proj_size or H (the size of h_t).
  xw      [T, B, 4H]  input projection x_t W_ihᵀ + b_ih + b_hh, gate blocks in nn.LSTM order i, f, g, o
  h0, c0  [B, P], [B, H]
  lengths [B] int64 on the device, or None when every sequence spans all T steps
  restarts [T, B] bool on the device, or None: True where the state entering step t of sequence b is (h0[b], c0[b])
          instead of the state its previous step (in the direction's own time order) carried
A sequence b takes part in step t only while t < lengths[b]; past its end its state is left untouched and its
output is zero. In the reverse direction the same rule makes each sequence start from its own last step.

Restarts (episode boundaries inside a sequence, docs/resets.md) count only at steps inside a sequence. A restart cuts
the recurrence's gradient: nothing flows from step t into the state of its previous step; what reaches the re-injected
state goes to h0 and c0, whose gradients therefore add up over the first step and every restarted step. The module
turns the user's `resets` mask into each direction's `restarts` (fastlstm/resets.py).

It is also what `backend="auto"` runs on the CPU for recording float32 passes its compiled loops cover (routing.py), so
it is written for speed the one way eager PyTorch allows. An operation costs a few microseconds whatever its size, so
each step issues only what the recurrence needs, into buffers allocated once (forward: one GEMM and six pointwise ops;
backward: one GEMM and four; the GEMM through step_product.py, which picks the faster of two CPU libraries for it).
Everything that does not depend on the previous step is computed for all steps at once: before the backward's loop its
gate derivatives, after either loop the telemetry (reference_telemetry.py), reduced from what the loop stored. In
float32 without lengths, restarts or projection, the whole loop is one compiled call instead (fused_step.py): every
step's product and pointwise work, split across threads, and the step's telemetry reduced while its rows are in cache.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import fused_step
from .reference_telemetry import (
    HIGH,
    LOW,
    BackwardReductions,
    ForwardReductions,
    record_backward,
    record_backward_reduced,
    record_forward,
    record_reduced,
)
from .scratch import scratch
from .step_product import StepProduct


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


def gate_blocks(x: torch.Tensor) -> tuple:
    """Views of the i, f, g, o blocks of x's last dimension (4H wide)."""
    hidden = x.shape[-1] // 4
    return tuple(x[..., k * hidden : (k + 1) * hidden] for k in range(4))


def counted_restarts(restarts: torch.Tensor | None, active: torch.Tensor | None) -> torch.Tensor | None:
    """[T, B] bool: the restarts that take effect (inside a sequence), or None without restarts."""
    if restarts is None or active is None:
        return restarts
    return restarts & active


def _per_step(x: torch.Tensor | None) -> tuple | None:
    """x's views along its first (time) dimension, taken once: indexing in the loop would cost an op per step."""
    return None if x is None else x.unbind(0)


# ---- forward ----

# tanh(x) = 2·σ(2x) − 1, and this CPU build's tanh costs about three sigmoids (torch 2.13, 64×64 float32: 18 µs
# against 6 µs), so the forward computes both of its tanh through sigmoid. The candidate's pre-activation comes
# doubled from doubled rows of the input projection and of W_hh: scaling by 2 is exact, so this changes only the
# rounding of the tanh (a doubled value that overflows is still right: σ(±inf) gives tanh = ±1). The cell state is
# carried as it is and doubled into tanh's temporary each step: a carried 2·c_t would overflow, and c_n with it,
# for a c0 beyond half the dtype's largest value, which nn.LSTM takes.
TANH_VIA_SIGMOID = 2.0


def _candidate_scale(four_h: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[4H]: 1 for the sigmoid gates' columns, TANH_VIA_SIGMOID for the candidate's."""
    scale = torch.ones(four_h, dtype=dtype, device=device)
    scale[four_h // 2 : 3 * four_h // 4] = TANH_VIA_SIGMOID
    return scale


def tanh_via_sigmoid(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """tanh(x) as the forward computes it, for a whole (contiguous) tensor: 2·σ(2x) − 1 (into out, if given)."""
    s = torch.mul(x, 2.0, out=out)
    torch.sigmoid(s, out=s)
    return torch.add(s.new_full((), -1.0), s, alpha=2.0, out=s)


def recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse: bool, probe=None, restarts=None) -> ForwardResult:
    steps, batch, four_h = xw.shape
    hidden = four_h // 4
    dtype = compute_dtype(xw.dtype)
    active = active_mask(lengths, steps)
    restarts = counted_restarts(restarts, active)
    # Each step adds h_{t-1} W_hhᵀ into its row of `pre` in place, so `pre` starts as the (candidate-doubled) xw.
    scale = _candidate_scale(four_h, dtype, xw.device)
    # Also the conversion of 16-bit storage to float32. (Broadcast over a 2-D view: over the 3-D tensor, the same
    # product takes seven times longer on the CPU.)
    pre = torch.mul(xw.reshape(-1, four_h), scale, out=scratch("pre", (steps * batch, four_h), dtype, xw.device))
    pre = pre.view(steps, batch, four_h)
    w_hh_t = (w_hh.to(dtype) * scale.unsqueeze(1)).t()
    w_hr_t = None if w_hr is None else w_hr.to(dtype).t()

    out = pre.new_empty(steps, batch, h0.shape[-1])
    gates = pre.new_empty(steps, batch, four_h)
    cells = pre.new_empty(steps, batch, hidden)
    h0, c0 = h0.to(dtype), c0.to(dtype)
    reduced = None
    fusable = active is None and restarts is None and w_hr is None and pre.numel() > 0
    if fusable and fused_step.applies(pre, gates, cells, out, c0):
        h_n, c_n, reduced = _fused_forward_loop(pre, h0, c0, w_hh_t, reverse, gates, cells, out, probe is not None)
    else:
        h_n, c_n = _forward_loop(pre, h0, c0, w_hh_t, w_hr_t, active, restarts, reverse, gates, cells, out)
    c_n = c_n.clone()  # it may be a view of `cells`, which is saved for the backward

    if probe is not None and reduced is not None:
        record_reduced(probe, xw, reduced, active, reverse)
    elif probe is not None:
        record_forward(probe, xw, pre, gates, cells, out if w_hr is not None else None, active, reverse)
    # Copies: the final states must not alias `out` (a custom op may not return aliases).
    return ForwardResult(out.to(xw.dtype), h_n.to(xw.dtype, copy=True), c_n.to(xw.dtype), (gates, cells))


def _forward_loop(pre, h, c, w_hh_t, w_hr_t, active, restarts, reverse, gates, cells, out):
    """Fill gates, cells and out step by step; returns the carried (h, c) after the last step."""
    steps, batch, _ = pre.shape
    recurrent = StepProduct(w_hh_t, batch, steps)
    projection = None if w_hr_t is None else StepProduct(w_hr_t, batch, steps)
    pre_t, gates_t, cells_t, out_t = _per_step(pre), _per_step(gates), _per_step(cells), _per_step(out)
    i_t, f_t, g_t, o_t = (_per_step(block) for block in gate_blocks(gates))
    keep_t = _per_step(None if active is None else active.unsqueeze(-1))
    restart_t = _per_step(None if restarts is None else restarts.unsqueeze(-1))
    h0, c0 = h, c  # what a restart re-injects (two ops per step, only with restarts)
    tanh_c = torch.empty_like(c)
    full = None if w_hr_t is None else torch.empty_like(c)  # o * tanh(c) before the projection
    zero, minus_one = c.new_zeros(()), c.new_full((), -1.0)  # where(..., out=) and add(..., out=) take tensors

    def tanh_of(cell):  # 2σ(2c) − 1 into tanh_c
        return torch.add(minus_one, torch.sigmoid(torch.mul(cell, 2.0, out=tanh_c), out=tanh_c), alpha=2.0, out=tanh_c)

    for t in time_order(steps, reverse):
        if restart_t is not None:
            h, c = torch.where(restart_t[t], h0, h), torch.where(restart_t[t], c0, c)
        torch.sigmoid(recurrent(h, pre_t[t], out=pre_t[t]), out=gates_t[t])
        g = torch.add(minus_one, g_t[t], alpha=2.0, out=g_t[t])  # 2σ(2x) − 1 = tanh(x)
        if keep_t is None:
            c = torch.mul(f_t[t], c, out=cells_t[t]).addcmul_(i_t[t], g)
            tanh_of(c)
            if w_hr_t is None:
                h = torch.mul(o_t[t], tanh_c, out=out_t[t])
            else:
                h = projection(torch.mul(o_t[t], tanh_c, out=full), out=out_t[t])
            continue
        keep = keep_t[t]
        c_new = torch.mul(f_t[t], c).addcmul_(i_t[t], g)
        c = torch.where(keep, c_new, c, out=cells_t[t])
        h_new = torch.mul(o_t[t], tanh_of(c_new))
        if projection is not None:
            h_new = projection(h_new)
        torch.where(keep, h_new, zero, out=out_t[t])
        h = torch.where(keep, h_new, h)
    return h, c


def _fused_forward_loop(pre, h, c, w_hh_t, reverse, gates, cells, out, recording: bool):
    """_forward_loop's loop without lengths, restarts or projection as one compiled call (fused_step.py): every
    step's product and pointwise work and, with `recording`, its telemetry's reductions. The same arithmetic up to
    the rounding of its sigmoid and the order of the product's sums. Returns (h_n, c_n, ForwardReductions or None)."""
    steps, batch, four_h = pre.shape
    hidden = four_h // 4
    stats = fused_step.ForwardStats(steps, LOW, HIGH) if recording else None
    w_t = w_hh_t.contiguous()  # [H, 4H] row-major, the layout the loop's product reads
    h, c = h.contiguous(), c.contiguous()
    loop = fused_step.library().fastlstm_forward_loop
    fused_step.run_loop(loop, (w_t, pre, h, c, gates, cells, out), steps, batch, hidden, reverse, stats)
    last = 0 if reverse else -1
    h, c = out[last], cells[last]
    if stats is None:
        return h, c, None
    elements = torch.tensor(float(steps * batch * hidden), dtype=torch.float64)
    reduced = ForwardReductions(
        stats.pre_nonfinite.bool(),
        stats.cell_nonfinite.bool(),
        stats.cell_absmax,
        stats.saturated.double(),
        elements,
        stats.forget_sum[0],
        None,
    )
    return h, c, reduced


# ---- backward ----


def recurrence_backward(
    grad_out,
    grad_hn,
    grad_cn,
    c0,
    saved,
    w_hh,
    w_hr,
    lengths,
    reverse: bool,
    probe=None,
    restarts=None,
    grad_gates=None,
):
    """grad_gates: the [T, B, 4H] tensor to write the gate gradients into, or None for a fresh one."""
    gates, cells = saved
    steps, batch, four_h = gates.shape
    dtype = gates.dtype
    w_hh_c = w_hh.to(dtype)
    w_hr_c = None if w_hr is None else w_hr.to(dtype)
    active = active_mask(lengths, steps)
    restarts = counted_restarts(restarts, active)
    grad_out = grad_out.to(dtype)
    grad_gates = gates.new_empty(steps, batch, four_h) if grad_gates is None else grad_gates
    fusable = active is None and restarts is None and w_hr is None and gates.numel() > 0
    inputs = (grad_out, grad_hn.to(dtype), grad_cn.to(dtype), c0.to(dtype), gates, cells, grad_gates)
    if fusable and fused_step.applies(*inputs):
        return _fused_backward(*inputs, w_hh_c, reverse, probe)
    tanh_c = tanh_via_sigmoid(cells, out=scratch("tanh_c", cells.shape, dtype, cells.device))
    derivatives = _GateDerivatives(gates, cells, tanh_c, c0.to(dtype), reverse, restarts)

    # dL/dh_t of every step (zero past each sequence's end): dW_hr needs it with a projection (and so it is returned
    # then), telemetry always.
    hidden_shape = (steps, batch, grad_hn.shape[-1])
    grad_hidden = None
    if w_hr is not None:
        grad_hidden = gates.new_empty(hidden_shape)
    elif probe is not None:
        grad_hidden = scratch("grad_hidden", hidden_shape, dtype, gates.device)
    grad_cell = None if probe is None else scratch("grad_cell", cells.shape, dtype, cells.device)  # dL/dc_t
    grad_h0, grad_c0 = _backward_loop(
        grad_out,
        grad_hn.to(dtype),
        grad_cn.to(dtype),
        derivatives,
        w_hh_c,
        w_hr_c,
        active,
        restarts,
        reverse,
        grad_gates,
        grad_hidden,
        grad_cell,
    )

    hidden_full = None if w_hr is None else (_rows(gate_blocks(gates)[3]) * _rows(tanh_c)).view_as(tanh_c)
    if probe is not None:
        record_backward(probe, grad_out, grad_hidden, grad_cell, grad_gates, active, reverse)
    return BackwardResult(grad_gates, grad_h0, grad_c0, grad_hidden if w_hr is not None else None, hidden_full)


class _GateDerivatives:
    """What the backward multiplies at step t, computed for every step before the loop.

    With dh the total gradient reaching h_t (through the projection, if any) and dc the one reaching c_t:
      dc              = dc_next · f_{t+1} + dh · o·(1 − tanh²c)           (from_hidden = o·(1 − tanh²c))
      d(i, f, g) pre  = dc · (g·i·(1 − i), c_{t−1}·f·(1 − f), i·(1 − g²))  (from_cell, [T, B, 3, H])
      d(o) pre        = dh · tanh c · o·(1 − o)                           (output_gate)
    Computed on [T·B, ·] views: eager PyTorch runs a pointwise op on a strided 3-D view several times slower.
    """

    def __init__(self, gates, cells, tanh_c, c0, reverse: bool, restarts=None):
        steps, batch, hidden = cells.shape
        i, f, g, o = (_rows(block) for block in gate_blocks(gates))
        tanh_rows = _rows(tanh_c)
        # Every factor is written straight into the buffer the loop reads, with no temporary the size of the gates:
        # on the CPU a fresh tensor that large costs more to fault in than the arithmetic written into it (scratch.py).
        self.forget = gate_blocks(gates)[1]
        dtype, device = gates.dtype, gates.device
        self.from_hidden = scratch("from_hidden", cells.shape, dtype, device)
        from_hidden = torch.mul(tanh_rows, tanh_rows, out=_rows(self.from_hidden))
        torch.addcmul(o, o, from_hidden, value=-1.0, out=from_hidden)
        self.output_gate = scratch("output_gate", cells.shape, dtype, device)
        _slope(o, _rows(self.output_gate)).mul_(tanh_rows)
        from_cell = scratch("from_cell", (steps, batch, 3, hidden), dtype, device)
        _slope(i, _rows(from_cell[:, :, 0])).mul_(g)
        slope_f = from_cell[:, :, 1]
        _slope(f, _rows(slope_f))
        c0_term = None if restarts is None else torch.mul(c0, slope_f)  # a restarted step's c_{t-1} is c0
        # c_{t-1} is the carried state of the previous step in the direction's own order, c0 before the first.
        first, rest, before = (
            (0, slice(1, None), slice(None, -1)) if not reverse else (-1, slice(None, -1), slice(1, None))
        )
        _rows(slope_f[rest]).mul_(_rows(cells[before]))
        slope_f[first].mul_(c0)
        if restarts is not None:
            from_cell[:, :, 1] = torch.where(restarts.unsqueeze(-1), c0_term, slope_f)
        g_squared = _rows(from_cell[:, :, 2])
        torch.addcmul(i, i, torch.mul(g, g, out=g_squared), value=-1.0, out=g_squared)
        self.from_cell = from_cell


def _slope(s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(1 − s)·s, the derivative of a sigmoid whose value is s, into out (both [T·B, H])."""
    return torch.sub(s.new_ones(()), s, out=out).mul_(s)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [T·B, F] (a view for every layout used here)."""
    return x.view(-1, x.shape[-1])


def _backward_loop(
    grad_out, grad_h, grad_c, d, w_hh, w_hr, active, restarts, reverse, grad_gates, grad_hidden, grad_cell
):
    """Fill grad_gates (and grad_hidden / grad_cell when given) in reverse time order; returns (grad_h0, grad_c0).

    With restarts, what reaches a restarted step's entering state (dgates_t W_hh, dc_t f_t) goes to h0 and c0 instead
    of the previous step, whose carried gradients start again from zero. Those are row masks (0 or 1 per sequence),
    so multiplying by them is exact: a pass whose restarts are all false gives the bits of a pass without them."""
    steps, batch, four_h = grad_gates.shape
    hidden = four_h // 4
    recurrent = StepProduct(w_hh, batch, steps)
    projection = None if w_hr is None else StepProduct(w_hr, batch, steps)
    order = list(time_order(steps, not reverse))
    grad_out_t = _per_step(grad_out)
    gates_t = _per_step(grad_gates)
    ifg_t = _per_step(grad_gates[..., : 3 * hidden].unflatten(-1, (3, hidden)))
    o_t = _per_step(gate_blocks(grad_gates)[3])
    dh_t = _per_step(grad_hidden)
    dc_t = _per_step(grad_cell)
    forget_t, from_hidden_t, from_cell_t, output_gate_t = (
        _per_step(x) for x in (d.forget, d.from_hidden, d.from_cell, d.output_gate)
    )
    keep_t = _per_step(None if active is None else active.unsqueeze(-1))
    restart_t = kept_t = None
    if restarts is not None:  # five ops per step more, only with restarts
        restart = restarts.unsqueeze(-1).to(grad_c.dtype)
        restart_t, kept_t = _per_step(restart), _per_step(1.0 - restart)
        grad_h0, grad_c0 = torch.zeros_like(grad_h), torch.zeros_like(grad_c)
    full = None if w_hr is None else grad_c.new_empty(batch, hidden)
    dc_scratch, carry_scratch = torch.empty_like(grad_c), torch.empty_like(grad_c)
    zero = grad_c.new_zeros(())  # where(..., out=) takes no Python number

    if not steps:
        return grad_h.clone(), grad_c.clone()
    if keep_t is None:  # later steps get theirs from the previous step's GEMM
        dh = torch.add(grad_out_t[order[0]], grad_h, out=None if dh_t is None else dh_t[order[0]])
    for k, t in enumerate(order):
        keep = None if keep_t is None else keep_t[t]
        if keep is not None:
            dh = torch.where(keep, grad_out_t[t] + grad_h, zero, out=None if dh_t is None else dh_t[t])
        dh_full = dh if projection is None else projection(dh, out=full)
        dc = torch.addcmul(grad_c, dh_full, from_hidden_t[t], out=dc_scratch if dc_t is None else dc_t[t])
        torch.mul(dc.unsqueeze(1), from_cell_t[t], out=ifg_t[t])
        torch.mul(dh_full, output_gate_t[t], out=o_t[t])
        if keep is not None:
            gates_t[t].masked_fill_(~keep, 0.0)
        outgoing, carried_c = gates_t[t], torch.mul(dc, forget_t[t], out=carry_scratch if keep is None else None)
        if restart_t is not None:
            recurrent(gates_t[t] * restart_t[t], grad_h0, out=grad_h0)
            grad_c0.addcmul_(carried_c, restart_t[t])
            outgoing = gates_t[t] * kept_t[t]
            carried_c.mul_(kept_t[t])
        if keep is None:
            grad_c = carried_c
            if k + 1 < steps:
                after = order[k + 1]
                dh = recurrent(outgoing, grad_out_t[after], out=None if dh_t is None else dh_t[after])
            else:
                grad_h = recurrent(outgoing)
            continue
        grad_h = torch.where(keep, recurrent(outgoing), grad_h)
        grad_c = torch.where(keep, carried_c, grad_c)
    if restart_t is not None:
        return grad_h0.add_(grad_h), grad_c0.add_(grad_c)
    return grad_h, (grad_c.clone() if keep_t is None else grad_c)  # the padded loop's grad_c is a scratch buffer


def _fused_backward(grad_out, grad_hn, grad_cn, c0, gates, cells, grad_gates, w_hh, reverse, probe) -> BackwardResult:
    """recurrence_backward without lengths, restarts or projection, in float32, as one compiled call (fused_step.py):
    every step's pointwise work, its gate derivatives, its product and, with a probe, its telemetry's reductions. The
    same arithmetic up to the rounding of the sigmoid that recomputes tanh(c_t) and the order of the product's sums."""
    steps, batch, four_h = gates.shape
    hidden = four_h // 4
    stats = None if probe is None else fused_step.BackwardStats(steps)
    w = w_hh.contiguous()  # [4H, H]
    grad_h0, grad_c0 = torch.empty_like(grad_hn), torch.empty_like(grad_cn)
    dh, dc, carry = torch.empty_like(grad_hn), torch.empty_like(grad_cn), grad_cn.new_empty(2, *grad_cn.shape)
    memory = (w, grad_out, grad_hn, grad_cn, c0, gates, cells, grad_gates, dh, dc, carry, grad_h0, grad_c0)
    fused_step.run_loop(fused_step.library().fastlstm_backward_loop, memory, steps, batch, hidden, reverse, stats)
    if stats is not None:
        reduced = BackwardReductions(
            stats.hidden_nonfinite.bool(),
            stats.hidden_sumsq,
            stats.cell_nonfinite.bool(),
            stats.cell_sumsq,
            stats.gates_nonfinite.bool(),
        )
        record_backward_reduced(probe, grad_out, reduced, None, reverse)
    return BackwardResult(grad_gates, grad_h0, grad_c0, None, None)
