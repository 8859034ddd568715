"""Backward recurrence of one LSTM layer-direction with the weights held on chip: the forward's steps in reverse.

Program (u, b) owns units [u*UNITS, (u+1)*UNITS) of the sequences [b*BLOCK_B, (b+1)*BLOCK_B). Per step t (walking
the forward's order backwards) it needs the carried dL/dh of its units, which is the previous backward step's gate
gradients of every unit times W_hh's columns of its units: dh[BB, U] = dgates_{t'} @ W_hh[:, units], t' the step
after t. So each program holds those W_hh columns (4H x UNITS, loaded once, in registers: one [K_SPLIT, KC, UNITS]
tensor per gate, the reduction over a gate's H rows split across warps as in forward.py) and the gate gradients
are exchanged between programs every step, in the storage dtype (16 bits when the storage is), through a double-
buffered exchange buffer and exchange.py's flags. (Hidden sizes whose whole W_hh fits one program run single.py.)

Tiles are batch-major ([BLOCK_B, UNITS]): the 16 sequences are the product's M and 8 units one whole N tile, where
the transposed product would pad 8 units to a 16-row M tile and double every tile's registers.

Per step t, from the specification (reference.recurrence_backward):
  dh      = grad_out[t] + carried dh
  dc      = carried dc + dh * o * (1 - tanh(c_t)^2)
  dgates  = [dc*g*i(1-i), dc*c_{t-1}*f(1-f), dc*i*(1-g^2), dh*tanh(c_t)*o(1-o)]   (zero outside the sequence)
  carried dh <- dgates @ W_hh, carried dc <- dc * f                              (unchanged outside the sequence)
The saved gates and cells of step t and grad_out[t] are loaded one step ahead; the carried gradients stay in
registers (host-stepped launches hand them over through grad_h / grad_c, which also return dL/dh0 and dL/dc0).
Per-step squared gradient norms (of dL/dh_t and dL/dc_t) leave each program as two floats per step in `partials`
(the launcher adds them up once after the launch); the first non-finite codes leave it as one atomic after the loop.

Restarts (fastlstm/reference.py): the flags of step t are loaded a step ahead; a restarted step's c_{t-1} is c0
(resident), and what reaches its entering state (the next backward step's product, and dc * f) is gathered in
registers for h0 and c0 instead of being carried to the step before, whose carried gradients restart from zero. A
launch adds what it gathered to grad_h0 / grad_c0 (zeros from the launcher, which adds them to grad_h / grad_c once
the pass is over), so host-stepped launches and batch slices need nothing else.

Layouts: grad_out [T, B, H] · gates [T, B, 4H] fp32 · cells [T, B, H] fp32 · c0 [B, H] · w_hh [4H, H]
  restarts [T, B] bool or None · grad_h0, grad_c0 [B, H] fp32 (only with restarts)
  dgates [T, B, 4H] fp32 · grad_h, grad_c [B, H] fp32 (in: dL/dh_n, dL/dc_n; out: dL/dh0, dL/dc0)
  exchange [2, B, 4H] storage dtype · partials [programs, T] fp32
"""

import triton
import triton.language as tl

