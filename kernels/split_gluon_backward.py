"""The split backward in Gluon (backward.py's lstm_split_backward_kernel, with explicit layouts): split_gluon.py says
what Gluon adds over the `tl` twin and holds the layouts and step flags this kernel shares with the forward.
"""

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2

from .cell import (
    GRAD_PASSES,
    NO_EVENT,
    STAGE_BACKWARD,
    any_nonfinite,
    cell_backward,
    finish_step_inputs,
    flush_first_nonfinite,
    note_nonfinite,
    step_time,
)
from .split_gluon import (
    _blocked_k_cols,
    _blocked_rows_k,
    _gluon_first_poll,
    _gluon_publish,
    _gluon_wait,
    _gluon_wait_after,
    _staging_layout,
    aligned_launch,
)


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
        "ALIGNED": aligned_launch,
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
    COPY_SLOTS: gl.constexpr,
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
    # The exchanged gate gradients on their way to the product's operand (COPY_SLOTS); the exchange buffer holds
    # them in the storage dtype, which is the dot's, so they need no conversion.
    gl.static_assert(exchange_ptr.dtype.element_ty == DOT_DTYPE, "the exchange buffer holds the dot's dtype")
    STAGED: gl.constexpr = ALIGNED and COPY_SLOTS > 0
    if STAGED:
        staged = gl.allocate_shared_memory(DOT_DTYPE, [COPY_SLOTS, S, BLOCK_B, KC], _staging_layout(KC, [2, 1, 0]))
    else:
        staged = None

    # The exchanged gradients' indices: [S, BLOCK_B, KC].
    s_d = gl.arange(0, S, layout=gl.SliceLayout(1, gl.SliceLayout(2, dg_load)))
    b_d = batch_group * BLOCK_B + gl.arange(0, BLOCK_B, layout=gl.SliceLayout(0, gl.SliceLayout(2, dg_load)))
    j_d = gl.arange(0, KC, layout=gl.SliceLayout(0, gl.SliceLayout(1, dg_load)))
    j_of_dg = s_d[:, None, None] * KC + j_d[None, None, :]
    dg_mask = (b_d < B)[None, :, None] & (j_of_dg < H)
    # An element's offset within an exchange slot, worked out once: per step only the slot's start changes.
    dg_within_slot = (b_d.to(gl.int64) * (4 * H))[None, :, None] + j_of_dg

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
        sq_dh = gl.zeros([BLOCK_B, UNITS], gl.float32, tile)  # the squared gradients of the step before (see below)
        sq_dc = gl.zeros([BLOCK_B, UNITS], gl.float32, tile)

    q = step_begin
    while q < step_end:  # the time loop, backwards through the forward's steps
        p = T - 1 - q
        t, _ = step_time(p, T, REVERSE)
        g_out, gate_i, gate_f, gate_g, gate_o, c_prev = finish_step_inputs(ahead)
        if q + 1 < step_end:
            next_t, _ = step_time(p - 1, T, REVERSE)
            ahead = _gluon_step_inputs(
                grad_out_ptr, gates_ptr, cells_ptr, c0_ptr, next_t, p - 1, T, B, H, seqs, units, tile_ok, state, REVERSE
            )
        active = seq_ok & (t < length)
        keep = active[:, None]

        if q > 0:
            after_t, _ = step_time(p + 1, T, REVERSE)
            # The previous step's norms are summed and stored in the shadow of a round trip: of the copies that
            # stage this step's gradients where there are any (stored before the wait's fence, they would make it
            # wait for their stores), else of the poll's first read.
            if EXCHANGE:
                seen, aborted = _gluon_first_poll(flags_ptr, batch_group * unit_groups, unit_groups, q, MAX_PROGRAMS, S)
            if TELEMETRY and not STAGED and q > step_begin:
                _store_step_norms(partials_ptr + program * T + after_t, num_programs * T, sq_dh, sq_dc)
            if EXCHANGE:
                _gluon_wait_after(flags_ptr, batch_group * unit_groups, unit_groups, q, seen, aborted, MAX_PROGRAMS, S)
            rows = _request_exchanged(exchange_ptr, (q - 1) % 2, B, H, dg_within_slot, dg_mask, staged)
            if TELEMETRY and STAGED and q > step_begin:
                _store_step_norms(partials_ptr + program * T + after_t, num_programs * T, sq_dh, sq_dc)
            product = _gluon_carried_product(
                rows,
                H,
                dg_mask,
                w_i,
                w_f,
                w_g,
                w_o,
                staged,
                mma,
                a_layout,
                b_layout,
                red,
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
            # This program's share of ||dL/dh_t||^2 and ||dL/dc_t||^2 (partials[0 | 1, program, t]), summed and stored
            # at the next step, in the shadow of its poll: here they would lengthen every step by their reductions.
            sq_dh = gl.where(counted, dh * dh, 0.0)
            sq_dc = gl.where(counted, dc * dc, 0.0)
            first = note_nonfinite(first, g_out, counted, code)
            first = note_nonfinite(first, dh, counted, code + 1)
            first = note_nonfinite(first, dc, counted, code + 2)
            first = gl.minimum(first, gl.where(counted & any_nonfinite(dg_i, dg_f, dg_g, dg_o), code + 3, NO_EVENT))
        q += 1

    if TELEMETRY and step_end > step_begin:  # the last step's norms
        t_last, _ = step_time(T - step_end, T, REVERSE)
        _store_step_norms(partials_ptr + program * T + t_last, num_programs * T, sq_dh, sq_dc)

    # dL/dh0 (backward.py's _finishes: the cooperative launch at its end, host-stepped a separate launch).
    if _gluon_finishes(step_begin, step_end, T, EXCHANGE):
        t0, _ = step_time(0, T, REVERSE)
        if EXCHANGE:
            _gluon_wait(flags_ptr, batch_group * unit_groups, unit_groups, T, MAX_PROGRAMS, S)
        rows = _request_exchanged(exchange_ptr, (T - 1) % 2, B, H, dg_within_slot, dg_mask, staged)
        product = _gluon_carried_product(
            rows,
            H,
            dg_mask,
            w_i,
            w_f,
            w_g,
            w_o,
            staged,
            mma,
            a_layout,
            b_layout,
            red,
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
def _store_step_norms(partial_ptr, stride, sq_dh, sq_dc):
    """One step's sums of squares over this program's tile: partials[0, program, t] and partials[1, program, t]."""
    gl.store(partial_ptr, gl.sum(gl.sum(sq_dh, axis=1), axis=0))
    gl.store(partial_ptr + stride, gl.sum(gl.sum(sq_dc, axis=1), axis=0))


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
    """backward.py's _load_step: grad_out[t], the four activated gates and c_{t-1} (c0 at the first step), returned
    as loaded, for cell.finish_step_inputs."""
    row = (t.to(gl.int64) * B + seqs)[:, None]
    g_out = gl.load(grad_out_ptr + row * H + units[None, :], mask=tile_ok, other=0.0)
    base = gates_ptr + row * (4 * H) + units[None, :]
    gate_i = gl.load(base, mask=tile_ok, other=0.0)
    gate_f = gl.load(base + H, mask=tile_ok, other=0.0)
    gate_g = gl.load(base + 2 * H, mask=tile_ok, other=0.0)
    gate_o = gl.load(base + 3 * H, mask=tile_ok, other=0.0)
    _, t_prev = step_time(p, T, REVERSE)
    has_prev = p > 0
    c_saved = gl.load(
        cells_ptr + (t_prev.to(gl.int64) * B + seqs)[:, None] * H + units[None, :], mask=tile_ok & has_prev, other=0.0
    )
    c_initial = gl.load(c0_ptr + state, mask=tile_ok & ~has_prev, other=0.0)
    return g_out, gate_i, gate_f, gate_g, gate_o, c_saved, c_initial


# The exchanged gate gradients of a step, staged in shared memory by asynchronous copies, all in flight at once.
# Each gate's operand waits for its own copy: loaded one gate at a time (each after the previous gate's product) they
# are four dependent round trips per step, issued together one. Copied straight into shared memory they hold no
# registers on the way and need no layout change through shared memory afterwards. A gate's slot is [K_SPLIT,
# BLOCK_B, KC] 16-bit values (16 KiB at a 512 pad and 16 sequences); COPY_SLOTS of them, as many as fit beside the
# resident weights and the reduction's scratch in the device's shared memory (planning.gluon_copy_slots: on sm_90 all
# four at every pad with 16 sequences, on sm_80 two at 1024), reused as their products finish.
# cp.async moves at least 4 bytes, so it needs the 16-byte vectors of an aligned launch (planning.aligned): at other
# sizes the gradients go through registers as before, as many gates ahead as the registers allowed
# (_gates_in_flight; one gate at a time the kernel needed at most 152, 205 and 255 registers at 256, 512 and 1024).


@gluon.constexpr_function
def _gates_in_flight(k_pad):
    return 4 if k_pad <= 256 else 2 if k_pad <= 512 else 1


@gluon.jit
def _request_exchanged(exchange_ptr, slot, B, H, within_slot, mask, staged):
    """The exchanged gradients' pointers in exchange slot `slot` (gate i's; gate g's are g * H further on), and,
    where they are staged, the copies of the first gates issued (_gluon_carried_product waits for them)."""
    rows = exchange_ptr + slot.to(gl.int64) * B * (4 * H) + within_slot
    if staged is not None:
        STAGES: gl.constexpr = staged.shape[0]
        gl.thread_barrier()  # every thread is done reading the slots (the previous product) before they are refilled
        for gate in gl.static_range(STAGES):
            _stage(staged.index(gate), rows + gate * H, mask)
    return rows


@gluon.jit
def _gluon_carried_product(
    rows,
    H,
    dg_mask,
    w_i,
    w_f,
    w_g,
    w_o,
    staged,
    mma: gl.constexpr,
    a_layout: gl.constexpr,
    b_layout: gl.constexpr,
    red: gl.constexpr,
    DOT_PRECISION: gl.constexpr,
):
    """Σ_gates dgates[slot][:, gate rows] @ W_hh[gate rows, units]: [BLOCK_B, UNITS], the weights from shared memory,
    the exchanged gradients at `rows` (_request_exchanged) through `staged` (None where the launch is not aligned or
    has no copy slot: through registers)."""
    acc = gl.zeros([gl.constexpr(w_i.shape[0]), rows.shape[1], gl.constexpr(w_i.shape[2])], gl.float32, mma)
    if staged is not None:
        acc = _staged_product(acc, staged, 0, w_i, rows, dg_mask, H, a_layout, b_layout, DOT_PRECISION)
        acc = _staged_product(acc, staged, 1, w_f, rows, dg_mask, H, a_layout, b_layout, DOT_PRECISION)
        acc = _staged_product(acc, staged, 2, w_g, rows, dg_mask, H, a_layout, b_layout, DOT_PRECISION)
        acc = _staged_product(acc, staged, 3, w_o, rows, dg_mask, H, a_layout, b_layout, DOT_PRECISION)
    else:
        AHEAD: gl.constexpr = _gates_in_flight(gl.constexpr(w_i.shape[0] * w_i.shape[1]))
        if AHEAD == 4:
            d_i = _exchanged(rows, dg_mask)
            d_f = _exchanged(rows + H, dg_mask)
            d_g = _exchanged(rows + 2 * H, dg_mask)
            d_o = _exchanged(rows + 3 * H, dg_mask)
            acc = _loaded_product(acc, d_i, w_i, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, d_f, w_f, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, d_g, w_g, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, d_o, w_o, a_layout, b_layout, DOT_PRECISION)
        elif AHEAD == 2:
            d_i = _exchanged(rows, dg_mask)
            d_f = _exchanged(rows + H, dg_mask)
            acc = _loaded_product(acc, d_i, w_i, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, d_f, w_f, a_layout, b_layout, DOT_PRECISION)
            d_g = _exchanged(rows + 2 * H, dg_mask)
            d_o = _exchanged(rows + 3 * H, dg_mask)
            acc = _loaded_product(acc, d_g, w_g, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, d_o, w_o, a_layout, b_layout, DOT_PRECISION)
        else:
            acc = _loaded_product(acc, _exchanged(rows, dg_mask), w_i, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, _exchanged(rows + H, dg_mask), w_f, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, _exchanged(rows + 2 * H, dg_mask), w_g, a_layout, b_layout, DOT_PRECISION)
            acc = _loaded_product(acc, _exchanged(rows + 3 * H, dg_mask), w_o, a_layout, b_layout, DOT_PRECISION)
    return gl.sum(gl.convert_layout(acc, red), axis=0)


@gluon.jit
def _staged_product(
    acc,
    staged,
    gate: gl.constexpr,
    w,
    rows,
    mask,
    H,
    a_layout: gl.constexpr,
    b_layout: gl.constexpr,
    DOT_PRECISION: gl.constexpr,
):
    """acc + (the gate's staged gradients) @ w, once its copy has landed; then its slot is refilled with the gate
    STAGES further on, if there is one. One copy group per gate, committed in gate order, so the gate's group has
    landed when no more than (groups committed so far) - gate - 1 are still in flight."""
    STAGES: gl.constexpr = staged.shape[0]
    REFILLED: gl.constexpr = max(0, min(gate, 4 - STAGES))  # refills issued by the products before this one
    async_copy.wait_group(STAGES + REFILLED - gate - 1)
    gl.thread_barrier()  # every thread's copies of this gate are visible to the warps that read them
    operand = staged.index(gate % STAGES).load(a_layout)
    acc = mma_v2(operand, w.load(b_layout), acc, input_precision=DOT_PRECISION)
    if gate + STAGES < 4:
        gl.thread_barrier()  # the slot's reads are done before its refill lands
        _stage(staged.index(gate % STAGES), rows + (gate + STAGES) * H, mask)
    return acc


@gluon.jit
def _stage(slot, ptrs, mask):
    """One gate's exchanged gradients into a shared slot, as one copy group. Through L2 (cp.async.cg bypasses L1,
    which is not coherent across SMs: other programs wrote them); masked-off elements are filled with zeros."""
    async_copy.async_copy_global_to_shared(slot, ptrs, mask=mask, cache_modifier=".cg")
    async_copy.commit_group()


@gluon.jit
def _loaded_product(acc, exchanged, w, a_layout: gl.constexpr, b_layout: gl.constexpr, DOT_PRECISION: gl.constexpr):
    operand = gl.convert_layout(exchanged, a_layout)
    return mma_v2(operand, w.load(b_layout), acc, input_precision=DOT_PRECISION)


@gluon.jit
def _exchanged(ptrs, mask):
    # Through L2 (".cg"): other programs wrote these gradients, and L1 is not coherent across SMs.
    return gl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
