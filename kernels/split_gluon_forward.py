"""The split forward in Gluon (forward.py's lstm_split_forward_kernel, with explicit layouts): split_gluon.py says
what Gluon adds over the `tl` twin and holds the layouts and step flags this kernel shares with the backward.
"""

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .cell import (
    NO_EVENT,
    STAGE_FORWARD,
    any_nonfinite,
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
from .split_gluon import _blocked_k_cols, _blocked_rows_k, _gluon_publish, _gluon_wait, _staging_layout, aligned_launch


@gluon.constexpr_function
def _reduction_layout(block_b, s):
    """[S, 4 * UNITS, BLOCK_B] with the S partials and a unit's 4 gates in one thread."""
    b_threads = min(block_b, 32)
    return gl.BlockedLayout([s, 4, 1], [1, 32 // b_threads, b_threads], [1, s, 1], [1, 0, 2])


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
        "ALIGNED": aligned_launch,
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
    ALIGNED: gl.constexpr,
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
    hx_ptr = out_ptr - B * H  # [h0; out]: row 0 is h0 (launch.py)
    # Per step only a row's start changes: the rest of each element's offset is worked out once, here.
    h_within_row = (b_h.to(gl.int64) * H)[None, None, :] + k_of_h
    # h_{t-1} on its way to the product's operand: an asynchronous copy straight into shared memory, where a load
    # would hold it in registers and then pass it through shared memory for the layout change (cp.async needs the
    # 16-byte vectors of an aligned launch; otherwise the load it is).
    gl.static_assert(out_ptr.dtype.element_ty == DOT_DTYPE, "the exchanged h is in the dot's dtype")
    if ALIGNED:
        staged_h = gl.allocate_shared_memory(DOT_DTYPE, [S, KC, BLOCK_B], _staging_layout(KC, [1, 2, 0]))

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
        # h_{t-1} is row 1 + t_prev of [h0; out] for a sequence already running, else row 0 (its h0).
        h_row_start = gl.where(p > 0, (1 + t_prev).to(gl.int64) * B * H, 0)
        if HAS_LENGTHS:
            h_ptrs = hx_ptr + gl.where(t_prev < length_h, h_row_start, 0)[None, None, :] + h_within_row
        else:
            h_ptrs = hx_ptr + h_row_start + h_within_row
        h_mask = (b_h < B)[None, None, :] & (k_of_h < H)
        if ALIGNED:  # through L2 (.cg) as every exchanged value: other programs wrote it
            gl.thread_barrier()  # every thread is done reading the previous step's h from the slot
            async_copy.async_copy_global_to_shared(staged_h, h_ptrs, mask=h_mask, cache_modifier=".cg")
            async_copy.commit_group()
            async_copy.wait_group(0)
            gl.thread_barrier()  # every thread's copies are visible to the warps that read them
            h = staged_h.load(b_layout)
        else:
            h = gl.convert_layout(gl.load(h_ptrs, mask=h_mask, other=0.0, cache_modifier=".cg"), b_layout)

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
