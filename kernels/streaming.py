"""Streaming recurrence kernels: one program per BLOCK_B sequences re-reads W_hh from memory every step.

They take every layer the resident kernels (single.py, forward.py / backward.py) cannot hold: a projection at a
hidden size past the single kernel's, hidden sizes whose W_hh share does not fit a split program's registers, and
grids too large for a cooperative launch. Each program owns BLOCK_B sequences and every unit, so at batch 16 one SM
does all the work and streams all of W_hh from L2 each step: correct everywhere, slow at large H and small B (the
performance model's table says how slow).

Forward: per step the four gate blocks of a BLOCK_H-unit tile are `h_{t-1} @ W_hhᵀ` (tl.dot over BLOCK_K chunks)
plus the precomputed input projection; h_t goes into the output, where the next step reads it back from; a
block-wide barrier between steps makes those writes visible to every warp of the program.

Backward: produces the gate pre-activation gradients of every step (the weight and input gradients are GEMMs over
them, done by the caller) and the gradients of h0 and c0. The carried gradients dL/dh and dL/dc live in the grad_h
and grad_c buffers themselves, which therefore hold their final values when the loop ends. Per step t (the
specification is reference.recurrence_backward):
  dh_t   = grad_out[t] + carried dh            (only with a projection: dh_full = dh_t @ W_hr, via dhfull scratch)
  dc_t   = carried dc + dh_full * o * (1 - tanh(c_t)^2)
  dgates = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dh_full*tanh(c_t)*o(1-o)], zero outside the sequence
  carried dh <- dgates @ W_hh, carried dc <- dc_t * f   (unchanged outside the sequence)

Restarts (fastlstm/reference.py): where restarts[t, b] is set inside sequence b, step t starts from h0/c0 instead of
the carried state, and backwards the gradient reaching that state goes to grad_h0/grad_c0 (accumulators the launcher
adds the carried gradients to after the loop) instead of the previous step, whose carried gradients restart at zero.

Layouts (all contiguous; storage dtype = fp32, fp16 or bf16; state and saved tensors in fp32):
  xw [T, B, 4H] · h0 [B, P] · c0 [B, H] · w_hh [4H, P] · w_hr [P, H] or None · lengths [B] int64 or None
  restarts [T, B] bool or None · grad_h0 [B, P], grad_c0 [B, H] fp32 zeros (backward, only with restarts)
  out [T, B, P] · gates [T, B, 4H] activated · cells [T, B, H] carried c_t · h_n [B, P] · c_n [B, H]
  hfull [B, H] fp32 scratch for o * tanh(c) before the projection (None without one)
  grad_out [T, B, P] · dgates [T, B, 4H] · grad_h [B, P], grad_c [B, H] · dhidden [T, B, P] and dhfull [B, H]
  (projection only)
"""

import triton
import triton.language as tl

from .cell import (
    GRAD_CELL_SUMSQ,
    GRAD_SUMSQ,
    NO_EVENT,
    STAGE_BACKWARD,
    STAGE_FORWARD,
    any_nonfinite,
    cell_backward,
    count_backward_pass,
    count_forward_launch,
    flush_first_nonfinite,
    flush_forward_stats,
    load_gate_tiles,
    note_nonfinite,
    program_sequences,
    send_to_initial,
    sigmoid,
    sigmoid_saturated,
    step_restarts,
    store_gate_tiles,
    tanh,
    tanh_saturated,
    tile_matmul,
)