from .cell import (
    NO_EVENT,
    STAGE_BACKWARD,
    any_nonfinite,
    cell_backward,
    count_backward_pass,
    finish_step_inputs,
    flush_first_nonfinite,
    load_flags,
    load_gate_tiles,
    note_nonfinite,
    step_time,
    store_gate_tiles,
    tile_sequences,
)
from .exchange import publish, wait_for


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["grad_ptr"] is not None,
        "EXCHANGE": lambda args: args["flags_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["capacity", "order", "batch_group_base", "step_begin", "step_end", "T", "B"])
def lstm_split_backward_kernel(
    grad_out_ptr,
    c0_ptr,
    gates_ptr,
    cells_ptr,
    w_hh_ptr,
    lengths_ptr,
    restarts_ptr,
    dgates_ptr,
    grad_h_ptr,
    grad_c_ptr,
    grad_h0_ptr,
    grad_c0_ptr,
    exchange_ptr,
    partials_ptr,
    grad_ptr,
    capacity,
    first_ptr,
    seq_ptr,
    order,
    flags_ptr,
    batch_group_base,
    step_begin,
    step_end,
    T,
    B,
    H,
    REVERSE: tl.constexpr,
    UNITS: tl.constexpr,
    BLOCK_B: tl.constexpr,
    K_PAD: tl.constexpr,
    K_SPLIT: tl.constexpr,
    MAX_PROGRAMS: tl.constexpr,
    ASM_FENCE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_LENGTHS: tl.constexpr,
    HAS_RESTARTS: tl.constexpr,
    TELEMETRY: tl.constexpr,
    EXCHANGE: tl.constexpr,
):
    unit_group = tl.program_id(0)
    batch_group = batch_group_base + tl.program_id(1)  # the launcher may run the batch groups in slices
    unit_groups = tl.num_programs(0)
    program = batch_group * unit_groups + unit_group
    num_programs = unit_groups * tl.cdiv(B, BLOCK_B)  # of every slice: the partials' row count
    KC: tl.constexpr = K_PAD // K_SPLIT

    units = unit_group * UNITS + tl.arange(0, UNITS)
    unit_ok = units < H
    seqs, seq_ok, length = tile_sequences(lengths_ptr, batch_group * BLOCK_B, T, B, BLOCK_B, HAS_LENGTHS)
    tile_ok = seq_ok[:, None] & unit_ok[None, :]
    state_offsets = seqs[:, None] * H + units[None, :]  # [BLOCK_B, UNITS] into c0, grad_h, grad_c

    # Loaded once per launch: W_hh[gate * H + j, units] for every gate, j split over K_SPLIT slices.
    w_i = _load_weight_columns(w_hh_ptr, 0, H, units, unit_ok, K_SPLIT, KC).to(DOT_DTYPE)
    w_f = _load_weight_columns(w_hh_ptr, 1, H, units, unit_ok, K_SPLIT, KC).to(DOT_DTYPE)
    w_g = _load_weight_columns(w_hh_ptr, 2, H, units, unit_ok, K_SPLIT, KC).to(DOT_DTYPE)
    w_o = _load_weight_columns(w_hh_ptr, 3, H, units, unit_ok, K_SPLIT, KC).to(DOT_DTYPE)
    j_of_dg = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]  # [K_SPLIT, 1, KC]

    dh_carried = tl.load(grad_h_ptr + state_offsets, mask=tile_ok, other=0.0)
    dc_carried = tl.load(grad_c_ptr + state_offsets, mask=tile_ok, other=0.0)
    # Step q of the backward is the forward's processing step T - 1 - q; its c_{t-1} is the next step's c_t.
    # (A host-stepped launch with no step left only finishes dL/dh0: it loads nothing here.)
    runs = tile_ok & (step_begin < step_end)
    t, _ = step_time(T - 1 - step_begin, T, REVERSE)
    c_t = tl.load(cells_ptr + (t.to(tl.int64) * B) * H + state_offsets, mask=runs, other=0.0)
    ahead = _load_step(
        grad_out_ptr,
        gates_ptr,
        cells_ptr,
        c0_ptr,
        t,
        T - 1 - step_begin,
        T,
        B,
        H,
        seqs,
        units,
        runs,
        state_offsets,
        REVERSE,
    )
    if HAS_RESTARTS:
        ahead = finish_step_inputs(ahead)  # see the loop
        c0 = tl.load(c0_ptr + state_offsets, mask=tile_ok, other=0.0).to(tl.float32)
        to_h0 = tl.load(grad_h0_ptr + state_offsets, mask=tile_ok, other=0.0)
        to_c0 = tl.load(grad_c0_ptr + state_offsets, mask=tile_ok, other=0.0)
        restart_ahead = load_flags(restarts_ptr, t, B, seqs, seq_ok & (step_begin < step_end))
        # Whether the step after this launch's first (the previous launch's, host-stepped) restarted.
        after_first, _ = step_time(T - step_begin, T, REVERSE)
        restart_after = load_flags(restarts_ptr, after_first, B, seqs, seq_ok & (step_begin > 0))
    if TELEMETRY:
        first = tl.full((BLOCK_B, UNITS), NO_EVENT, tl.int32)

    q = step_begin
    while q < step_end:  # the time loop (a while loop on purpose: forward.py's docstring says why)
        p = T - 1 - q
        t, _ = step_time(p, T, REVERSE)
        if HAS_RESTARTS:
            g_out, gate_i, gate_f, gate_g, gate_o, c_prev = ahead
        else:
            g_out, gate_i, gate_f, gate_g, gate_o, c_prev = finish_step_inputs(ahead)
        if q + 1 < step_end:
            next_t, _ = step_time(p - 1, T, REVERSE)
            ahead = _load_step(
                grad_out_ptr,
                gates_ptr,
                cells_ptr,
                c0_ptr,
                next_t,
                p - 1,
                T,
                B,
                H,
                seqs,
                units,
                tile_ok,
                state_offsets,
                REVERSE,
            )
            if HAS_RESTARTS:  # finished at once: left to the next step, with restarts it spilled (_load_step)
                ahead = finish_step_inputs(ahead)
        active = seq_ok & (t < length)
        keep = active[:, None]
        if HAS_RESTARTS:
            restart = active & restart_ahead
            ahead_t, _ = step_time(p - 1, T, REVERSE)
            restart_ahead = load_flags(restarts_ptr, ahead_t, B, seqs, seq_ok & (q + 1 < step_end))
            c_before = tl.where(restart[:, None], c0, c_prev)
        else:
            c_before = c_prev

        # The carried dh: the gate gradients of the previous backward step (the step after t) times W_hh.
        if q > 0:
            after_t, _ = step_time(p + 1, T, REVERSE)
            after_active = (seq_ok & (after_t < length))[:, None]
            if EXCHANGE:
                wait_for(flags_ptr, batch_group * unit_groups, unit_groups, q, MAX_PROGRAMS, ASM_FENCE)
            product = _carried_product(
                exchange_ptr, (q - 1) % 2, B, H, seqs, seq_ok, j_of_dg, w_i, w_f, w_g, w_o, DOT_DTYPE, DOT_PRECISION
            )
            dh_carried = tl.where(after_active, product, dh_carried)
            if HAS_RESTARTS:  # the step after t entered from h0: its product is h0's, and nothing reaches t
                sent = after_active & restart_after[:, None]
                to_h0 += tl.where(sent, dh_carried, 0.0)
                dh_carried = tl.where(sent, 0.0, dh_carried)

        dh = tl.where(keep, g_out + dh_carried, 0.0)
        dc, dg_i, dg_f, dg_g, dg_o = cell_backward(dh, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_before, keep)
        _publish_gate_grads(exchange_ptr, q % 2, B, H, seqs, units, tile_ok, dg_i, dg_f, dg_g, dg_o)
        if EXCHANGE:
            publish(flags_ptr, program, q + 1)
        store_gate_tiles(
            dgates_ptr + (tl.cast(t, tl.int64) * B + seqs)[:, None] * (4 * H) + units[None, :],
            H,
            dg_i,
            dg_f,
            dg_g,
            dg_o,
            tile_ok,
        )
        dc_carried = tl.where(keep, dc * gate_f, dc_carried)
        if HAS_RESTARTS:
            to_c0 += tl.where(restart[:, None], dc_carried, 0.0)
            dc_carried = tl.where(restart[:, None], 0.0, dc_carried)
            restart_after = restart
        c_t = c_prev

        if TELEMETRY:
            counted = keep & unit_ok[None, :]
            code = q * 4
            # This program's share of ||dL/dh_t||^2 and ||dL/dc_t||^2: partials[0 | 1, program, t].
            partial = partials_ptr + program * T + t
            tl.store(partial, tl.sum(tl.sum(tl.where(counted, dh * dh, 0.0), axis=1), axis=0))
            tl.store(partial + num_programs * T, tl.sum(tl.sum(tl.where(counted, dc * dc, 0.0), axis=1), axis=0))
            first = note_nonfinite(first, g_out, counted, code)
            first = note_nonfinite(first, dh, counted, code + 1)
            first = note_nonfinite(first, dc, counted, code + 2)
            first = tl.minimum(first, tl.where(counted & any_nonfinite(dg_i, dg_f, dg_g, dg_o), code + 3, NO_EVENT))
        q += 1

    # dL/dh0: the last step's gate gradients times W_hh, for the sequences that ran it.
    if _finishes(step_begin, step_end, T, EXCHANGE):
        t0, _ = step_time(0, T, REVERSE)
        started = (seq_ok & (t0 < length))[:, None]
        if EXCHANGE:
            wait_for(flags_ptr, batch_group * unit_groups, unit_groups, T, MAX_PROGRAMS, ASM_FENCE)
        product = _carried_product(
            exchange_ptr, (T - 1) % 2, B, H, seqs, seq_ok, j_of_dg, w_i, w_f, w_g, w_o, DOT_DTYPE, DOT_PRECISION
        )
        dh_carried = tl.where(started, product, dh_carried)
    tl.store(grad_h_ptr + state_offsets, dh_carried, mask=tile_ok)
    tl.store(grad_c_ptr + state_offsets, dc_carried, mask=tile_ok)
    if HAS_RESTARTS:
        tl.store(grad_h0_ptr + state_offsets, to_h0, mask=tile_ok)
        tl.store(grad_c0_ptr + state_offsets, to_c0, mask=tile_ok)

    if TELEMETRY:
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_BACKWARD, REVERSE)
        if (step_begin == 0) & (batch_group_base == 0):  # once per pass, not per slice
            count_backward_pass(grad_ptr, capacity, T, BLOCK_B)


