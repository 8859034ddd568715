"""The split forward and backward (forward.py, backward.py) written in Gluon, for 16-bit storage on sm_80 and newer.

Same arguments, same results and the same exchange protocol as their `tl` twins, which the interpreter tests (Gluon
does not run under the interpreter). What Gluon adds is control of layouts, which `tl` leaves to the compiler:
  - the weight share stays in registers in the MMA operand layout for the whole launch;
  - the product's K-split partials (one per warp) are summed by a layout change that puts a unit's partials of all
    four gates into one thread, so the cell update runs once per element, spread over every thread; the `tl` twin's
    reduction leaves each warp a replicated copy of the whole tile, which multiplies the step's instructions (see
    docs/kernels.md for both kernels' counts, read from their SASS).
Gate rows are ordered unit-major here (row 4j + g is gate g of unit j), so that a unit's four gates land in one
thread; the twins order them gate-major. Neither order is visible outside the kernel.

Layouts, with S = K_SPLIT = num_warps slices of the reduction axis of KC = K_PAD / S each:
  mma     [S, rows, cols] MMA v2 accumulator, warps along S
  w       the resident weights, the MMA's A (forward: [S, 4U, KC]) or B (backward: [S, KC, U]) operand
  red     [S, 4U, BB] with the S partials and the 4 gates of one element in one thread (forward)
"""

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

from .cell import (
    GRAD_PASSES,
    NO_EVENT,
    STAGE_BACKWARD,
    STAGE_FORWARD,
    any_nonfinite,
    cell_backward,
    count_forward_launch,
    flush_first_nonfinite,
    flush_forward_stats,
    note_nonfinite,
    sigmoid,
    sigmoid_saturated,
    step_time,
    steps_active,
    tanh,
    tanh_saturated,
)
from .exchange import WAIT_POLLS


