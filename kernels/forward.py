"""Forward recurrence of one LSTM layer-direction with the weights held on chip for the whole sequence.

The 4H gate rows are split over the programs of one launch: program (u, b) owns units [u*UNITS, (u+1)*UNITS) of
the sequences [b*BLOCK_B, (b+1)*BLOCK_B), i.e. 4*UNITS rows of W_hh, which it loads once, before the time loop, and
keeps in registers as the A operand of every step's product (gates[4U, BB] = W_hh[rows] @ h_{t-1}ᵀ).

Each step every program needs all of h_{t-1}, so h_t goes through global memory: the output tensor `out` itself is
the exchange buffer, and exchange.py's flags say when a step is complete. The launch is cooperative (every program
resident at once, or the launch fails); without the flags (host-stepped) the launcher starts one launch per step and
the kernel boundary orders the steps (the interpreter runs this mode). Hidden sizes whose whole W_hh fits one
program run single.py instead, where h_t never leaves the chip.

Per step, on the critical path: wait for the producers of h_{t-1}, load it from L2, one tensor-core product, the
cell update in registers, store h_t and raise the flag. xw[t+1] is loaded one step ahead, c_t stays in registers,
telemetry accumulates in registers and leaves each program as one atomic per quantity after the loop.

Why the time loop is a `while` loop: triton 3.6 (ReorderInstructions) moves the shared-memory read of a loop-
invariant tl.dot operand into the body of an scf.for, which re-reads the whole W_hh slice from shared memory every
step; it leaves scf.while alone, so with `while` the slice stays in registers (the SASS shows no load of W_hh inside
the loop: kernels/model.py checks it for every routed variant).

The product is a batched tl.dot over K_SPLIT slices of the reduction axis ([K_SPLIT, 4U, K/K_SPLIT] @ [K_SPLIT,
K/K_SPLIT, BB], summed over the slices): a [4U, BB] output is too small to give every warp its own rows, so each
warp takes one slice of K instead, and no warp computes (or holds registers for) another's share.

Restarts (fastlstm/reference.py): a step's flags are loaded a step ahead with xw, c0 stays resident, and a restarted
sequence reads its h_{t-1} from the exchange buffer's h0 row, as a sequence at its first step does.

Layouts (contiguous; storage dtype fp32, fp16 or bf16; saved tensors fp32), P = H (no projection):
  xw [T, B, 4H] · h0, c0 [B, H] · w_hh [4H, H] · lengths [B] int64 or None · restarts [T, B] bool or None
  out [T, B, H] · gates [T, B, 4H] activated · cells [T, B, H] carried c_t · h_n, c_n [B, H]
"""

import triton
import triton.language as tl