@triton.jit
def _finishes(step_begin, step_end, T, EXCHANGE: tl.constexpr):
    """Whether this launch computes dL/dh0. A cooperative launch does at its end; host-stepped, every program's gate
    gradients of the last step exist only once that step's launch is over, so a separate launch with no steps
    does it."""
    if EXCHANGE:
        return step_end == T
    return step_begin == T


@triton.jit
def _load_weight_columns(w_hh_ptr, gate: tl.constexpr, H, units, unit_ok, K_SPLIT: tl.constexpr, KC: tl.constexpr):
    """W_hh[gate*H + j, units] as [K_SPLIT, KC, UNITS] (the B operand), j = split * KC + kc (zero past H)."""
    j = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, :, None]
    offsets = (gate * H + j).to(tl.int64) * H + units[None, None, :]
    return tl.load(w_hh_ptr + offsets, mask=(j < H) & unit_ok[None, None, :], other=0.0)


@triton.jit
def _load_step(
    grad_out_ptr,
    gates_ptr,
    cells_ptr,
    c0_ptr,
    t,
    p,
    T,
    B,
    H,
    seqs,
    units,
    tile_ok,
    state_offsets,
    REVERSE: tl.constexpr,
):
    """What step t needs from memory: grad_out[t], the four activated gates and c_{t-1} (c0 at the first step, a
    second masked load). Returned as loaded (grad_out in the storage dtype, c_{t-1} in its two parts), for
    finish_step_inputs: the loop issues this a step ahead, and converting or adding at once would make the issuing step
    wait for the loads, one dependent round trip per step. With restarts they are finished at once all the same:
    deferred, they kept more registers live across the loop, and the variant with every switch at a 1024 pad
    spilled 28-68 bytes (sm_90, triton 3.6), where finishing at once compiles clean."""
    row_step = tl.cast(t, tl.int64) * B + seqs
    g_out = tl.load(grad_out_ptr + row_step[:, None] * H + units[None, :], mask=tile_ok, other=0.0)
    gate_i, gate_f, gate_g, gate_o = load_gate_tiles(
        gates_ptr + row_step[:, None] * (4 * H) + units[None, :], H, tile_ok
    )
    _, t_prev = step_time(p, T, REVERSE)
    has_prev = p > 0
    c_saved = tl.load(
        cells_ptr + (tl.cast(t_prev, tl.int64) * B + seqs)[:, None] * H + units[None, :],
        mask=tile_ok & has_prev,
        other=0.0,
    )
    c_initial = tl.load(c0_ptr + state_offsets, mask=tile_ok & ~has_prev, other=0.0)
    return g_out, gate_i, gate_f, gate_g, gate_o, c_saved, c_initial