@gluon.constexpr_function
def _blocked_rows_k(kc, s):
    """A [S, ROWS, KC] load layout with 16-byte vectors along the contiguous K."""
    k_threads = min(kc // 8, 32)
    return gl.BlockedLayout([1, 1, 8], [1, 32 // k_threads, k_threads], [s, 1, 1], [2, 1, 0])


@gluon.constexpr_function
def _blocked_k_cols(kc, s):
    """A [S, KC, COLS] load layout with 16-byte vectors along the contiguous K (axis 1)."""
    k_threads = min(kc // 8, 32)
    return gl.BlockedLayout([1, 8, 1], [1, k_threads, 32 // k_threads], [s, 1, 1], [1, 2, 0])


@gluon.constexpr_function
def _reduction_layout(block_b, s):
    """[S, 4 * UNITS, BLOCK_B] with the S partials and a unit's 4 gates in one thread."""
    b_threads = min(block_b, 32)
    return gl.BlockedLayout([s, 4, 1], [1, 32 // b_threads, b_threads], [1, s, 1], [1, 0, 2])


@gluon.jit
def _gluon_publish(flags_ptr, program, steps_published):
    gl.thread_barrier()
    gl.atomic_xchg(flags_ptr + 1 + program, steps_published, sem="release", scope="gpu")


@gluon.jit
def _gluon_wait(flags_ptr, first_producer, producers, steps_needed, MAX_PRODUCERS: gl.constexpr, S: gl.constexpr):
    """exchange.wait_for, with an explicit layout for the flags."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [S], [0])
    slots = gl.arange(0, MAX_PRODUCERS, layout=layout)
    watched = flags_ptr + 1 + first_producer + slots
    is_flag = slots < producers
    seen = gl.load(watched, mask=is_flag, other=steps_needed, volatile=True)
    aborted = gl.load(flags_ptr, volatile=True)
    polls = 0
    while (gl.min(seen, axis=0) < steps_needed) & (aborted == 0) & (polls < WAIT_POLLS):
        seen = gl.load(watched, mask=is_flag, other=steps_needed, volatile=True)
        aborted = gl.load(flags_ptr, volatile=True)
        polls += 1
    if (gl.min(seen, axis=0) < steps_needed) & (aborted == 0):
        gl.atomic_xchg(flags_ptr, 1, sem="relaxed", scope="gpu")
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _split4(tile, UNITS: gl.constexpr, N: gl.constexpr):
    """The four gates of a unit-major [4*UNITS, N] tile whose gates sit in one thread: [UNITS, N] each."""
    quads = gl.permute(gl.reshape(tile, [UNITS, 2, 2, N]), [0, 3, 1, 2])  # [UNITS, N, gate // 2, gate % 2]
    even, odd = gl.split(quads)
    gate_i, gate_g = gl.split(even)
    gate_f, gate_o = gl.split(odd)
    return gate_i, gate_f, gate_g, gate_o


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["stats_ptr"] is not None,
        "EXCHANGE": lambda args: args["flags_ptr"] is not None,
    }
)
@gluon.jit(do_not_specialize=["order", "batch_group_base", "step_begin", "step_end", "T", "B"])
def lstm_split_forward_gluon_kernel(
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
    REVERSE: gl.constexpr,
    UNITS: gl.constexpr,
    BLOCK_B: gl.constexpr,
    K_PAD: gl.constexpr,
    K_SPLIT: gl.constexpr,
    MAX_PROGRAMS: gl.constexpr,
    ASM_FENCE: gl.constexpr,
    DOT_DTYPE: gl.constexpr,
    DOT_PRECISION: gl.constexpr,
    HAS_LENGTHS: gl.constexpr,
    HAS_RESTARTS: gl.constexpr,
    TELEMETRY: gl.constexpr,
    EXCHANGE: gl.constexpr,
):
    # The tl twin takes restarts; this kernel does not yet, and the launcher plans the twin for a pass with them.
    gl.static_assert(not HAS_RESTARTS, "the Gluon split kernels take no restarts: launch their tl twin")
    S: gl.constexpr = K_SPLIT
    KC: gl.constexpr = K_PAD // K_SPLIT
    ROWS: gl.constexpr = 4 * UNITS
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[S, 1, 1], instr_shape=[1, 16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    w_load: gl.constexpr = _blocked_rows_k(KC, S)
    h_load: gl.constexpr = _blocked_k_cols(KC, S)
    # The partials of one element and its unit's four gates in one thread; elements spread over every thread.
    red: gl.constexpr = _reduction_layout(BLOCK_B, S)
    tile: gl.constexpr = gl.SliceLayout(0, red)  # [ROWS, BLOCK_B]

    unit_group = gl.program_id(0)
    batch_group = batch_group_base + gl.program_id(1)  # the launcher may run the batch groups in slices
    unit_groups = gl.num_programs(0)

    # This program's weight rows, unit-major: row r is gate r % 4 of unit r // 4.
    r_w = gl.arange(0, ROWS, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_load)))
    s_w = gl.arange(0, S, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_load)))
    k_w = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_load)))
    unit_w = unit_group * UNITS + r_w // 4
    k_of_w = s_w[:, None, None] * KC + k_w[None, None, :]
    w = gl.load(
        w_hh_ptr + ((r_w % 4) * H + unit_w)[None, :, None].to(gl.int64) * H + k_of_w,
        mask=(unit_w < H)[None, :, None] & (k_of_w < H),
        other=0.0,
    )
    w = gl.convert_layout(w.to(DOT_DTYPE), a_layout)

    # Index tiles of the pointwise layout: rows (unit-major gate rows) x sequences.
    r_t = gl.arange(0, ROWS, layout=gl.SliceLayout(1, tile))
    b_t = gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, tile))
    seq_row = gl.full([ROWS, BLOCK_B], 0, gl.int32, tile) + (batch_group * BLOCK_B + b_t)[None, :]
    unit_row = gl.full([ROWS, BLOCK_B], 0, gl.int32, tile) + (unit_group * UNITS + r_t // 4)[:, None]
    col_row = (r_t % 4)[:, None] * H + unit_row  # the row's column of xw and gates
    row_ok = (seq_row < B) & (unit_row < H)
    seqs, _u1, _u2, _u3 = _split4(seq_row, UNITS, BLOCK_B)
    units, _v1, _v2, _v3 = _split4(unit_row, UNITS, BLOCK_B)
    tile_ok = (seqs < B) & (units < H)
    if HAS_LENGTHS:
        length = gl.load(lengths_ptr + seqs, mask=seqs < B, other=0)
        length = gl.minimum(gl.maximum(length, 0), T).to(gl.int32)
        length_rows = gl.load(lengths_ptr + seq_row, mask=seq_row < B, other=0)
        length_rows = gl.minimum(gl.maximum(length_rows, 0), T).to(gl.int32)
    else:
        length = gl.where(seqs < B, T, 0)
        length_rows = gl.where(seq_row < B, T, 0)
    state = seqs * H + units

    # The exchanged h_{t-1}: [S, KC, BLOCK_B], k contiguous.
    s_h = gl.arange(0, S, layout=gl.SliceLayout(1, gl.SliceLayout(2, h_load)))
    k_h = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(2, h_load)))
    b_h = batch_group * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, gl.SliceLayout(1, h_load)))
    k_of_h = s_h[:, None, None] * KC + k_h[None, :, None]
    if HAS_LENGTHS:
        length_h = gl.load(lengths_ptr + b_h, mask=b_h < B, other=0)
        length_h = gl.minimum(gl.maximum(length_h, 0), T).to(gl.int32)
    else:
        length_h = gl.where(b_h < B, T, 0)
    hx_ptr = out_ptr - B * H  # [h0; out]: row 0 is h0 (launch.py)

    first_t, before_first = step_time(step_begin, T, REVERSE)
    resumed = step_begin > 0
    c = gl.load(c0_ptr + state, mask=tile_ok & ~resumed, other=0.0).to(gl.float32)
    c += gl.load(cells_ptr + before_first.to(gl.int64) * B * H + state, mask=tile_ok & resumed, other=0.0)
    x_next = gl.load(xw_ptr + (first_t.to(gl.int64) * B + seq_row) * (4 * H) + col_row, mask=row_ok, other=0.0)

    if TELEMETRY:
        sat_i = gl.zeros_like(c)
        sat_f = gl.zeros_like(c)
        sat_g = gl.zeros_like(c)
        sat_o = gl.zeros_like(c)
        forget = gl.zeros_like(c)
        absmax = gl.zeros_like(c)
        first = gl.full(c.shape, NO_EVENT, gl.int32, c.type.layout)

    p = step_begin
    while p < step_end:  # the time loop
        t, t_prev = step_time(p, T, REVERSE)
        x = x_next.to(gl.float32)
        next_t, _ = step_time(p + 1, T, REVERSE)
        x_next = gl.load(
            xw_ptr + (next_t.to(gl.int64) * B + seq_row) * (4 * H) + col_row,
            mask=row_ok & (p + 1 < step_end),
            other=0.0,
        )
        active = (seqs < B) & (t < length)

        if EXCHANGE and p > 0:
            _gluon_wait(flags_ptr, batch_group * unit_groups, unit_groups, p, MAX_PROGRAMS, S)
        from_prev = (b_h < B) & (p > 0) & (t_prev < length_h)
        h_row = gl.where(from_prev, 1 + t_prev, 0).to(gl.int64)
        h = gl.load(
            hx_ptr + ((h_row * B + b_h) * H)[None, None, :] + k_of_h,
            mask=(b_h < B)[None, None, :] & (k_of_h < H),
            other=0.0,
            cache_modifier=".cg",
        )
        h = gl.convert_layout(h.to(DOT_DTYPE), b_layout)

        partials = mma_v2(w, h, gl.zeros([S, ROWS, BLOCK_B], gl.float32, mma), input_precision=DOT_PRECISION)
        pre = gl.sum(gl.convert_layout(partials, red), axis=0) + x
        pre_i, pre_f, pre_g, pre_o = _split4(pre, UNITS, BLOCK_B)
        gate_i = sigmoid(pre_i)
        gate_f = sigmoid(pre_f)
        gate_g = tanh(pre_g)
        gate_o = sigmoid(pre_o)
        c_new = gate_f * c + gate_i * gate_g
        h_full = gate_o * tanh(c_new)
        keep = active
        c = gl.where(keep, c_new, c)

        row_step = t.to(gl.int64) * B + seqs
        gl.store(out_ptr + row_step * H + units, gl.where(keep, h_full, 0.0).to(out_ptr.dtype.element_ty), mask=tile_ok)
        if EXCHANGE:
            _gluon_publish(flags_ptr, batch_group * unit_groups + unit_group, p + 1)
        gate_base = gates_ptr + row_step * (4 * H) + units
        gl.store(gate_base, gate_i, mask=tile_ok)
        gl.store(gate_base + H, gate_f, mask=tile_ok)
        gl.store(gate_base + 2 * H, gate_g, mask=tile_ok)
        gl.store(gate_base + 3 * H, gate_o, mask=tile_ok)
        gl.store(cells_ptr + row_step * H + units, c, mask=tile_ok)

        if TELEMETRY:
            counted = keep & tile_ok
            code = p * 4
            sat_i += sigmoid_saturated(gate_i, counted)
            sat_f += sigmoid_saturated(gate_f, counted)
            sat_g += tanh_saturated(gate_g, counted)
            sat_o += sigmoid_saturated(gate_o, counted)
            forget += gl.where(counted, gate_f, 0.0)
            absmax = gl.maximum(absmax, gl.where(counted, gl.abs(c_new), 0.0), propagate_nan=tl.PropagateNan.ALL)
            x_i, x_f, x_g, x_o = _split4(x, UNITS, BLOCK_B)
            first = gl.minimum(first, gl.where(counted & any_nonfinite(x_i, x_f, x_g, x_o), code, NO_EVENT))
            first = gl.minimum(first, gl.where(counted & any_nonfinite(pre_i, pre_f, pre_g, pre_o), code + 1, NO_EVENT))
            first = note_nonfinite(first, c_new, counted, code + 2)
            first = note_nonfinite(first, h_full, counted, code + 3)
        p += 1

    if step_end == T:  # h_n, c_n: each sequence's last step in its own order (h0 if it had none)
        if REVERSE:
            t_last = gl.zeros_like(length)
        else:
            t_last = length - 1
        ran = tile_ok & (length > 0)
        h_last = gl.load(out_ptr + (t_last.to(gl.int64) * B + seqs) * H + units, mask=ran, other=0.0).to(gl.float32)
        h_last += gl.load(h0_ptr + state, mask=tile_ok & (length == 0), other=0.0).to(gl.float32)
        gl.store(hn_ptr + state, h_last.to(hn_ptr.dtype.element_ty), mask=tile_ok)
        gl.store(cn_ptr + state, c.to(cn_ptr.dtype.element_ty), mask=tile_ok)
    if TELEMETRY:
        ran_steps = gl.where(tile_ok, steps_active(length, step_begin, step_end, T, REVERSE), 0)
        elements = gl.sum(gl.sum(ran_steps, axis=1), axis=0).to(gl.float64)
        flush_forward_stats(stats_ptr, sat_i, sat_f, sat_g, sat_o, forget, absmax, elements)
        if (step_begin == 0) & (batch_group_base == 0):  # once per pass, not per slice
            count_forward_launch(stats_ptr)
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_FORWARD, not REVERSE)


@gluon.constexpr_function
def _batch_major_reduction(block_b, units, s):
    """[S, BLOCK_B, UNITS] with the S partials of an element in one thread and the elements over every thread."""
    u_threads = min(units, 32)
    return gl.BlockedLayout([s, 1, 1], [1, 32 // u_threads, u_threads], [1, s, 1], [2, 1, 0])


@triton.heuristics(
    {
        "HAS_LENGTHS": lambda args: args["lengths_ptr"] is not None,
        "HAS_RESTARTS": lambda args: args["restarts_ptr"] is not None,
        "TELEMETRY": lambda args: args["grad_ptr"] is not None,
        "EXCHANGE": lambda args: args["flags_ptr"] is not None,
    }
)
@gluon.jit(do_not_specialize=["capacity", "order", "batch_group_base", "step_begin", "step_end", "T", "B"])
def lstm_split_backward_gluon_kernel(
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
    REVERSE: gl.constexpr,
    UNITS: gl.constexpr,
    BLOCK_B: gl.constexpr,
    K_PAD: gl.constexpr,
    K_SPLIT: gl.constexpr,
    MAX_PROGRAMS: gl.constexpr,
    ASM_FENCE: gl.constexpr,
    DOT_DTYPE: gl.constexpr,
    DOT_PRECISION: gl.constexpr,
    HAS_LENGTHS: gl.constexpr,
    HAS_RESTARTS: gl.constexpr,
    TELEMETRY: gl.constexpr,
    EXCHANGE: gl.constexpr,
):
    # The tl twin takes restarts; this kernel does not yet, and the launcher plans the twin for a pass with them.
    gl.static_assert(not HAS_RESTARTS, "the Gluon split kernels take no restarts: launch their tl twin")
    S: gl.constexpr = K_SPLIT
    KC: gl.constexpr = K_PAD // K_SPLIT
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[S, 1, 1], instr_shape=[1, 16, 8])
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
    b_layout: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
    w_load: gl.constexpr = _blocked_k_cols(KC, S)  # [S, KC, UNITS]: W_hh rows j, columns of this program's units
    dg_load: gl.constexpr = _blocked_rows_k(KC, S)  # [S, BLOCK_B, KC]: the exchanged gate gradients, j contiguous
    red: gl.constexpr = _batch_major_reduction(BLOCK_B, UNITS, S)
    tile: gl.constexpr = gl.SliceLayout(0, red)  # [BLOCK_B, UNITS]

    unit_group = gl.program_id(0)
    batch_group = batch_group_base + gl.program_id(1)  # the launcher may run the batch groups in slices
    unit_groups = gl.num_programs(0)
    program = batch_group * unit_groups + unit_group
    num_programs = unit_groups * gl.cdiv(B, BLOCK_B)  # of every slice: the partials' row count

    # Loaded once: W_hh[gate * H + j, units] per gate, as the B operand.
    s_w = gl.arange(0, S, layout=gl.SliceLayout(1, gl.SliceLayout(2, w_load)))
    j_w = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(2, w_load)))
    u_w = unit_group * UNITS + gl.arange(0, UNITS, layout=gl.SliceLayout(0, gl.SliceLayout(1, w_load)))
    j_of_w = s_w[:, None, None] * KC + j_w[None, :, None]
    w_mask = (j_of_w < H) & (u_w < H)[None, None, :]
    # Loaded once into shared memory (64 KiB at H=1024 in 16 bits), read every step as the B operand: in registers
    # they left ptxas a handful of registers short on sm_90 (8-40 bytes of spills, moving with the switches, even
    # with two gates in registers). A step already passes 128 KiB of exchanged gradients through shared memory on
    # their way to the dot layout, so the weights' 64 KiB read adds less than that.
    resident: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [2, 1, 0])
    w_i = gl.allocate_shared_memory(
        DOT_DTYPE, [S, KC, UNITS], resident, _weight_columns(w_hh_ptr, 0, H, j_of_w, u_w, w_mask).to(DOT_DTYPE)
    )
    w_f = gl.allocate_shared_memory(
        DOT_DTYPE, [S, KC, UNITS], resident, _weight_columns(w_hh_ptr, 1, H, j_of_w, u_w, w_mask).to(DOT_DTYPE)
    )
    w_g = gl.allocate_shared_memory(
        DOT_DTYPE, [S, KC, UNITS], resident, _weight_columns(w_hh_ptr, 2, H, j_of_w, u_w, w_mask).to(DOT_DTYPE)
    )
    w_o = gl.allocate_shared_memory(
        DOT_DTYPE, [S, KC, UNITS], resident, _weight_columns(w_hh_ptr, 3, H, j_of_w, u_w, w_mask).to(DOT_DTYPE)
    )

    # The exchanged gradients' indices: [S, BLOCK_B, KC].
    s_d = gl.arange(0, S, layout=gl.SliceLayout(1, gl.SliceLayout(2, dg_load)))
    b_d = batch_group * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, gl.SliceLayout(2, dg_load)))
    j_d = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(1, dg_load)))
    j_of_dg = s_d[:, None, None] * KC + j_d[None, None, :]
    dg_mask = (b_d < B)[None, :, None] & (j_of_dg < H)

    # The pointwise tile: [BLOCK_B, UNITS], batch-major.
    seqs = batch_group * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(1, tile))
    units = unit_group * UNITS + gl.arange(0, UNITS, layout=gl.SliceLayout(0, tile))
    seq_ok = seqs < B
    tile_ok = seq_ok[:, None] & (units < H)[None, :]
    if HAS_LENGTHS:
        length = gl.minimum(gl.maximum(gl.load(lengths_ptr + seqs, mask=seq_ok, other=0), 0), T).to(gl.int32)
    else:
        length = gl.where(seq_ok, T, 0)
    state = seqs[:, None] * H + units[None, :]

    dh_carried = gl.load(grad_h_ptr + state, mask=tile_ok, other=0.0)
    dc_carried = gl.load(grad_c_ptr + state, mask=tile_ok, other=0.0)
    runs = tile_ok & (step_begin < step_end)
    t, _ = step_time(T - 1 - step_begin, T, REVERSE)
    c_t = gl.load(cells_ptr + (t.to(gl.int64) * B) * H + state, mask=runs, other=0.0)
    ahead = _gluon_step_inputs(
        grad_out_ptr, gates_ptr, cells_ptr, c0_ptr, t, T - 1 - step_begin, T, B, H, seqs, units, runs, state, REVERSE
    )
    if TELEMETRY:
        first = gl.full([BLOCK_B, UNITS], NO_EVENT, gl.int32, tile)

    q = step_begin
    while q < step_end:  # the time loop, backwards through the forward's steps
        p = T - 1 - q
        t, _ = step_time(p, T, REVERSE)
        g_out, gate_i, gate_f, gate_g, gate_o, c_prev = ahead
        if q + 1 < step_end:
            next_t, _ = step_time(p - 1, T, REVERSE)
            ahead = _gluon_step_inputs(
                grad_out_ptr, gates_ptr, cells_ptr, c0_ptr, next_t, p - 1, T, B, H, seqs, units, tile_ok, state, REVERSE
            )
        active = seq_ok & (t < length)
        keep = active[:, None]

        if q > 0:
            after_t, _ = step_time(p + 1, T, REVERSE)
            if EXCHANGE:
                _gluon_wait(flags_ptr, batch_group * unit_groups, unit_groups, q, MAX_PROGRAMS, S)
            product = _gluon_carried_product(
                exchange_ptr,
                (q - 1) % 2,
                B,
                H,
                b_d,
                j_of_dg,
                dg_mask,
                w_i,
                w_f,
                w_g,
                w_o,
                mma,
                a_layout,
                b_layout,
                red,
                DOT_DTYPE,
                DOT_PRECISION,
            )
            dh_carried = gl.where((seq_ok & (after_t < length))[:, None], product, dh_carried)

        dh = gl.where(keep, g_out + dh_carried, 0.0)
        dc, dg_i, dg_f, dg_g, dg_o = cell_backward(dh, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_prev, keep)
        slot = exchange_ptr + ((q % 2) * B + seqs)[:, None].to(gl.int64) * (4 * H) + units[None, :]
        kind = exchange_ptr.dtype.element_ty
        gl.store(slot, dg_i.to(kind), mask=tile_ok)
        gl.store(slot + H, dg_f.to(kind), mask=tile_ok)
        gl.store(slot + 2 * H, dg_g.to(kind), mask=tile_ok)
        gl.store(slot + 3 * H, dg_o.to(kind), mask=tile_ok)
        if EXCHANGE:
            _gluon_publish(flags_ptr, program, q + 1)
        out = dgates_ptr + (t.to(gl.int64) * B + seqs)[:, None] * (4 * H) + units[None, :]
        gl.store(out, dg_i, mask=tile_ok)
        gl.store(out + H, dg_f, mask=tile_ok)
        gl.store(out + 2 * H, dg_g, mask=tile_ok)
        gl.store(out + 3 * H, dg_o, mask=tile_ok)
        dc_carried = gl.where(keep, dc * gate_f, dc_carried)
        c_t = c_prev

        if TELEMETRY:
            counted = keep & tile_ok
            code = q * 4
            partial = partials_ptr + program * T + t
            gl.store(partial, gl.sum(gl.sum(gl.where(counted, dh * dh, 0.0), axis=1), axis=0))
            gl.store(partial + num_programs * T, gl.sum(gl.sum(gl.where(counted, dc * dc, 0.0), axis=1), axis=0))
            first = note_nonfinite(first, g_out, counted, code)
            first = note_nonfinite(first, dh, counted, code + 1)
            first = note_nonfinite(first, dc, counted, code + 2)
            first = gl.minimum(first, gl.where(counted & any_nonfinite(dg_i, dg_f, dg_g, dg_o), code + 3, NO_EVENT))
        q += 1

    # dL/dh0 (backward.py's _finishes: the cooperative launch at its end, host-stepped a separate launch).
    if _gluon_finishes(step_begin, step_end, T, EXCHANGE):
        t0, _ = step_time(0, T, REVERSE)
        if EXCHANGE:
            _gluon_wait(flags_ptr, batch_group * unit_groups, unit_groups, T, MAX_PROGRAMS, S)
        product = _gluon_carried_product(
            exchange_ptr,
            (T - 1) % 2,
            B,
            H,
            b_d,
            j_of_dg,
            dg_mask,
            w_i,
            w_f,
            w_g,
            w_o,
            mma,
            a_layout,
            b_layout,
            red,
            DOT_DTYPE,
            DOT_PRECISION,
        )
        dh_carried = gl.where((seq_ok & (t0 < length))[:, None], product, dh_carried)
    gl.store(grad_h_ptr + state, dh_carried, mask=tile_ok)
    gl.store(grad_c_ptr + state, dc_carried, mask=tile_ok)

    if TELEMETRY:
        flush_first_nonfinite(first_ptr, seq_ptr, first, T, order, STAGE_BACKWARD, REVERSE)
        if (step_begin == 0) & (batch_group_base == 0):  # once per pass, not per slice
            _gluon_count_backward_pass(grad_ptr, capacity, T, S)


@gluon.jit
def _gluon_count_backward_pass(grad_ptr, capacity, steps, S: gl.constexpr):
    """cell.count_backward_pass, with an explicit layout for the step indices."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [S], [0])
    if (gl.program_id(0) == 0) & (gl.program_id(1) == 0):
        for t0 in range(0, steps, 32 * S):
            t = t0 + gl.arange(0, 32 * S, layout=layout)
            ones = gl.full([32 * S], 1.0, gl.float64, layout)
            gl.atomic_add(grad_ptr + GRAD_PASSES * capacity + t, ones, mask=t < steps)


@gluon.jit
def _gluon_finishes(step_begin, step_end, T, EXCHANGE: gl.constexpr):
    if EXCHANGE:
        return step_end == T
    return step_begin == T


@gluon.jit
def _weight_columns(w_hh_ptr, gate: gl.constexpr, H, j_of_w, u_w, mask):
    return gl.load(w_hh_ptr + (gate * H + j_of_w).to(gl.int64) * H + u_w[None, None, :], mask=mask, other=0.0)


@gluon.jit
def _gluon_step_inputs(
    grad_out_ptr, gates_ptr, cells_ptr, c0_ptr, t, p, T, B, H, seqs, units, tile_ok, state, REVERSE: gl.constexpr
):
    """backward.py's _load_step: grad_out[t], the four activated gates and c_{t-1} (c0 at the first step)."""
    row = (t.to(gl.int64) * B + seqs)[:, None]
    g_out = gl.load(grad_out_ptr + row * H + units[None, :], mask=tile_ok, other=0.0).to(gl.float32)
    base = gates_ptr + row * (4 * H) + units[None, :]
    gate_i = gl.load(base, mask=tile_ok, other=0.0)
    gate_f = gl.load(base + H, mask=tile_ok, other=0.0)
    gate_g = gl.load(base + 2 * H, mask=tile_ok, other=0.0)
    gate_o = gl.load(base + 3 * H, mask=tile_ok, other=0.0)
    _, t_prev = step_time(p, T, REVERSE)
    has_prev = p > 0
    c_prev = gl.load(
        cells_ptr + (t_prev.to(gl.int64) * B + seqs)[:, None] * H + units[None, :], mask=tile_ok & has_prev, other=0.0
    )
    c_prev += gl.load(c0_ptr + state, mask=tile_ok & ~has_prev, other=0.0).to(gl.float32)
    return g_out, gate_i, gate_f, gate_g, gate_o, c_prev


@gluon.jit
def _gluon_carried_product(
    exchange_ptr,
    slot,
    B,
    H,
    b_d,
    j_of_dg,
    dg_mask,
    w_i,
    w_f,
    w_g,
    w_o,
    mma: gl.constexpr,
    a_layout: gl.constexpr,
    b_layout: gl.constexpr,
    red: gl.constexpr,
    DOT_DTYPE: gl.constexpr,
    DOT_PRECISION: gl.constexpr,
):
    """Σ_gates dgates[slot][:, gate rows] @ W_hh[gate rows, units]: [BLOCK_B, UNITS], one gate's operands at a time
    (the weights from shared memory)."""
    rows = exchange_ptr + ((slot * B + b_d).to(gl.int64) * (4 * H))[None, :, None] + j_of_dg
    acc = gl.zeros([gl.constexpr(w_i.shape[0]), b_d.shape[0], gl.constexpr(w_i.shape[2])], gl.float32, mma)
    acc = _gate_product(acc, rows, dg_mask, w_i, a_layout, b_layout, DOT_DTYPE, DOT_PRECISION)
    acc = _gate_product(acc, rows + H, dg_mask, w_f, a_layout, b_layout, DOT_DTYPE, DOT_PRECISION)
    acc = _gate_product(acc, rows + 2 * H, dg_mask, w_g, a_layout, b_layout, DOT_DTYPE, DOT_PRECISION)
    acc = _gate_product(acc, rows + 3 * H, dg_mask, w_o, a_layout, b_layout, DOT_DTYPE, DOT_PRECISION)
    return gl.sum(gl.convert_layout(acc, red), axis=0)


@gluon.jit
def _gate_product(
    acc,
    rows,
    mask,
    w,
    a_layout: gl.constexpr,
    b_layout: gl.constexpr,
    DOT_DTYPE: gl.constexpr,
    DOT_PRECISION: gl.constexpr,
):
    operand = _exchanged_operand(rows, mask, a_layout, DOT_DTYPE)
    return mma_v2(operand, w.load(b_layout), acc, input_precision=DOT_PRECISION)


@gluon.jit
def _exchanged_operand(ptrs, mask, layout: gl.constexpr, DOT_DTYPE: gl.constexpr):
    # Through L2 (".cg"): other programs wrote these gradients, and L1 is not coherent across SMs.
    return gl.convert_layout(gl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg").to(DOT_DTYPE), layout)
