"""Gate math and in-register telemetry shared by the forward and backward recurrence kernels.

Everything here is computed in float32 on values the kernels already hold; nothing touches memory except the
final atomics in `flush_*`. Written without libdevice so the same code runs under TRITON_INTERPRET=1.
"""

import triton
import triton.language as tl

from fastlstm import constants as C

SIGMOID_LOW = tl.constexpr(C.SIGMOID_LOW)
SIGMOID_HIGH = tl.constexpr(1.0 - C.SIGMOID_LOW)
TANH_HIGH = tl.constexpr(C.TANH_HIGH)
STEP_MAX = tl.constexpr(C.STEP_MAX)
SEQ_SHIFT = tl.constexpr(C.SEQ_SHIFT)
STEP_SHIFT = tl.constexpr(C.STEP_SHIFT)
ORDER_SHIFT = tl.constexpr(C.ORDER_SHIFT)
STAGE_SHIFT = tl.constexpr(C.STAGE_SHIFT)
STAGE_FORWARD = tl.constexpr(C.STAGE_FORWARD)
STAGE_BACKWARD = tl.constexpr(C.STAGE_BACKWARD)
STAT_SATURATED = tl.constexpr(C.STAT_SATURATED)
STAT_ELEMENTS = tl.constexpr(C.STAT_ELEMENTS)
STAT_FORGET_SUM = tl.constexpr(C.STAT_FORGET_SUM)
STAT_CELL_ABSMAX = tl.constexpr(C.STAT_CELL_ABSMAX)
STAT_LAUNCHES = tl.constexpr(C.STAT_LAUNCHES)
GRAD_SUMSQ = tl.constexpr(C.GRAD_SUMSQ)
GRAD_PASSES = tl.constexpr(C.GRAD_PASSES)
GRAD_CELL_SUMSQ = tl.constexpr(C.GRAD_CELL_SUMSQ)
# "No non-finite seen yet" for the per-element first-event codes (step * 4 + tensor, int32).
NO_EVENT = tl.constexpr(2**31 - 1)


