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

The kernels are split_gluon_forward.py and split_gluon_backward.py; this module holds what both use: the load layouts
of their resident weights and the step flags (exchange.py's publish and wait, with explicit layouts).
"""

from triton.experimental import gluon
from triton.experimental.gluon import language as gl

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


def aligned_launch(args) -> bool:
    """The kernels' ALIGNED heuristic: whether triton specialises the launch as aligned (H a multiple of 16, the rule
    of planning.aligned), which gives their asynchronous copies the 16-byte vectors they need."""
    return args["H"] % 16 == 0


@gluon.constexpr_function
def _staging_layout(kc, order):
    """Shared layout of an exchanged operand that asynchronous copies stage ([S, ·, ·], KC contiguous 16-bit values
    along the axis order[0]): 16-byte vectors, what one copy moves, swizzled across the rows so that the operand's
    reads spread over the banks."""
    per_phase = max(1, 128 // (kc * 2))
    return gl.SwizzledSharedLayout(8, per_phase, 8 // per_phase, order)


@gluon.constexpr_function
def _flags_layout(max_producers, s):
    """The watched flags, whole in every warp (each warp holds a replica): the wait's minimum over them is then a
    reduction within each warp, where flags spread over the warps would need one through shared memory, between
    block barriers, on every poll."""
    return gl.BlockedLayout([max(1, max_producers // 32)], [32], [s], [0])


@gluon.jit
def _gluon_publish(flags_ptr, program, steps_published):
    gl.thread_barrier()
    gl.atomic_xchg(flags_ptr + 1 + program, steps_published, sem="release", scope="gpu")


@gluon.jit
def _gluon_wait(flags_ptr, first_producer, producers, steps_needed, MAX_PRODUCERS: gl.constexpr, S: gl.constexpr):
    """exchange.wait_for, with an explicit layout for the flags."""
    seen, aborted = _gluon_first_poll(flags_ptr, first_producer, producers, steps_needed, MAX_PRODUCERS, S)
    _gluon_wait_after(flags_ptr, first_producer, producers, steps_needed, seen, aborted, MAX_PRODUCERS, S)


@gluon.jit
def _gluon_first_poll(flags_ptr, first_producer, producers, steps_needed, MAX_PRODUCERS: gl.constexpr, S: gl.constexpr):
    """The wait's first read of the flags and the abort word, on its own: work placed between it and
    _gluon_wait_after runs while the read is in flight."""
    slots = gl.arange(0, MAX_PRODUCERS, layout=_flags_layout(MAX_PRODUCERS, S))
    seen = gl.load(flags_ptr + 1 + first_producer + slots, mask=slots < producers, other=steps_needed, volatile=True)
    return seen, gl.load(flags_ptr, volatile=True)


@gluon.jit
def _gluon_wait_after(
    flags_ptr, first_producer, producers, steps_needed, seen, aborted, MAX_PRODUCERS: gl.constexpr, S: gl.constexpr
):
    """The rest of the wait, from what _gluon_first_poll read."""
    slots = gl.arange(0, MAX_PRODUCERS, layout=_flags_layout(MAX_PRODUCERS, S))
    watched = flags_ptr + 1 + first_producer + slots
    is_flag = slots < producers
    polls = 0
    while (gl.min(seen, axis=0) < steps_needed) & (aborted == 0) & (polls < WAIT_POLLS):
        seen = gl.load(watched, mask=is_flag, other=steps_needed, volatile=True)
        aborted = gl.load(flags_ptr, volatile=True)
        polls += 1
    if (gl.min(seen, axis=0) < steps_needed) & (aborted == 0):
        gl.atomic_xchg(flags_ptr, 1, sem="relaxed", scope="gpu")
    gl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=gl.int32, is_pure=False, pack=1)