@triton.jit
def _gate_dot(
    acc, h_prev, w_ptr, gate, units, unit_ok, ks, k_ok, H, P, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr
):
    """acc + h_prev @ W_hh[gate * H + units, ks]ᵀ for one gate block and one reduction chunk."""
    rows = (gate * H + units).to(tl.int64)
    w = tl.load(w_ptr + rows[None, :] * P + ks[:, None], mask=k_ok[:, None] & unit_ok[None, :], other=0.0)
    return tl.dot(h_prev, w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["stats_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["order", "T", "B"])
def lstm_streaming_forward_kernel(
    xw_ptr,
    h0_ptr,
    c0_ptr,
    w_hh_ptr,
    w_hr_ptr,
    lengths_ptr,
    restarts_ptr,
    out_ptr,
    gates_ptr,
    cells_ptr,
    hfull_ptr,
    hn_ptr,
    cn_ptr,
    stats_ptr,
    first_ptr,
    seq_ptr,
    order,
    T,
    B,
    H,
    P,
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_RESTARTS: tl.constexpr,
    TELEMETRY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    rows, row_ok, length = program_sequences(lengths_ptr, T, B, BLOCK_B, HAS_LENGTHS)

    if TELEMETRY:
        sat_i = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        sat_f = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        sat_g = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        sat_o = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        forget = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        absmax = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
        first = tl.full((BLOCK_B, BLOCK_H), NO_EVENT, tl.int32)

    for p in range(T):
        if REVERSE:
            t = T - 1 - p
            t_prev = t + 1
        else:
            t = p
            t_prev = t - 1
        active = row_ok & (t < length)
        # h_{t-1} is the previous output row while the sequence was already running, else h0; c_{t-1} the previous
        # step's carried c_t (which is c0 until a sequence starts). A restarted step takes h0 and c0.
        from_prev = row_ok & (p > 0) & (t_prev < length)
        if HAS_RESTARTS:
            restart = step_restarts(restarts_ptr, t, B, rows, active)
            from_prev = from_prev & ~restart
            c_from_prev = (row_ok & (p > 0) & ~restart)[:, None]
            c_from_c0 = ~c_from_prev
        else:
            c_from_prev = p > 0
            c_from_c0 = p == 0
        from_h0 = row_ok & ~from_prev
        row_step = t.to(tl.int64) * B + rows
        prev_row_step = t_prev.to(tl.int64) * B + rows
        code = p * 4

        for j0 in range(0, H, BLOCK_H):
            units = j0 + tl.arange(0, BLOCK_H)
            unit_ok = units < H
            tile_ok = row_ok[:, None] & unit_ok[None, :]
            acc_i = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            acc_f = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            acc_g = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            acc_o = tl.zeros((BLOCK_B, BLOCK_H), tl.float32)
            for k0 in range(0, P, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < P
                h_prev = tl.load(
                    out_ptr + prev_row_step[:, None] * P + ks[None, :],
                    mask=from_prev[:, None] & k_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                h_prev += tl.load(
                    h0_ptr + rows[:, None] * P + ks[None, :], mask=from_h0[:, None] & k_ok[None, :], other=0.0
                ).to(tl.float32)
                h_prev = h_prev.to(DOT_DTYPE)
                acc_i = _gate_dot(acc_i, h_prev, w_hh_ptr, 0, units, unit_ok, ks, k_ok, H, P, DOT_DTYPE, DOT_PRECISION)
                acc_f = _gate_dot(acc_f, h_prev, w_hh_ptr, 1, units, unit_ok, ks, k_ok, H, P, DOT_DTYPE, DOT_PRECISION)
                acc_g = _gate_dot(acc_g, h_prev, w_hh_ptr, 2, units, unit_ok, ks, k_ok, H, P, DOT_DTYPE, DOT_PRECISION)
                acc_o = _gate_dot(acc_o, h_prev, w_hh_ptr, 3, units, unit_ok, ks, k_ok, H, P, DOT_DTYPE, DOT_PRECISION)

            gate_tile = row_step[:, None] * (4 * H) + units[None, :]
            x_i, x_f, x_g, x_o = load_gate_tiles(xw_ptr + gate_tile, H, tile_ok)
            x_i, x_f, x_g, x_o = x_i.to(tl.float32), x_f.to(tl.float32), x_g.to(tl.float32), x_o.to(tl.float32)
            pre_i = acc_i + x_i
            pre_f = acc_f + x_f
            pre_g = acc_g + x_g
            pre_o = acc_o + x_o
            gate_i = sigmoid(pre_i)
            gate_f = sigmoid(pre_f)
            gate_g = tanh(pre_g)
            gate_o = sigmoid(pre_o)

            c_prev = tl.load(
                cells_ptr + prev_row_step[:, None] * H + units[None, :], mask=tile_ok & c_from_prev, other=0.0
            ) + tl.load(c0_ptr + rows[:, None] * H + units[None, :], mask=tile_ok & c_from_c0, other=0.0).to(tl.float32)
            c_new = gate_f * c_prev + gate_i * gate_g
            h_full = gate_o * tanh(c_new)
            keep = active[:, None]
            c_kept = tl.where(keep, c_new, c_prev)
            tl.store(cells_ptr + row_step[:, None] * H + units[None, :], c_kept, mask=tile_ok)
            store_gate_tiles(gates_ptr + gate_tile, H, gate_i, gate_f, gate_g, gate_o, tile_ok)
            if HAS_PROJ:
                tl.store(hfull_ptr + rows[:, None] * H + units[None, :], h_full, mask=tile_ok)
            else:
                h_out = tl.where(keep, h_full, 0.0)
                tl.store(
                    out_ptr + row_step[:, None] * P + units[None, :], h_out.to(out_ptr.dtype.element_ty), mask=tile_ok
                )

            if TELEMETRY:
                counted = keep & unit_ok[None, :]
                sat_i += sigmoid_saturated(gate_i, counted)
                sat_f += sigmoid_saturated(gate_f, counted)
                sat_g += tanh_saturated(gate_g, counted)
                sat_o += sigmoid_saturated(gate_o, counted)
                forget += tl.where(counted, gate_f, 0.0)
                absmax = tl.maximum(absmax, tl.where(counted, tl.abs(c_new), 0.0), propagate_nan=tl.PropagateNan.ALL)
                x_bad = any_nonfinite(x_i, x_f, x_g, x_o)
                pre_bad = any_nonfinite(pre_i, pre_f, pre_g, pre_o)
                first = tl.minimum(first, tl.where(counted & x_bad, code, NO_EVENT))
                first = tl.minimum(first, tl.where(counted & pre_bad, code + 1, NO_EVENT))
                first = note_nonfinite(first, c_new, counted, code + 2)
                if not HAS_PROJ:
                    first = note_nonfinite(first, h_full, counted, code + 3)
        tl.debug_barrier()

        if HAS_PROJ:
            # h_t = (o * tanh(c_t)) @ W_hrᵀ, once every unit of the step is in hfull.
            for q0 in range(0, P, BLOCK_H):
                outs = q0 + tl.arange(0, BLOCK_H)
                out_ok = outs < P
                acc = tile_matmul(
                    tl.zeros((BLOCK_B, BLOCK_H), tl.float32),
                    hfull_ptr,
                    rows,
                    row_ok,
                    H,
                    w_hr_ptr,
                    1,
                    H,
                    outs,
                    out_ok,
                    H,
                    BLOCK_K,
                    DOT_DTYPE,
                    DOT_PRECISION,
                )
                h_out = tl.where(active[:, None], acc, 0.0)
                tl.store(
                    out_ptr + row_step[:, None] * P + outs[None, :],
                    h_out.to(out_ptr.dtype.element_ty),
                    mask=row_ok[:, None] & out_ok[None, :],
                )
                if TELEMETRY:
                    first = note_nonfinite(first, acc, active[:, None] & out_ok[None, :], code + 3)
            tl.debug_barrier()

    # Final states: each sequence's last step in its own time order (t = length-1 forward, t = 0 reverse).
    if REVERSE:
        t_last = tl.zeros((BLOCK_B,), tl.int32)
    else:
        t_last = length - 1
    ran = row_ok & (length > 0)
    last_row_step = t_last.to(tl.int64) * B + rows
    for q0 in range(0, P, BLOCK_H):
        outs = q0 + tl.arange(0, BLOCK_H)
        out_ok = outs < P
        h_last = tl.load(
            out_ptr + last_row_step[:, None] * P + outs[None, :], mask=ran[:, None] & out_ok[None, :], other=0.0
        ).to(tl.float32)
        h_last += tl.load(
            h0_ptr + rows[:, None] * P + outs[None, :], mask=(row_ok & ~ran)[:, None] & out_ok[None, :], other=0.0
        ).to(tl.float32)
        tl.store(
            hn_ptr + rows[:, None] * P + outs[None, :],
            h_last.to(hn_ptr.dtype.element_ty),
            mask=row_ok[:, None] & out_ok[None, :],
        )
    for j0 in range(0, H, BLOCK_H):
        units = j0 + tl.arange(0, BLOCK_H)
        unit_ok = units < H
        c_last = tl.load(
            cells_ptr + last_row_step[:, None] * H + units[None, :], mask=ran[:, None] & unit_ok[None, :], other=0.0
        )
        c_last += tl.load(
            c0_ptr + rows[:, None] * H + units[None, :], mask=(row_ok & ~ran)[:, None] & unit_ok[None, :], other=0.0
        ).to(tl.float32)
        tl.store(
            cn_ptr + rows[:, None] * H + units[None, :],
            c_last.to(cn_ptr.dtype.element_ty),
            mask=row_ok[:, None] & unit_ok[None, :],
        )

    if TELEMETRY:
        elements = tl.sum(length, axis=0).to(tl.float64) * H
        flush_forward_stats(stats_ptr, sat_i, sat_f, sat_g, sat_o, forget, absmax, elements)
        count_forward_launch(stats_ptr)
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_FORWARD, not REVERSE)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["grad_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["capacity", "order", "T", "B"])
def lstm_streaming_backward_kernel(
    grad_out_ptr,
    c0_ptr,
    gates_ptr,
    cells_ptr,
    w_hh_ptr,
    w_hr_ptr,
    lengths_ptr,
    restarts_ptr,
    dgates_ptr,
    grad_h_ptr,
    grad_c_ptr,
    grad_h0_ptr,
    grad_c0_ptr,
    dhidden_ptr,
    dhfull_ptr,
    grad_ptr,
    capacity,
    first_ptr,
    seq_ptr,
    order,
    T,
    B,
    H,
    P,
    REVERSE: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_RESTARTS: tl.constexpr,
    TELEMETRY: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    rows, row_ok, length = program_sequences(lengths_ptr, T, B, BLOCK_B, HAS_LENGTHS)
    if TELEMETRY:
        first = tl.full((BLOCK_B, BLOCK_H), NO_EVENT, tl.int32)

    for p in range(T):
        # The forward visited t in increasing order unless REVERSE; undo that order.
        if REVERSE:
            t = p
            t_prev = t + 1
        else:
            t = T - 1 - p
            t_prev = t - 1
        active = row_ok & (t < length)
        has_prev = (t_prev >= 0) & (t_prev < T)
        if HAS_RESTARTS:
            restart = step_restarts(restarts_ptr, t, B, rows, active)
            has_prev = has_prev & ~restart[:, None]
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
                g_out = tl.load(grad_out_ptr + row_step[:, None] * P + outs[None, :], mask=counted, other=0.0).to(
                    tl.float32
                )
                carried = tl.load(grad_h_ptr + rows[:, None] * P + outs[None, :], mask=counted, other=0.0)
                dh = g_out + carried
                tl.store(
                    dhidden_ptr + row_step[:, None] * P + outs[None, :], dh, mask=row_ok[:, None] & out_ok[None, :]
                )
                if TELEMETRY:
                    sumsq += tl.sum(tl.sum(dh * dh, axis=1), axis=0)
                    first = note_nonfinite(first, g_out, counted, code)
                    first = note_nonfinite(first, dh, counted, code + 1)
            tl.debug_barrier()
            for j0 in range(0, H, BLOCK_H):
                units = j0 + tl.arange(0, BLOCK_H)
                unit_ok = units < H
                acc = tile_matmul(
                    tl.zeros((BLOCK_B, BLOCK_H), tl.float32),
                    dhidden_ptr,
                    row_step,
                    row_ok,
                    P,
                    w_hr_ptr,
                    H,
                    1,
                    units,
                    unit_ok,
                    P,
                    BLOCK_K,
                    DOT_DTYPE,
                    DOT_PRECISION,
                )
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
                g_out = tl.load(grad_out_ptr + row_step[:, None] * P + units[None, :], mask=counted, other=0.0).to(
                    tl.float32
                )
                dh_full = g_out + tl.load(grad_h_ptr + rows[:, None] * P + units[None, :], mask=counted, other=0.0)
                if TELEMETRY:
                    sumsq += tl.sum(tl.sum(dh_full * dh_full, axis=1), axis=0)
                    first = note_nonfinite(first, g_out, counted, code)
                    first = note_nonfinite(first, dh_full, counted, code + 1)
            gate_tile = row_step[:, None] * (4 * H) + units[None, :]
            gate_i, gate_f, gate_g, gate_o = load_gate_tiles(gates_ptr + gate_tile, H, tile_ok)
            c_t = tl.load(cells_ptr + row_step[:, None] * H + units[None, :], mask=tile_ok, other=0.0)
            c_prev = tl.load(
                cells_ptr + prev_row_step[:, None] * H + units[None, :], mask=tile_ok & has_prev, other=0.0
            )
            c_prev += tl.load(c0_ptr + rows[:, None] * H + units[None, :], mask=tile_ok & ~has_prev, other=0.0).to(
                tl.float32
            )
            dc_carried = tl.load(grad_c_ptr + rows[:, None] * H + units[None, :], mask=tile_ok, other=0.0)

            keep = active[:, None]
            dc, d_i, d_f, d_g, d_o = cell_backward(
                dh_full, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_prev, keep
            )
            store_gate_tiles(dgates_ptr + gate_tile, H, d_i, d_f, d_g, d_o, tile_ok)
            carried_c = tl.where(keep, dc * gate_f, dc_carried)
            if HAS_RESTARTS:
                carried_c = send_to_initial(
                    grad_c0_ptr, rows[:, None] * H + units[None, :], tile_ok, restart[:, None], carried_c
                )
            tl.store(grad_c_ptr + rows[:, None] * H + units[None, :], carried_c, mask=tile_ok)
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
                tl.zeros((BLOCK_B, BLOCK_H), tl.float32),
                dgates_ptr,
                row_step,
                row_ok,
                4 * H,
                w_hh_ptr,
                P,
                1,
                outs,
                out_ok,
                4 * H,
                BLOCK_K,
                DOT_DTYPE,
                DOT_PRECISION,
            )
            dh_tile = grad_h_ptr + rows[:, None] * P + outs[None, :]
            tile_ok = row_ok[:, None] & out_ok[None, :]
            carried = tl.where(active[:, None], acc, tl.load(dh_tile, mask=tile_ok, other=0.0))
            if HAS_RESTARTS:
                carried = send_to_initial(
                    grad_h0_ptr, rows[:, None] * P + outs[None, :], tile_ok, restart[:, None], carried
                )
            tl.store(dh_tile, carried, mask=tile_ok)
        tl.debug_barrier()

    if TELEMETRY:
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_BACKWARD, REVERSE)
        count_backward_pass(grad_ptr, capacity, T, BLOCK_H)
