"""One LSTM layer-direction in one program per batch tile, with all of W_hh (and W_hr) resident: small hidden sizes.

Each program owns BLOCK_B sequences and every unit. It loads W_hh once, before the time loop, as four per-gate
tensors held in registers as the B operand of the step's products (pre_gate[BB, H] = h_{t-1} @ W_gateᵀ), and
carries h_t, c_t (forward) or the carried dL/dh, dL/dc (backward) in registers from step to step: nothing on a
step's critical path touches memory. The per-step inputs (xw[t]; grad_out[t] and the saved gates backward) are
loaded one step ahead. Output tiles are batch-major ([BLOCK_B, units]): with a 16-sequence M and the units as N,
tl.dot gives every warp its own columns, so no warp computes (or stores registers for) another's work.

Restarts (fastlstm/reference.py): each step's flags are loaded one step ahead with its other inputs, and c0 stays
resident beside h0, so a restart costs two selects on the step's path. Backwards, what a restarted step sends to h0
and c0 is added into grad_h0 / grad_c0 (zeros from the launcher, which adds the carried gradients after the loop),
off the step's path and outside the registers: the fp32 backward with every switch on uses all 255 without them.

The time loops are `while` loops for the reason forward.py's docstring gives (the weights stay in registers).

Layouts as the reference (contiguous; storage dtype fp32, fp16 or bf16; saved tensors fp32), P = proj_size or H:
  forward:  xw [T, B, 4H] · h0 [B, P] · c0 [B, H] · w_hh [4H, P] · w_hr [P, H] or None · lengths [B] int64 or None
            · restarts [T, B] bool or None
            out [T, B, P] · gates [T, B, 4H] activated · cells [T, B, H] carried c_t · h_n [B, P] · c_n [B, H]
  backward: grad_out [T, B, P] · dgates [T, B, 4H] · grad_h [B, P], grad_c [B, H] (in: dL/dh_n, dL/dc_n; out:
            dL/dh0, dL/dc0) · dhidden [T, B, P] total dL/dh_t, only with a projection (for dW_hr) · restarts [T, B]
            bool or None · grad_h0 [B, P], grad_c0 [B, H] fp32 zeros, only with restarts
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
    finish_step_inputs,
    flush_first_code,
    flush_forward_stats,
    load_flags,
    load_gate_tiles,
    note_nonfinite,
    program_sequences,
    send_to_initial,
    sigmoid,
    sigmoid_saturated,
    step_time,
    store_gate_tiles,
    tanh,
    tanh_saturated,
)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["stats_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["order", "T", "B"])
def lstm_single_forward_kernel(
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
    BLOCK_B: tl.constexpr,
    H_PAD: tl.constexpr,
    P_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_RESTARTS: tl.constexpr,
    TELEMETRY: tl.constexpr,
):
    seqs, seq_ok, length = program_sequences(lengths_ptr, T, B, BLOCK_B, HAS_LENGTHS)
    units = tl.arange(0, H_PAD)
    outs = tl.arange(0, P_PAD)
    tile_ok = seq_ok[:, None] & (units < H)[None, :]  # [BLOCK_B, H_PAD]
    out_ok = seq_ok[:, None] & (outs < P)[None, :]  # [BLOCK_B, P_PAD]
    unit_tile = seqs[:, None] * H + units[None, :]
    out_tile = seqs[:, None] * P + outs[None, :]

    # Loaded once: W_gateᵀ [P_PAD, H_PAD] per gate (element [k, j] = W_hh[gate * H + j, k]), and W_hrᵀ.
    w_i = _load_transposed(w_hh_ptr, 0, H, P, outs, units).to(DOT_DTYPE)
    w_f = _load_transposed(w_hh_ptr, 1, H, P, outs, units).to(DOT_DTYPE)
    w_g = _load_transposed(w_hh_ptr, 2, H, P, outs, units).to(DOT_DTYPE)
    w_o = _load_transposed(w_hh_ptr, 3, H, P, outs, units).to(DOT_DTYPE)
    if HAS_PROJ:  # W_hrᵀ [H_PAD, P_PAD]: element [j, q] = W_hr[q, j]
        w_r = tl.load(
            w_hr_ptr + outs[None, :] * H + units[:, None], mask=(outs < P)[None, :] & (units < H)[:, None], other=0.0
        ).to(DOT_DTYPE)

    h0 = tl.load(h0_ptr + out_tile, mask=out_ok, other=0.0).to(tl.float32)
    h = h0  # the last h of each sequence so far (h0 until it starts)
    c = tl.load(c0_ptr + unit_tile, mask=tile_ok, other=0.0).to(tl.float32)
    first_t, _ = step_time(0, T, REVERSE)
    x_next = _load_inputs(xw_ptr, first_t, B, H, seqs, units, tile_ok)
    if HAS_RESTARTS:
        c0 = c
        restart_next = load_flags(restarts_ptr, first_t, B, seqs, seq_ok)
    if TELEMETRY:
        sat_i = tl.zeros((BLOCK_B, H_PAD), tl.float32)
        sat_f = tl.zeros((BLOCK_B, H_PAD), tl.float32)
        sat_g = tl.zeros((BLOCK_B, H_PAD), tl.float32)
        sat_o = tl.zeros((BLOCK_B, H_PAD), tl.float32)
        forget = tl.zeros((BLOCK_B, H_PAD), tl.float32)
        absmax = tl.zeros((BLOCK_B, H_PAD), tl.float32)
        first_units = tl.full((BLOCK_B, H_PAD), NO_EVENT, tl.int32)
        first_outs = tl.full((BLOCK_B, P_PAD), NO_EVENT, tl.int32)

    p = 0
    while p < T:  # the time loop
        t, t_prev = step_time(p, T, REVERSE)
        x_i, x_f, x_g, x_o = x_next
        next_t, _ = step_time(p + 1, T, REVERSE)
        x_next = _load_inputs(xw_ptr, next_t, B, H, seqs, units, tile_ok & (p + 1 < T))
        active = seq_ok & (t < length)
        keep = active[:, None]
        from_prev = (seq_ok & (p > 0) & (t_prev < length))[:, None]
        if HAS_RESTARTS:
            restart = (active & restart_next)[:, None]
            restart_next = load_flags(restarts_ptr, next_t, B, seqs, seq_ok & (p + 1 < T))
            from_prev = from_prev & ~restart
            c = tl.where(restart, c0, c)  # kept only inside the sequence, where a restart counts
        h_prev = tl.where(from_prev, h, h0).to(DOT_DTYPE)

        pre_i = tl.dot(h_prev, w_i, input_precision=DOT_PRECISION) + x_i.to(tl.float32)
        pre_f = tl.dot(h_prev, w_f, input_precision=DOT_PRECISION) + x_f.to(tl.float32)
        pre_g = tl.dot(h_prev, w_g, input_precision=DOT_PRECISION) + x_g.to(tl.float32)
        pre_o = tl.dot(h_prev, w_o, input_precision=DOT_PRECISION) + x_o.to(tl.float32)
        gate_i = sigmoid(pre_i)
        gate_f = sigmoid(pre_f)
        gate_g = tanh(pre_g)
        gate_o = sigmoid(pre_o)
        c_new = gate_f * c + gate_i * gate_g
        h_full = gate_o * tanh(c_new)
        if HAS_PROJ:
            h_new = tl.dot(h_full.to(DOT_DTYPE), w_r, input_precision=DOT_PRECISION)
        else:
            h_new = h_full
        c = tl.where(keep, c_new, c)
        h = tl.where(keep, h_new, h)

        row_step = tl.cast(t, tl.int64) * B + seqs
        tl.store(
            out_ptr + row_step[:, None] * P + outs[None, :],
            tl.where(keep, h_new, 0.0).to(out_ptr.dtype.element_ty),
            mask=out_ok,
        )
        store_gate_tiles(
            gates_ptr + row_step[:, None] * (4 * H) + units[None, :], H, gate_i, gate_f, gate_g, gate_o, tile_ok
        )
        tl.store(cells_ptr + row_step[:, None] * H + units[None, :], c, mask=tile_ok)

        if TELEMETRY:
            counted = keep & tile_ok
            code = p * 4
            sat_i += sigmoid_saturated(gate_i, counted)
            sat_f += sigmoid_saturated(gate_f, counted)
            sat_g += tanh_saturated(gate_g, counted)
            sat_o += sigmoid_saturated(gate_o, counted)
            forget += tl.where(counted, gate_f, 0.0)
            absmax = tl.maximum(absmax, tl.where(counted, tl.abs(c_new), 0.0), propagate_nan=tl.PropagateNan.ALL)
            first_units = tl.minimum(first_units, tl.where(counted & any_nonfinite(x_i, x_f, x_g, x_o), code, NO_EVENT))
            first_units = tl.minimum(
                first_units, tl.where(counted & any_nonfinite(pre_i, pre_f, pre_g, pre_o), code + 1, NO_EVENT)
            )
            first_units = note_nonfinite(first_units, c_new, counted, code + 2)
            first_outs = note_nonfinite(first_outs, h_new, keep & out_ok, code + 3)
        p += 1

    tl.store(hn_ptr + out_tile, h.to(hn_ptr.dtype.element_ty), mask=out_ok)
    tl.store(cn_ptr + unit_tile, c.to(cn_ptr.dtype.element_ty), mask=tile_ok)
    if TELEMETRY:
        elements = tl.sum(length, axis=0).to(tl.float64) * H
        flush_forward_stats(stats_ptr, sat_i, sat_f, sat_g, sat_o, forget, absmax, elements)
        count_forward_launch(stats_ptr)
        flush_first_code(first_ptr, seq_ptr, _earliest(first_units, first_outs), T, order, STAGE_FORWARD, not REVERSE)


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_PROJ": lambda args: args["w_hr_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["grad_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["capacity", "order", "T", "B"])
def lstm_single_backward_kernel(
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
    BLOCK_B: tl.constexpr,
    H_PAD: tl.constexpr,
    P_PAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_PROJ: tl.constexpr,
    HAS_RESTARTS: tl.constexpr,
    TELEMETRY: tl.constexpr,
):
    seqs, seq_ok, length = program_sequences(lengths_ptr, T, B, BLOCK_B, HAS_LENGTHS)
    units = tl.arange(0, H_PAD)
    outs = tl.arange(0, P_PAD)
    tile_ok = seq_ok[:, None] & (units < H)[None, :]
    out_ok = seq_ok[:, None] & (outs < P)[None, :]
    unit_tile = seqs[:, None] * H + units[None, :]
    out_tile = seqs[:, None] * P + outs[None, :]

    # Loaded once: W_gate [H_PAD, P_PAD] per gate (the carried dh is Σ_gates dgates_gate @ W_gate), and W_hr.
    w_i = _load_rows(w_hh_ptr, 0, H, P, units, outs).to(DOT_DTYPE)
    w_f = _load_rows(w_hh_ptr, 1, H, P, units, outs).to(DOT_DTYPE)
    w_g = _load_rows(w_hh_ptr, 2, H, P, units, outs).to(DOT_DTYPE)
    w_o = _load_rows(w_hh_ptr, 3, H, P, units, outs).to(DOT_DTYPE)
    if HAS_PROJ:  # W_hr [P_PAD, H_PAD]: dh_full = dh @ W_hr
        w_r = tl.load(
            w_hr_ptr + outs[:, None] * H + units[None, :], mask=(outs < P)[:, None] & (units < H)[None, :], other=0.0
        ).to(DOT_DTYPE)

    dh_carried = tl.load(grad_h_ptr + out_tile, mask=out_ok, other=0.0)
    dc_carried = tl.load(grad_c_ptr + unit_tile, mask=tile_ok, other=0.0)
    # Backward step q is the forward's processing step T - 1 - q; its c_{t-1} is the next step's c_t.
    t, _ = step_time(T - 1, T, REVERSE)
    c_t = tl.load(cells_ptr + (tl.cast(t, tl.int64) * B + seqs)[:, None] * H + units[None, :], mask=tile_ok, other=0.0)
    ahead = _load_step(
        grad_out_ptr,
        gates_ptr,
        cells_ptr,
        c0_ptr,
        T - 1,
        T,
        B,
        H,
        P,
        seqs,
        units,
        outs,
        tile_ok,
        out_ok,
        unit_tile,
        REVERSE,
    )
    if HAS_RESTARTS:  # c0: what a restarted step saw as c_{t-1}
        ahead = finish_step_inputs(ahead)  # see the loop
        c0 = tl.load(c0_ptr + unit_tile, mask=tile_ok, other=0.0).to(tl.float32)
        restart_ahead = load_flags(restarts_ptr, t, B, seqs, seq_ok)
    if TELEMETRY:
        first_units = tl.full((BLOCK_B, H_PAD), NO_EVENT, tl.int32)
        first_outs = tl.full((BLOCK_B, P_PAD), NO_EVENT, tl.int32)

    q = 0
    while q < T:  # the time loop, backwards through the forward's steps
        p = T - 1 - q
        t, _ = step_time(p, T, REVERSE)
        if HAS_RESTARTS:
            g_out, gate_i, gate_f, gate_g, gate_o, c_prev = ahead
        else:
            g_out, gate_i, gate_f, gate_g, gate_o, c_prev = finish_step_inputs(ahead)
        if HAS_RESTARTS:
            restart = (seq_ok & (t < length) & restart_ahead)[:, None]
            t_ahead, _ = step_time(p - 1, T, REVERSE)
            restart_ahead = load_flags(restarts_ptr, t_ahead, B, seqs, seq_ok & (q + 1 < T))
            c_before = tl.where(restart, c0, c_prev)
        else:
            c_before = c_prev
        if q + 1 < T:
            ahead = _load_step(
                grad_out_ptr,
                gates_ptr,
                cells_ptr,
                c0_ptr,
                p - 1,
                T,
                B,
                H,
                P,
                seqs,
                units,
                outs,
                tile_ok,
                out_ok,
                unit_tile,
                REVERSE,
            )
            if HAS_RESTARTS:  # finished at once (backward.py's _load_step says why)
                ahead = finish_step_inputs(ahead)
        active = seq_ok & (t < length)
        keep = active[:, None]
        row_step = tl.cast(t, tl.int64) * B + seqs

        dh = tl.where(keep, g_out + dh_carried, 0.0)
        if HAS_PROJ:
            tl.store(dhidden_ptr + row_step[:, None] * P + outs[None, :], dh, mask=out_ok)
            dh_full = tl.dot(dh.to(DOT_DTYPE), w_r, input_precision=DOT_PRECISION)
        else:
            dh_full = dh
        dc, dg_i, dg_f, dg_g, dg_o = cell_backward(
            dh_full, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_before, keep
        )
        store_gate_tiles(dgates_ptr + row_step[:, None] * (4 * H) + units[None, :], H, dg_i, dg_f, dg_g, dg_o, tile_ok)
        product = tl.dot(dg_i.to(DOT_DTYPE), w_i, input_precision=DOT_PRECISION)
        product = tl.dot(dg_f.to(DOT_DTYPE), w_f, product, input_precision=DOT_PRECISION)
        product = tl.dot(dg_g.to(DOT_DTYPE), w_g, product, input_precision=DOT_PRECISION)
        product = tl.dot(dg_o.to(DOT_DTYPE), w_o, product, input_precision=DOT_PRECISION)
        dh_carried = tl.where(keep, product, dh_carried)
        dc_carried = tl.where(keep, dc * gate_f, dc_carried)
        if HAS_RESTARTS:  # the state step t entered was h0, c0: their gradient, and nothing for step t - 1
            dh_carried = send_to_initial(grad_h0_ptr, out_tile, out_ok, restart, dh_carried)
            dc_carried = send_to_initial(grad_c0_ptr, unit_tile, tile_ok, restart, dc_carried)
        c_t = c_prev

        if TELEMETRY:
            code = q * 4
            counted_outs = keep & out_ok
            counted = keep & tile_ok
            sumsq = tl.sum(tl.sum(tl.where(counted_outs, dh * dh, 0.0), axis=1), axis=0)
            tl.atomic_add(grad_ptr + GRAD_SUMSQ * capacity + t, sumsq.to(tl.float64))
            cell_sumsq = tl.sum(tl.sum(tl.where(counted, dc * dc, 0.0), axis=1), axis=0)
            tl.atomic_add(grad_ptr + GRAD_CELL_SUMSQ * capacity + t, cell_sumsq.to(tl.float64))
            first_outs = note_nonfinite(first_outs, g_out, counted_outs, code)
            first_outs = note_nonfinite(first_outs, dh, counted_outs, code + 1)
            first_units = note_nonfinite(first_units, dc, counted, code + 2)
            first_units = tl.minimum(
                first_units, tl.where(counted & any_nonfinite(dg_i, dg_f, dg_g, dg_o), code + 3, NO_EVENT)
            )
        q += 1

    tl.store(grad_h_ptr + out_tile, dh_carried, mask=out_ok)
    tl.store(grad_c_ptr + unit_tile, dc_carried, mask=tile_ok)
    if TELEMETRY:
        flush_first_code(first_ptr, seq_ptr, _earliest(first_units, first_outs), T, order, STAGE_BACKWARD, REVERSE)
        count_backward_pass(grad_ptr, capacity, T, BLOCK_B)


@triton.jit
def _load_transposed(w_hh_ptr, gate: tl.constexpr, H, P, outs, units):
    """W_hh[gate * H + j, k] at [k, j]: [P_PAD, H_PAD], zero past P and H."""
    offsets = (gate * H + units[None, :]).to(tl.int64) * P + outs[:, None]
    return tl.load(w_hh_ptr + offsets, mask=(outs < P)[:, None] & (units < H)[None, :], other=0.0)


@triton.jit
def _load_rows(w_hh_ptr, gate: tl.constexpr, H, P, units, outs):
    """W_hh[gate * H + j, k] at [j, k]: [H_PAD, P_PAD], zero past H and P."""
    offsets = (gate * H + units[:, None]).to(tl.int64) * P + outs[None, :]
    return tl.load(w_hh_ptr + offsets, mask=(units < H)[:, None] & (outs < P)[None, :], other=0.0)


@triton.jit
def _load_inputs(xw_ptr, t, B, H, seqs, units, mask):
    """The four gate blocks of xw[t] for this program's sequences: [BLOCK_B, H_PAD] each, in the storage dtype."""
    row = (tl.cast(t, tl.int64) * B + seqs)[:, None] * (4 * H) + units[None, :]
    return load_gate_tiles(xw_ptr + row, H, mask)


