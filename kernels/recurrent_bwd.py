"""Backward recurrence of one LSTM layer-direction: walks the forward's steps in reverse inside one kernel.

Produces the gate pre-activation gradients of every step (the weight and input gradients are GEMMs over them,
done by the caller) and the gradients of h0 and c0. The carried gradients dL/dh and dL/dc live in the grad_h0 and
grad_c0 buffers themselves, which therefore hold their final values when the loop ends. As in the forward, each
program owns BLOCK_B sequences and every unit, with a block-wide barrier between the phases of a step.

Per step t (docs: reference.py's recurrence_backward, the specification):
  dh_t   = grad_out[t] + carried dh            (only with a projection: dh_full = dh_t @ W_hr, via dhfull scratch)
  dc_t   = carried dc + dh_full * o * (1 - tanh(c_t)^2)
  dgates = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dh_full*tanh(c_t)*o(1-o)], zero outside the sequence
  carried dh <- dgates @ W_hh, carried dc <- dc_t * f   (unchanged outside the sequence)
"""

import triton
import triton.language as tl

from .cell import (
    GRAD_CELL_SUMSQ,
    GRAD_SUMSQ,
    NO_EVENT,
    STAGE_BACKWARD,
    any_nonfinite,
    cell_backward,
    count_backward_pass,
    flush_first_nonfinite,
    load_gate_tiles,
    note_nonfinite,
    program_sequences,
    store_gate_tiles,
    tile_matmul,
)