from .cell import (
    NO_EVENT,
    STAGE_FORWARD,
    any_nonfinite,
    count_forward_launch,
    flush_first_nonfinite,
    flush_forward_stats,
    load_flags,
    note_nonfinite,
    sigmoid,
    sigmoid_saturated,
    split_gates,
    step_time,
    steps_active,
    store_gate_tiles,
    tanh,
    tanh_saturated,
    tile_sequences,
)
from .exchange import publish, wait_for


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["stats_ptr"] is not None,
        "EXCHANGE": lambda args: args["flags_ptr"] is not None,
    }
)
@triton.jit(do_not_specialize=["order", "batch_group_base", "step_begin", "step_end", "T", "B"])
def lstm_split_forward_kernel(
    xw_ptr,
    h0_ptr,
    c0_ptr,
    w_hh_ptr,
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
    KC: tl.constexpr = K_PAD // K_SPLIT

    # This program's gate rows r = gate * UNITS + j (gate-major) and its [UNITS, BLOCK_B] state tile.
    gate_rows = tl.arange(0, 4 * UNITS)
    row_unit = unit_group * UNITS + gate_rows % UNITS
    row_ok = row_unit < H
    w_row = (gate_rows // UNITS) * H + row_unit  # row of W_hh, and column of xw / gates
    units = unit_group * UNITS + tl.arange(0, UNITS)
    unit_ok = units < H
    seqs, seq_ok, length = tile_sequences(lengths_ptr, batch_group * BLOCK_B, T, B, BLOCK_B, HAS_LENGTHS)
    gate_tile_ok = row_ok[:, None] & seq_ok[None, :]
    tile_ok = unit_ok[:, None] & seq_ok[None, :]
    state_offsets = seqs[None, :] * H + units[:, None]  # [UNITS, BLOCK_B] into h0, c0, h_n, c_n

    # Loaded once per launch: this program's W_hh rows, as K_SPLIT slices of the reduction axis.
    ks = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, None, :]
    w = tl.load(
        w_hh_ptr + w_row[None, :, None].to(tl.int64) * H + ks,
        mask=row_ok[None, :, None] & (ks < H),
        other=0.0,
    ).to(DOT_DTYPE)
    k_of_h = tl.arange(0, K_SPLIT)[:, None, None] * KC + tl.arange(0, KC)[None, :, None]  # [K_SPLIT, KC, 1]

    # State at the launch's first step: c0 / h0, or what the previous launch left (host-stepped).
    first_t, before_first = step_time(step_begin, T, REVERSE)
    resumed = step_begin > 0
    c = tl.load(c0_ptr + state_offsets, mask=tile_ok & ~resumed, other=0.0).to(tl.float32)
    c += tl.load(cells_ptr + (before_first.to(tl.int64) * B) * H + state_offsets, mask=tile_ok & resumed, other=0.0)
    x_next = _load_gate_inputs(xw_ptr, first_t, B, H, seqs, w_row, gate_tile_ok)
    if HAS_RESTARTS:
        c0 = tl.load(c0_ptr + state_offsets, mask=tile_ok, other=0.0).to(tl.float32)
        restart_next = load_flags(restarts_ptr, first_t, B, seqs, seq_ok)

    if TELEMETRY:
        sat_i = tl.zeros((UNITS, BLOCK_B), tl.float32)
        sat_f = tl.zeros((UNITS, BLOCK_B), tl.float32)
        sat_g = tl.zeros((UNITS, BLOCK_B), tl.float32)
        sat_o = tl.zeros((UNITS, BLOCK_B), tl.float32)
        forget = tl.zeros((UNITS, BLOCK_B), tl.float32)
        absmax = tl.zeros((UNITS, BLOCK_B), tl.float32)
        first = tl.full((UNITS, BLOCK_B), NO_EVENT, tl.int32)

    p = step_begin
    while p < step_end:  # the time loop (a while loop on purpose: see the module docstring)
        t, t_prev = step_time(p, T, REVERSE)
        x = x_next
        next_t, _ = step_time(p + 1, T, REVERSE)
        x_next = _load_gate_inputs(xw_ptr, next_t, B, H, seqs, w_row, gate_tile_ok & (p + 1 < step_end))
        active = seq_ok & (t < length)
        # h_{t-1} is the previous step's h of a sequence already running, else its h0.
        from_prev = seq_ok & (p > 0) & (t_prev < length)
        if HAS_RESTARTS:
            restart = active & restart_next
            restart_next = load_flags(restarts_ptr, next_t, B, seqs, seq_ok & (p + 1 < step_end))
            from_prev = from_prev & ~restart
            c = tl.where(restart[None, :], c0, c)
        if EXCHANGE and p > 0:
            wait_for(flags_ptr, batch_group * unit_groups, unit_groups, p, MAX_PROGRAMS, ASM_FENCE)
        h = _load_exchanged(out_ptr - B * H, t_prev, B, H, seqs, seq_ok, from_prev, k_of_h).to(DOT_DTYPE)

        pre_i, pre_f, pre_g, pre_o = split_gates(
            tl.sum(tl.dot(w, h, input_precision=DOT_PRECISION), axis=0) + x.to(tl.float32), UNITS
        )
        gate_i = sigmoid(pre_i)
        gate_f = sigmoid(pre_f)
        gate_g = tanh(pre_g)
        gate_o = sigmoid(pre_o)
        c_new = gate_f * c + gate_i * gate_g
        h_full = gate_o * tanh(c_new)
        keep = active[None, :]
        c = tl.where(keep, c_new, c)

        row_step = tl.cast(t, tl.int64) * B + seqs
        tl.store(
            out_ptr + row_step[None, :] * H + units[:, None],
            tl.where(keep, h_full, 0.0).to(out_ptr.dtype.element_ty),
            mask=tile_ok,
        )
        if EXCHANGE:
            publish(flags_ptr, batch_group * unit_groups + unit_group, p + 1)
        gate_offsets = row_step[None, :] * (4 * H) + units[:, None]
        store_gate_tiles(gates_ptr + gate_offsets, H, gate_i, gate_f, gate_g, gate_o, tile_ok)
        tl.store(cells_ptr + row_step[None, :] * H + units[:, None], c, mask=tile_ok)

        if TELEMETRY:
            counted = keep & unit_ok[:, None]
            code = p * 4
            sat_i += sigmoid_saturated(gate_i, counted)
            sat_f += sigmoid_saturated(gate_f, counted)
            sat_g += tanh_saturated(gate_g, counted)
            sat_o += sigmoid_saturated(gate_o, counted)
            forget += tl.where(counted, gate_f, 0.0)
            absmax = tl.maximum(absmax, tl.where(counted, tl.abs(c_new), 0.0), propagate_nan=tl.PropagateNan.ALL)
            x_i, x_f, x_g, x_o = split_gates(x, UNITS)
            first = tl.minimum(first, tl.where(counted & any_nonfinite(x_i, x_f, x_g, x_o), code, NO_EVENT))
            first = tl.minimum(first, tl.where(counted & any_nonfinite(pre_i, pre_f, pre_g, pre_o), code + 1, NO_EVENT))
            first = note_nonfinite(first, c_new, counted, code + 2)
            first = note_nonfinite(first, h_full, counted, code + 3)
        p += 1

    if step_end == T:
        _store_final_state(
            out_ptr, h0_ptr, hn_ptr, cn_ptr, c, seqs, seq_ok, length, units, tile_ok, state_offsets, B, H, REVERSE
        )
    if TELEMETRY:
        ran = tl.where(seq_ok, steps_active(length, step_begin, step_end, T, REVERSE), 0)
        elements = tl.sum(ran, axis=0).to(tl.float64) * tl.sum(unit_ok.to(tl.int32), axis=0).to(tl.float64)
        flush_forward_stats(stats_ptr, sat_i, sat_f, sat_g, sat_o, forget, absmax, elements)
        if (step_begin == 0) & (batch_group_base == 0):  # once per pass, not per slice
            count_forward_launch(stats_ptr)
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_FORWARD, not REVERSE)


