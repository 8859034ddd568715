"""Persistent recurrence of one LSTM layer-direction for large hidden sizes at small batch.

The single-program kernels (recurrent_fwd/recurrent_bwd) give each program whole sequences, so at batch 16 one SM
does all the work and re-reads W_hh every step. Here the hidden units are split instead: program u owns units [u *
BLOCK_U, (u + 1) * BLOCK_U) of every sequence, only ever reads the matching slice of W_hh, and exchanges h_t
(forward) or dgates_t (backward) with the other programs through global memory, with one grid barrier per step
(sync.py). The launcher starts no more programs than the device has SMs, so all are resident together.

The slice is re-read every step in BLOCK_K chunks with an evict-last hint. Only this SM reads it and the kernel uses
almost no shared memory, so the slice (4 * BLOCK_U * H elements: 128 KiB at H=1024 in bf16) can stay in the SM's L1
instead of crossing to L2 each step (the intent; not yet measured on a GPU). The exchanged activations are read with
".cg", past L1, so they never come back stale and do not evict the slice. Holding the slice in registers instead, as
one loop-invariant tl.dot operand, spilled in every configuration the AOT compile tried (triton 3.6 keeps it in
registers and copies it to shared memory each step), and triton has no way to pin it in shared memory.

PERSISTENT runs steps step_begin..step_end-1 in one launch with the barrier between them. Without it the kernel is
host-stepped: the launcher starts it once per step, the backward once per phase of a step (the kernel boundary is
the barrier), so the same step code runs under the interpreter, which cannot run a spin-wait. Telemetry is flushed at the end of every launch either way.

No projection (proj_size = 0, so P = H): the launcher sends projected layers to the single-program kernels. Layouts
as in recurrent_fwd.py / recurrent_bwd.py.
"""

import triton
import triton.language as tl

from .cell import (
    GRAD_CELL_SUMSQ,
    GRAD_SUMSQ,
    NO_EVENT,
    STAGE_BACKWARD,
    STAGE_FORWARD,
    cell_backward,
    count_backward_pass,
    count_forward_launch,
    flush_first_code,
    flush_forward_stats,
    load_gate_tiles,
    nonfinite,
    sigmoid,
    sigmoid_saturated,
    store_gate_tiles,
    tanh,
    tanh_saturated,
    tile_sequences,
)
from .sync import grid_barrier


@triton.jit
def step_time(p, T, REVERSE: tl.constexpr):
    """Timestep of processing step p and the step before it in the same pass's order."""
    if REVERSE:
        return T - 1 - p, T - p
    return p, p - 1


@triton.jit
def take_gate(tile, gate: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr):
    """Columns gate*BLOCK_U .. gate*BLOCK_U+BLOCK_U-1 of a gate-major [BLOCK_B, 4*BLOCK_U] tile."""
    blocks = tl.reshape(tile, (BLOCK_B, 4, BLOCK_U))
    which = tl.arange(0, 4)[None, :, None] == gate
    return tl.sum(tl.where(which, blocks, 0.0), axis=1)


@triton.jit
def steps_active(length, step_begin, step_end, T, REVERSE: tl.constexpr):
    """How many of the processing steps step_begin..step_end-1 fall inside each sequence."""
    if REVERSE:  # t = T-1-p < length  <=>  p >= T - length
        return tl.maximum(step_end - tl.maximum(step_begin, T - length), 0)
    return tl.maximum(tl.minimum(step_end, length) - step_begin, 0)