@triton.jit
def _publish_gate_grads(exchange_ptr, slot, B, H, seqs, units, tile_ok, dg_i, dg_f, dg_g, dg_o):
    """This program's gate gradients of step t into exchange slot `slot`, in the exchange's dtype."""
    base = exchange_ptr + (slot * B + seqs)[:, None].to(tl.int64) * (4 * H) + units[None, :]
    kind = exchange_ptr.dtype.element_ty
    store_gate_tiles(base, H, dg_i.to(kind), dg_f.to(kind), dg_g.to(kind), dg_o.to(kind), tile_ok)


@triton.jit
def _carried_product(
    exchange_ptr,
    slot,
    B,
    H,
    seqs,
    seq_ok,
    j_of_dg,
    w_i,
    w_f,
    w_g,
    w_o,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Σ_gates dgates[:, gate rows] @ W_hh[gate rows, units] over the exchanged gate gradients of every unit:
    [BLOCK_B, UNITS] fp32 (the batch as the product's M, so that 8 units are a whole N tile). One gate at a time,
    so that one gate's operand is staged in shared memory at once."""
    rows = exchange_ptr + ((slot * B + seqs).to(tl.int64) * (4 * H))[None, :, None] + j_of_dg
    ok = seq_ok[None, :, None] & (j_of_dg < H)
    acc = tl.dot(_exchanged(rows, ok, DOT_DTYPE), w_i, input_precision=DOT_PRECISION)
    acc = tl.dot(_exchanged(rows + H, ok, DOT_DTYPE), w_f, acc, input_precision=DOT_PRECISION)
    acc = tl.dot(_exchanged(rows + 2 * H, ok, DOT_DTYPE), w_g, acc, input_precision=DOT_PRECISION)
    acc = tl.dot(_exchanged(rows + 3 * H, ok, DOT_DTYPE), w_o, acc, input_precision=DOT_PRECISION)
    return tl.sum(acc, axis=0)


@triton.jit
def _exchanged(ptrs, mask, DOT_DTYPE: tl.constexpr):
    # Through L2 (".cg"): other programs wrote these gradients, and L1 is not coherent across SMs.
    return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(DOT_DTYPE)