@triton.jit
def _load_exchanged(hx_ptr, t_prev, B, H, seqs, seq_ok, from_prev, k_of_h):
    """h_{t-1}ᵀ of every unit, [K_SPLIT, KC, BLOCK_B], from the exchange buffer hx = [h0; out] ([T + 1, B, H]):
    row 1 + t_prev for a sequence already running, row 0 (h0) for one that starts at this step. One base pointer
    with per-sequence row offsets, so triton still sees every row as contiguous and issues 16-byte loads (a choice
    between two tensors' pointers would cost one 2-byte load per element). Read through L2 (".cg"): other programs
    wrote these rows, and L1 is not coherent across SMs."""
    row = tl.where(from_prev, 1 + t_prev, 0)
    offsets = ((row.to(tl.int64) * B + seqs) * H)[None, None, :] + k_of_h
    return tl.load(hx_ptr + offsets, mask=seq_ok[None, None, :] & (k_of_h < H), other=0.0, cache_modifier=".cg")


@triton.jit
def _load_gate_inputs(xw_ptr, t, B, H, seqs, w_row, mask):
    """xw[t] for this program's gate rows: [4 * UNITS, BLOCK_B] in the storage dtype."""
    rows = (tl.cast(t, tl.int64) * B + seqs) * (4 * H)
    return tl.load(xw_ptr + rows[None, :] + w_row[:, None], mask=mask, other=0.0)


@triton.jit
def _store_final_state(
    out_ptr, h0_ptr, hn_ptr, cn_ptr, c, seqs, seq_ok, length, units, tile_ok, state_offsets, B, H, REVERSE: tl.constexpr
):
    """h_n and c_n of this program's units: each sequence's last step in its own order (h0 if it had none)."""
    if REVERSE:
        t_last = tl.zeros_like(length)
    else:
        t_last = length - 1
    ran = (seq_ok & (length > 0))[None, :]
    last = (tl.cast(t_last, tl.int64) * B + seqs)[None, :] * H + units[:, None]
    h_last = tl.load(out_ptr + last, mask=tile_ok & ran, other=0.0).to(tl.float32)
    h_last += tl.load(h0_ptr + state_offsets, mask=tile_ok & ~ran, other=0.0).to(tl.float32)
    tl.store(hn_ptr + state_offsets, h_last.to(hn_ptr.dtype.element_ty), mask=tile_ok)
    tl.store(cn_ptr + state_offsets, c.to(cn_ptr.dtype.element_ty), mask=tile_ok)