@triton.jit
def lstm_backward_kernel(
    grad_out_ptr, c0_ptr, gates_ptr, cells_ptr, w_hh_ptr, w_hr_ptr, lengths_ptr,
    dgates_ptr, dh_ptr, dc_ptr, dhidden_ptr, dhfull_ptr,
    grad_ptr, capacity, first_ptr, seq_ptr, order,
    T, B, H, P,
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, HAS_PROJ: tl.constexpr, TELEMETRY: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    rows, row_ok, length = program_sequences(lengths_ptr, T, B, BLOCK_B, HAS_LENGTHS)
    if TELEMETRY:
        first = tl.full((BLOCK_B, BLOCK_H), NO_EVENT, tl.int32)

    for p in range(0, T):
        # The forward visited t in increasing order unless REVERSE; undo that order.
        if REVERSE:
            t = p
            t_prev = t + 1
        else:
            t = T - 1 - p
            t_prev = t - 1
        active = row_ok & (t < length)
        has_prev = (t_prev >= 0) & (t_prev < T)
        row_step = t.to(tl.int64) * B + rows
        prev_row_step = t_prev.to(tl.int64) * B + rows
        code = p * 4
        sumsq = 0.0
        cell_sumsq = 0.0

        if HAS_PROJ:
            # Phase A: dh_t over the P projected units, kept for dW_hr, then dh_full = dh_t @ W_hr.
            for q0 in range(0, P, BLOCK_H):
                outs = q0 + tl.arange(0, BLOCK_H)
                out_ok = outs < P
                counted = active[:, None] & out_ok[None, :]
                g_out = tl.load(grad_out_ptr + row_step[:, None] * P + outs[None, :], mask=counted, other=0.0).to(tl.float32)
                carried = tl.load(dh_ptr + rows[:, None] * P + outs[None, :], mask=counted, other=0.0)
                dh = g_out + carried
                tl.store(dhidden_ptr + row_step[:, None] * P + outs[None, :], dh, mask=row_ok[:, None] & out_ok[None, :])
                if TELEMETRY:
                    sumsq += tl.sum(tl.sum(dh * dh, axis=1), axis=0)
                    first = note_nonfinite(first, g_out, counted, code)
                    first = note_nonfinite(first, dh, counted, code + 1)
            tl.debug_barrier()
            for j0 in range(0, H, BLOCK_H):
                units = j0 + tl.arange(0, BLOCK_H)
                unit_ok = units < H
                acc = tile_matmul(
                    tl.zeros((BLOCK_B, BLOCK_H), tl.float32), dhidden_ptr, row_step, row_ok, P,
                    w_hr_ptr, H, 1, units, unit_ok, P, BLOCK_K, DOT_DTYPE, DOT_PRECISION,
                )  # fmt: skip
                tl.store(dhfull_ptr + rows[:, None] * H + units[None, :], acc, mask=row_ok[:, None] & unit_ok[None, :])
            tl.debug_barrier()

        # Phase B: gate gradients of each unit tile, and the carried dc.
        for j0 in range(0, H, BLOCK_H):
            units = j0 + tl.arange(0, BLOCK_H)
            unit_ok = units < H
            tile_ok = row_ok[:, None] & unit_ok[None, :]
            counted = active[:, None] & unit_ok[None, :]
            if HAS_PROJ:
                dh_full = tl.load(dhfull_ptr + rows[:, None] * H + units[None, :], mask=counted, other=0.0)
            else:
                g_out = tl.load(grad_out_ptr + row_step[:, None] * P + units[None, :], mask=counted, other=0.0).to(tl.float32)
                dh_full = g_out + tl.load(dh_ptr + rows[:, None] * P + units[None, :], mask=counted, other=0.0)
                if TELEMETRY:
                    sumsq += tl.sum(tl.sum(dh_full * dh_full, axis=1), axis=0)
                    first = note_nonfinite(first, g_out, counted, code)
                    first = note_nonfinite(first, dh_full, counted, code + 1)
            gate_tile = row_step[:, None] * (4 * H) + units[None, :]
            gate_i, gate_f, gate_g, gate_o = load_gate_tiles(gates_ptr + gate_tile, H, tile_ok)
            c_t = tl.load(cells_ptr + row_step[:, None] * H + units[None, :], mask=tile_ok, other=0.0)
            c_prev = tl.load(cells_ptr + prev_row_step[:, None] * H + units[None, :], mask=tile_ok & has_prev, other=0.0)
            c_prev += tl.load(c0_ptr + rows[:, None] * H + units[None, :], mask=tile_ok & ~has_prev, other=0.0).to(tl.float32)
            dc_carried = tl.load(dc_ptr + rows[:, None] * H + units[None, :], mask=tile_ok, other=0.0)

            keep = active[:, None]
            dc, d_i, d_f, d_g, d_o = cell_backward(dh_full, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_prev, keep)
            store_gate_tiles(dgates_ptr + gate_tile, H, d_i, d_f, d_g, d_o, tile_ok)
            tl.store(dc_ptr + rows[:, None] * H + units[None, :], tl.where(keep, dc * gate_f, dc_carried), mask=tile_ok)
            if TELEMETRY:
                cell_sumsq += tl.sum(tl.sum(tl.where(counted, dc * dc, 0.0), axis=1), axis=0)
                first = note_nonfinite(first, dc, counted, code + 2)
                d_bad = any_nonfinite(d_i, d_f, d_g, d_o)
                first = tl.minimum(first, tl.where(counted & d_bad, code + 3, NO_EVENT))
        if TELEMETRY:
            tl.atomic_add(grad_ptr + GRAD_SUMSQ * capacity + t, sumsq.to(tl.float64))
            tl.atomic_add(grad_ptr + GRAD_CELL_SUMSQ * capacity + t, cell_sumsq.to(tl.float64))
        tl.debug_barrier()

        # Phase C: carried dh <- dgates_t @ W_hh (K = 4H), for the sequences still running.
        for q0 in range(0, P, BLOCK_H):
            outs = q0 + tl.arange(0, BLOCK_H)
            out_ok = outs < P
            acc = tile_matmul(
                tl.zeros((BLOCK_B, BLOCK_H), tl.float32), dgates_ptr, row_step, row_ok, 4 * H,
                w_hh_ptr, P, 1, outs, out_ok, 4 * H, BLOCK_K, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
            dh_tile = dh_ptr + rows[:, None] * P + outs[None, :]
            tile_ok = row_ok[:, None] & out_ok[None, :]
            carried = tl.load(dh_tile, mask=tile_ok, other=0.0)
            tl.store(dh_tile, tl.where(active[:, None], acc, carried), mask=tile_ok)
        tl.debug_barrier()

    if TELEMETRY:
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_BACKWARD, REVERSE)
        count_backward_pass(grad_ptr, capacity, T, BLOCK_H)