@triton.jit
def recurrent_gate_product(
    out_ptr, h0_ptr, prev_row_step, rows, row_ok, from_prev, w_hh_ptr, w_rows, col_ok, P,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """h_{t-1} @ W_hh[w_rows]ᵀ for one tile of sequences: [BLOCK_B, 4*BLOCK_U] in fp32.

    h_{t-1} is the previous output row of a sequence already running, else its h0: one pointer per row, so each
    chunk is a single load feeding tl.dot, which triton can software-pipeline. The output rows were written by other
    programs, hence ".cg" (past L1, which is not coherent across SMs); the W_hh slice is this program's alone."""
    h_rows = tl.where(from_prev, out_ptr + prev_row_step * P, h0_ptr + rows * P)
    acc = tl.zeros((BLOCK_B, 4 * BLOCK_U), tl.float32)
    for k0 in range(0, P, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < P
        h = tl.load(
            h_rows[:, None] + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg"
        )
        w_offsets = w_rows[None, :].to(tl.int64) * P + ks[:, None]
        w = tl.load(w_hh_ptr + w_offsets, mask=k_ok[:, None] & col_ok[None, :], other=0.0, eviction_policy="evict_last")
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def lstm_persistent_forward_kernel(
    xw_ptr, h0_ptr, c0_ptr, w_hh_ptr, lengths_ptr,
    out_ptr, gates_ptr, cells_ptr, hn_ptr, cn_ptr,
    stats_ptr, first_ptr, seq_ptr, order, barrier_ptr,
    step_begin, step_end, T, B, H,
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, TELEMETRY: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    P = H
    # Gate-major columns of this program: 4 gates x BLOCK_U units, and the W_hh / gates row of each.
    cols = tl.arange(0, 4 * BLOCK_U)
    col_gate = cols // BLOCK_U
    col_unit = tl.program_id(0) * BLOCK_U + cols % BLOCK_U
    col_ok = col_unit < H
    w_rows = col_gate * H + col_unit
    is_candidate = (col_gate == 2)[None, :]  # the tanh gate g; the others are sigmoids
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = units < H

    if TELEMETRY:
        saturated = tl.zeros((BLOCK_B, 4 * BLOCK_U), tl.float32)
        forget = tl.zeros((BLOCK_B, BLOCK_U), tl.float32)
        absmax = tl.zeros((BLOCK_B, BLOCK_U), tl.float32)
        first_gates = tl.full((BLOCK_B, 4 * BLOCK_U), NO_EVENT, tl.int32)
        first_units = tl.full((BLOCK_B, BLOCK_U), NO_EVENT, tl.int32)

    for p in range(step_begin, step_end):
        t, t_prev = step_time(p, T, REVERSE)
        code = p * 4
        for b0 in range(0, B, BLOCK_B):
            rows, row_ok, length = tile_sequences(lengths_ptr, b0, T, B, BLOCK_B, HAS_LENGTHS)
            active = row_ok & (t < length)
            from_prev = row_ok & (p > 0) & (t_prev < length)
            row_step = tl.cast(t, tl.int64) * B + rows
            prev_row_step = tl.cast(t_prev, tl.int64) * B + rows

            acc = recurrent_gate_product(
                out_ptr, h0_ptr, prev_row_step, rows, row_ok, from_prev, w_hh_ptr, w_rows, col_ok, P,
                BLOCK_B, BLOCK_U, BLOCK_K, DOT_DTYPE, DOT_PRECISION,
            )  # fmt: skip
            gate_tile_ok = row_ok[:, None] & col_ok[None, :]
            x = tl.load(xw_ptr + row_step[:, None] * (4 * H) + w_rows[None, :], mask=gate_tile_ok, other=0.0)
            x = x.to(tl.float32)
            pre = acc + x
            act = tl.where(is_candidate, tanh(pre), sigmoid(pre))
            tl.store(gates_ptr + row_step[:, None] * (4 * H) + w_rows[None, :], act, mask=gate_tile_ok)
            gate_i = take_gate(act, 0, BLOCK_B, BLOCK_U)
            gate_f = take_gate(act, 1, BLOCK_B, BLOCK_U)
            gate_g = take_gate(act, 2, BLOCK_B, BLOCK_U)
            gate_o = take_gate(act, 3, BLOCK_B, BLOCK_U)

            tile_ok = row_ok[:, None] & unit_ok[None, :]
            c_prev = tl.load(cells_ptr + prev_row_step[:, None] * H + units[None, :], mask=tile_ok & (p > 0), other=0.0)
            c_prev += tl.load(c0_ptr + rows[:, None] * H + units[None, :], mask=tile_ok & (p == 0), other=0.0).to(
                tl.float32
            )
            c_new = gate_f * c_prev + gate_i * gate_g
            h_full = gate_o * tanh(c_new)
            keep = active[:, None]
            tl.store(cells_ptr + row_step[:, None] * H + units[None, :], tl.where(keep, c_new, c_prev), mask=tile_ok)
            h_out = tl.where(keep, h_full, 0.0).to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + row_step[:, None] * P + units[None, :], h_out, mask=tile_ok)

            if TELEMETRY:
                counted = keep & unit_ok[None, :]
                counted_gates = keep & col_ok[None, :]
                saturated += tl.where(
                    is_candidate, tanh_saturated(act, counted_gates), sigmoid_saturated(act, counted_gates)
                )
                forget += tl.where(counted, gate_f, 0.0)
                absmax = tl.maximum(absmax, tl.where(counted, tl.abs(c_new), 0.0), propagate_nan=tl.PropagateNan.ALL)
                first_gates = tl.minimum(first_gates, tl.where(counted_gates & nonfinite(x), code, NO_EVENT))
                first_gates = tl.minimum(first_gates, tl.where(counted_gates & nonfinite(pre), code + 1, NO_EVENT))
                first_units = tl.minimum(first_units, tl.where(counted & nonfinite(c_new), code + 2, NO_EVENT))
                first_units = tl.minimum(first_units, tl.where(counted & nonfinite(h_full), code + 3, NO_EVENT))
        if PERSISTENT:
            grid_barrier(barrier_ptr, tl.num_programs(0) * (p - step_begin + 1))
        else:
            tl.debug_barrier()

    if step_end == T:
        write_final_state(out_ptr, h0_ptr, cells_ptr, c0_ptr, hn_ptr, cn_ptr, lengths_ptr, units, unit_ok, T, B, H,
                          REVERSE, HAS_LENGTHS, BLOCK_B)  # fmt: skip

    if TELEMETRY:
        elements = tl.zeros((), tl.float64)  # exact counts past 2**24, unlike float32
        for b0 in range(0, B, BLOCK_B):
            rows, row_ok, length = tile_sequences(lengths_ptr, b0, T, B, BLOCK_B, HAS_LENGTHS)
            ran = tl.where(row_ok, steps_active(length, step_begin, step_end, T, REVERSE), 0)
            elements += tl.sum(ran, axis=0).to(tl.float64)
        elements *= tl.sum(unit_ok.to(tl.int32), axis=0).to(tl.float64)
        sat_i = take_gate(saturated, 0, BLOCK_B, BLOCK_U)
        sat_f = take_gate(saturated, 1, BLOCK_B, BLOCK_U)
        sat_g = take_gate(saturated, 2, BLOCK_B, BLOCK_U)
        sat_o = take_gate(saturated, 3, BLOCK_B, BLOCK_U)
        flush_forward_stats(stats_ptr, sat_i, sat_f, sat_g, sat_o, forget, absmax, elements)
        if step_begin == 0:
            count_forward_launch(stats_ptr)
        earliest = tl.minimum(
            tl.min(tl.reshape(first_gates, (first_gates.numel,)), axis=0),
            tl.min(tl.reshape(first_units, (first_units.numel,)), axis=0),
        )
        flush_first_code(first_ptr, seq_ptr, earliest, T, order, STAGE_FORWARD, not REVERSE)


@triton.jit
def write_final_state(
    out_ptr, h0_ptr, cells_ptr, c0_ptr, hn_ptr, cn_ptr, lengths_ptr, units, unit_ok, T, B, H,
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    """h_n and c_n of this program's units: each sequence's last step in its own time order, or h0/c0 if empty."""
    for b0 in range(0, B, BLOCK_B):
        rows, row_ok, length = tile_sequences(lengths_ptr, b0, T, B, BLOCK_B, HAS_LENGTHS)
        if REVERSE:
            t_last = tl.zeros((BLOCK_B,), tl.int32)
        else:
            t_last = length - 1
        ran = (row_ok & (length > 0))[:, None] & unit_ok[None, :]
        empty = (row_ok & (length == 0))[:, None] & unit_ok[None, :]
        last = (t_last.to(tl.int64) * B + rows)[:, None] * H + units[None, :]
        state = rows[:, None] * H + units[None, :]
        h_last = tl.load(out_ptr + last, mask=ran, other=0.0).to(tl.float32)
        h_last += tl.load(h0_ptr + state, mask=empty, other=0.0).to(tl.float32)
        c_last = tl.load(cells_ptr + last, mask=ran, other=0.0)
        c_last += tl.load(c0_ptr + state, mask=empty, other=0.0).to(tl.float32)
        tile_ok = row_ok[:, None] & unit_ok[None, :]
        tl.store(hn_ptr + state, h_last.to(hn_ptr.dtype.element_ty), mask=tile_ok)
        tl.store(cn_ptr + state, c_last.to(cn_ptr.dtype.element_ty), mask=tile_ok)


@triton.jit
def gate_grad_product(
    acc, dgates_ptr, gate: tl.constexpr, row_step, row_ok, w_hh_ptr, units, unit_ok, H,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """acc + dgates_t[:, gate block] @ W_hh[gate block, units]: one gate's share of the carried dh."""
    block_ptr = dgates_ptr + gate * H
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        d = tl.load(
            block_ptr + row_step[:, None] * (4 * H) + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
            other=0.0, cache_modifier=".cg",
        )  # fmt: skip
        offsets = (gate * H + ks)[:, None].to(tl.int64) * H + units[None, :]
        w = tl.load(w_hh_ptr + offsets, mask=k_ok[:, None] & unit_ok[None, :], other=0.0, eviction_policy="evict_last")
        acc = tl.dot(d.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def lstm_persistent_backward_kernel(
    grad_out_ptr, c0_ptr, gates_ptr, cells_ptr, w_hh_ptr, lengths_ptr,
    dgates_ptr, dh_ptr, dc_ptr,
    grad_ptr, capacity, first_ptr, seq_ptr, order, barrier_ptr,
    step_begin, step_end, T, B, H, phases,
    REVERSE: tl.constexpr, HAS_LENGTHS: tl.constexpr, TELEMETRY: tl.constexpr, PERSISTENT: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):  # fmt: skip
    # Program u owns dgates columns gate*H + units for each gate, and the carried dh and dc of those units.
    # A step has two phases with the grid barrier between them: the gate gradients (phases & 1), then the carried
    # dh from every program's gate gradients (phases & 2). Host-stepped launches run one phase at a time.
    units = tl.program_id(0) * BLOCK_U + tl.arange(0, BLOCK_U)
    unit_ok = units < H
    if TELEMETRY:
        first = tl.full((BLOCK_B, BLOCK_U), NO_EVENT, tl.int32)

    for p in range(step_begin, step_end):
        # Undo the forward's time order; t_prev is the step before t in that order (whose c_t is c_{t-1}).
        t, t_prev = step_time(T - 1 - p, T, REVERSE)
        has_prev = (t_prev >= 0) & (t_prev < T)
        code = p * 4
        if phases & 1:
            sumsq = 0.0
            cell_sumsq = 0.0
            # Gate gradients of this program's units (recurrent_bwd.py's phase B, on a unit slice).
            for b0 in range(0, B, BLOCK_B):
                rows, row_ok, length = tile_sequences(lengths_ptr, b0, T, B, BLOCK_B, HAS_LENGTHS)
                active = row_ok & (t < length)
                row_step = tl.cast(t, tl.int64) * B + rows
                prev_row_step = tl.cast(t_prev, tl.int64) * B + rows
                tile_ok = row_ok[:, None] & unit_ok[None, :]
                counted = active[:, None] & unit_ok[None, :]
                state = rows[:, None] * H + units[None, :]
                g_out = tl.load(grad_out_ptr + row_step[:, None] * H + units[None, :], mask=counted, other=0.0)
                g_out = g_out.to(tl.float32)
                dh = g_out + tl.load(dh_ptr + state, mask=counted, other=0.0)
                gate_tile = row_step[:, None] * (4 * H) + units[None, :]
                gate_i, gate_f, gate_g, gate_o = load_gate_tiles(gates_ptr + gate_tile, H, tile_ok)
                c_t = tl.load(cells_ptr + row_step[:, None] * H + units[None, :], mask=tile_ok, other=0.0)
                c_prev = tl.load(
                    cells_ptr + prev_row_step[:, None] * H + units[None, :], mask=tile_ok & has_prev, other=0.0
                )
                c_prev += tl.load(c0_ptr + state, mask=tile_ok & ~has_prev, other=0.0).to(tl.float32)
                dc_carried = tl.load(dc_ptr + state, mask=tile_ok, other=0.0)

                keep = active[:, None]
                dc, d_i, d_f, d_g, d_o = cell_backward(
                    dh, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_prev, keep
                )
                store_gate_tiles(dgates_ptr + gate_tile, H, d_i, d_f, d_g, d_o, tile_ok)
                tl.store(dc_ptr + state, tl.where(keep, dc * gate_f, dc_carried), mask=tile_ok)
                if TELEMETRY:
                    sumsq += tl.sum(tl.sum(dh * dh, axis=1), axis=0)
                    cell_sumsq += tl.sum(tl.sum(tl.where(counted, dc * dc, 0.0), axis=1), axis=0)
                    first = tl.minimum(first, tl.where(counted & nonfinite(g_out), code, NO_EVENT))
                    first = tl.minimum(first, tl.where(counted & nonfinite(dh), code + 1, NO_EVENT))
                    first = tl.minimum(first, tl.where(counted & nonfinite(dc), code + 2, NO_EVENT))
                    d_bad = nonfinite(d_i) | nonfinite(d_f) | nonfinite(d_g) | nonfinite(d_o)
                    first = tl.minimum(first, tl.where(counted & d_bad, code + 3, NO_EVENT))
            if TELEMETRY:
                tl.atomic_add(grad_ptr + GRAD_SUMSQ * capacity + t, sumsq.to(tl.float64))
                tl.atomic_add(grad_ptr + GRAD_CELL_SUMSQ * capacity + t, cell_sumsq.to(tl.float64))
        if PERSISTENT:
            grid_barrier(barrier_ptr, tl.num_programs(0) * (p - step_begin + 1))
        else:
            tl.debug_barrier()

        if phases & 2:
            # Carried dh of this program's units from every program's dgates_t (phase C, K = 4H in four gate blocks).
            for b0 in range(0, B, BLOCK_B):
                rows, row_ok, length = tile_sequences(lengths_ptr, b0, T, B, BLOCK_B, HAS_LENGTHS)
                active = row_ok & (t < length)
                row_step = tl.cast(t, tl.int64) * B + rows
                acc = tl.zeros((BLOCK_B, BLOCK_U), tl.float32)
                acc = gate_grad_product(acc, dgates_ptr, 0, row_step, row_ok, w_hh_ptr, units, unit_ok, H,
                                        BLOCK_K, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
                acc = gate_grad_product(acc, dgates_ptr, 1, row_step, row_ok, w_hh_ptr, units, unit_ok, H,
                                        BLOCK_K, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
                acc = gate_grad_product(acc, dgates_ptr, 2, row_step, row_ok, w_hh_ptr, units, unit_ok, H,
                                        BLOCK_K, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
                acc = gate_grad_product(acc, dgates_ptr, 3, row_step, row_ok, w_hh_ptr, units, unit_ok, H,
                                        BLOCK_K, DOT_DTYPE, DOT_PRECISION)  # fmt: skip
                state = rows[:, None] * H + units[None, :]
                tile_ok = row_ok[:, None] & unit_ok[None, :]
                carried = tl.load(dh_ptr + state, mask=tile_ok, other=0.0)
                tl.store(dh_ptr + state, tl.where(active[:, None], acc, carried), mask=tile_ok)
        tl.debug_barrier()  # the next step's phase B reads dh in another thread layout

    if TELEMETRY:
        earliest = tl.min(tl.reshape(first, (first.numel,)), axis=0)
        flush_first_code(first_ptr, seq_ptr, earliest, T, order, STAGE_BACKWARD, REVERSE)
        if (step_begin == 0) & (phases & 1 != 0):
            count_backward_pass(grad_ptr, capacity, T, BLOCK_B)