@triton.jit
def _load_step(
    grad_out_ptr,
    gates_ptr,
    cells_ptr,
    c0_ptr,
    p,
    T,
    B,
    H,
    P,
    seqs,
    units,
    outs,
    tile_ok,
    out_ok,
    unit_tile,
    REVERSE: tl.constexpr,
):
    """What the forward's processing step p needs backwards: grad_out[t], its four gates and c_{t-1} (c0 first),
    returned as loaded, for cell.finish_step_inputs (backward.py's _load_step says why)."""
    t, t_prev = step_time(p, T, REVERSE)
    row = (tl.cast(t, tl.int64) * B + seqs)[:, None]
    g_out = tl.load(grad_out_ptr + row * P + outs[None, :], mask=out_ok, other=0.0)
    gate_i, gate_f, gate_g, gate_o = load_gate_tiles(gates_ptr + row * (4 * H) + units[None, :], H, tile_ok)
    has_prev = p > 0
    c_saved = tl.load(
        cells_ptr + (tl.cast(t_prev, tl.int64) * B + seqs)[:, None] * H + units[None, :],
        mask=tile_ok & has_prev,
        other=0.0,
    )
    c_initial = tl.load(c0_ptr + unit_tile, mask=tile_ok & ~has_prev, other=0.0)
    return g_out, gate_i, gate_f, gate_g, gate_o, c_saved, c_initial


@triton.jit
def _earliest(first_units, first_outs):
    return tl.minimum(
        tl.min(tl.reshape(first_units, (first_units.numel,)), axis=0),
        tl.min(tl.reshape(first_outs, (first_outs.numel,)), axis=0),
    )