@triton.jit
def program_sequences(lengths_ptr, T, B, BLOCK_B: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """This program's sequence indices, which of them exist, and their lengths (T for all without lengths)."""
    return tile_sequences(lengths_ptr, tl.program_id(0) * BLOCK_B, T, B, BLOCK_B, HAS_LENGTHS)


@triton.jit
def tile_sequences(lengths_ptr, first_row, T, B, BLOCK_B: tl.constexpr, HAS_LENGTHS: tl.constexpr):
    """Sequences first_row .. first_row + BLOCK_B - 1: indices, which exist, and their lengths. Lengths are
    clamped to [0, T] so that a bad one can never index outside the time axis."""
    rows = first_row + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    if HAS_LENGTHS:
        length = tl.minimum(tl.maximum(tl.load(lengths_ptr + rows, mask=row_ok, other=0), 0), T).to(tl.int32)
    else:
        length = tl.where(row_ok, T, 0)
    return rows, row_ok, length


@triton.jit
def step_time(p, T, REVERSE: tl.constexpr):
    """Timestep of processing step p and of the step before it in the same pass's order."""
    if REVERSE:
        return T - 1 - p, T - p
    return p, p - 1


@triton.jit
def load_flags(restarts_ptr, t, B, seqs, mask):
    """restarts[t, seqs] as [BLOCK_B] bool (false where masked off). Only called under a kernel's HAS_RESTARTS, so
    that a launch without restarts compiles as if they did not exist. A bool load compares its bytes at once, so a
    step that loads the next step's flags waits for them; loading bytes and comparing them at their use instead made
    the `tl` split backward with every switch spill 28 bytes at a 1024 pad (sm_90, triton 3.6), so they stay bools."""
    return tl.load(restarts_ptr + tl.cast(t, tl.int64) * B + seqs, mask=mask, other=0) != 0


@triton.jit
def finish_step_inputs(ahead):
    """A backward step's prefetched inputs (backward.py's _load_step: grad_out[t] as stored, the four gates, c_{t-1}
    in two masked parts) as the step uses them: grad_out in fp32, c_{t-1} in one piece."""
    g_out, gate_i, gate_f, gate_g, gate_o, c_saved, c_initial = ahead
    return g_out.to(tl.float32), gate_i, gate_f, gate_g, gate_o, c_saved + c_initial.to(tl.float32)


@triton.jit
def step_restarts(restarts_ptr, t, B, rows, active):
    """[BLOCK_B] bool: which of these sequences restart at step t (counted inside a sequence only)."""
    return active & load_flags(restarts_ptr, t, B, rows, active)


@triton.jit
def send_to_initial(initial_ptr, offsets, mask, restart, carried):
    """Where a step restarted (`restart`, broadcast over the tile), what reaches its entering state is added to the
    initial state's gradient at initial_ptr + offsets, and the carried gradient for the step before restarts from
    zero. Returns the carried tile. Each program owns its tile's rows and reads and writes them through the same
    pointers, so the same thread does both."""
    sent = mask & restart
    tile = initial_ptr + offsets
    tl.store(tile, tl.load(tile, mask=sent, other=0.0) + carried, mask=sent)
    return tl.where(restart, 0.0, carried)


@triton.jit
def steps_active(length, step_begin, step_end, T, REVERSE: tl.constexpr):
    """How many of the processing steps step_begin..step_end-1 fall inside each sequence."""
    if REVERSE:  # t = T-1-p < length  <=>  p >= T - length
        return tl.maximum(step_end - tl.maximum(step_begin, T - length), 0)
    return tl.maximum(tl.minimum(step_end, length) - step_begin, 0)


@triton.jit
def tile_matmul(
    acc,
    a_ptr,
    a_rows,
    a_row_ok,
    a_stride,
    b_ptr,
    b_k_stride,
    b_n_stride,
    cols,
    col_ok,
    K,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """acc + A[a_rows, :K] @ B[:K, cols], where A is row-major with row stride a_stride and B[k, n] sits at
    b_ptr + k * b_k_stride + n * b_n_stride (so a transposed weight is just swapped strides)."""
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        a = tl.load(a_ptr + a_rows[:, None] * a_stride + ks[None, :], mask=a_row_ok[:, None] & k_ok[None, :], other=0.0)
        b_offsets = ks[:, None].to(tl.int64) * b_k_stride + cols[None, :].to(tl.int64) * b_n_stride
        b = tl.load(b_ptr + b_offsets, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def split_gates(tile, UNITS: tl.constexpr):
    """The four gate blocks (i, f, g, o) of a gate-major [4*UNITS, N] tile, as [UNITS, N] tiles. Reshape, permute
    and split only relabel registers, where a masked sum per gate would quadruple the work."""
    blocks = tl.permute(tl.reshape(tile, (2, 2, UNITS, tile.shape[1])), (2, 3, 0, 1))  # [UNITS, N, gate // 2, gate % 2]
    even, odd = tl.split(blocks)
    gate_i, gate_g = tl.split(even)
    gate_f, gate_o = tl.split(odd)
    return gate_i, gate_f, gate_g, gate_o


@triton.jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def tanh(x):
    # exp of a non-positive argument never overflows, so this is exact in sign and stable for large |x|.
    e = tl.exp(-2.0 * tl.abs(x))
    y = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -y, y)


@triton.jit
def load_gate_tiles(tile_ptr, H, mask):
    """The four gate blocks i, f, g, o of a [rows, units] tile whose block 0 starts at tile_ptr (row stride 4H)."""
    gate_i = tl.load(tile_ptr, mask=mask, other=0.0)
    gate_f = tl.load(tile_ptr + H, mask=mask, other=0.0)
    gate_g = tl.load(tile_ptr + 2 * H, mask=mask, other=0.0)
    gate_o = tl.load(tile_ptr + 3 * H, mask=mask, other=0.0)
    return gate_i, gate_f, gate_g, gate_o


@triton.jit
def store_gate_tiles(tile_ptr, H, gate_i, gate_f, gate_g, gate_o, mask):
    tl.store(tile_ptr, gate_i, mask=mask)
    tl.store(tile_ptr + H, gate_f, mask=mask)
    tl.store(tile_ptr + 2 * H, gate_g, mask=mask)
    tl.store(tile_ptr + 3 * H, gate_o, mask=mask)


@triton.jit
def cell_backward(dh, dc_carried, gate_i, gate_f, gate_g, gate_o, c_t, c_prev, keep):
    """One step of the cell's backward: dc_t and the pre-activation gradients of the four gates (zero where `keep`
    is false: steps outside a sequence)."""
    tanh_c = tanh(c_t)
    dc = dc_carried + dh * gate_o * (1.0 - tanh_c * tanh_c)
    d_i = tl.where(keep, dc * gate_g * gate_i * (1.0 - gate_i), 0.0)
    d_f = tl.where(keep, dc * c_prev * gate_f * (1.0 - gate_f), 0.0)
    d_g = tl.where(keep, dc * gate_i * (1.0 - gate_g * gate_g), 0.0)
    d_o = tl.where(keep, dh * tanh_c * gate_o * (1.0 - gate_o), 0.0)
    return dc, d_i, d_f, d_g, d_o


@triton.jit
def nonfinite(x):
    # NaN compares false with everything, so one comparison catches NaN and both infinities.
    return ~(tl.abs(x) < float("inf"))


@triton.jit
def any_nonfinite(a, b, c, d):
    return nonfinite(a) | nonfinite(b) | nonfinite(c) | nonfinite(d)


@triton.jit
def note_nonfinite(first, x, mask, code):
    """Keep, per element, the smallest event code at which `x` was NaN/inf (codes grow with execution order)."""
    return tl.minimum(first, tl.where(mask & nonfinite(x), code, NO_EVENT))


@triton.jit
def sigmoid_saturated(a, mask):
    return tl.where(mask & ((a < SIGMOID_LOW) | (a > SIGMOID_HIGH)), 1.0, 0.0)


@triton.jit
def tanh_saturated(a, mask):
    return tl.where(mask & (tl.abs(a) > TANH_HIGH), 1.0, 0.0)


@triton.jit
def flush_first_nonfinite(first_ptr, seq_ptr, first, steps, order, STAGE: tl.constexpr, ASCENDING: tl.constexpr):
    """Turn the per-element first codes into this program's earliest event and fold it into the stage's key.

    A code is processing_step * 4 + tensor; the key orders by pass, stage, launch, then by the step's place in the
    launch's time order, then by tensor (constants.py).
    """
    code = tl.min(tl.reshape(first, (first.numel,)), axis=0)
    flush_first_code(first_ptr, seq_ptr, code, steps, order, STAGE, ASCENDING)


@triton.jit
def flush_first_code(first_ptr, seq_ptr, code, steps, order, STAGE: tl.constexpr, ASCENDING: tl.constexpr):
    """flush_first_nonfinite for a program that already reduced its codes to the earliest one."""
    step = code // 4
    tensor = code % 4
    if ASCENDING:
        step_field = step.to(tl.int64)
    else:
        step_field = (step - (steps - 1) + STEP_MAX).to(tl.int64)
    launch = (order.to(tl.int64) << ORDER_SHIFT) + (STAGE << STAGE_SHIFT)
    key = (tl.load(seq_ptr) << SEQ_SHIFT) + launch + (step_field << STEP_SHIFT) + tensor.to(tl.int64)
    tl.atomic_min(first_ptr, key, mask=code != NO_EVENT)


@triton.jit
def flush_forward_stats(stats_ptr, sat_i, sat_f, sat_g, sat_o, forget, absmax, elements):
    """Add this program's counts and sums to its slot's float64 row; max |c| goes through an int64 atomic max on
    the bit pattern, which orders non-negative doubles (and NaN above infinity) like their values."""
    tl.atomic_add(stats_ptr + STAT_SATURATED + 0, tl.sum(tl.sum(sat_i.to(tl.float64), axis=1), axis=0))
    tl.atomic_add(stats_ptr + STAT_SATURATED + 1, tl.sum(tl.sum(sat_f.to(tl.float64), axis=1), axis=0))
    tl.atomic_add(stats_ptr + STAT_SATURATED + 2, tl.sum(tl.sum(sat_g.to(tl.float64), axis=1), axis=0))
    tl.atomic_add(stats_ptr + STAT_SATURATED + 3, tl.sum(tl.sum(sat_o.to(tl.float64), axis=1), axis=0))
    tl.atomic_add(stats_ptr + STAT_ELEMENTS, elements.to(tl.float64))
    tl.atomic_add(stats_ptr + STAT_FORGET_SUM, tl.sum(tl.sum(forget.to(tl.float64), axis=1), axis=0))
    has_nan = tl.max(tl.max(nonfinite(absmax).to(tl.int32), axis=1), axis=0) > 0  # absmax >= 0: only NaN or inf
    largest = tl.where(has_nan, float("nan"), tl.max(tl.max(absmax, axis=1), axis=0)).to(tl.float64)
    bits_ptr = (stats_ptr + STAT_CELL_ABSMAX).to(tl.pointer_type(tl.int64), bitcast=True)
    tl.atomic_max(bits_ptr, largest.to(tl.int64, bitcast=True))


@triton.jit
def count_forward_launch(stats_ptr):
    """One more forward of this slot (STAT_LAUNCHES); the first program only, rather than a separate tiny launch."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.atomic_add(stats_ptr + STAT_LAUNCHES, 1.0)


@triton.jit
def count_backward_pass(grad_ptr, capacity, steps, BLOCK: tl.constexpr):
    """One more backward pass reached every timestep of this launch (the GRAD_PASSES row); the first program only."""
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        for t0 in range(0, steps, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            tl.atomic_add(grad_ptr + GRAD_PASSES * capacity + t, 1.0, mask=t < steps)
