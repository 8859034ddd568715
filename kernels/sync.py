"""Grid-wide barrier for persistent kernels: every program of the launch waits until all have arrived.

The barrier state is two int32 words in global memory, zeroed before each launch: an arrival counter that only
grows (so it never needs resetting between steps) and a flag set when a program gave up waiting. A program's
arrival is a release atomic issued after a block-wide barrier, so every warp's stores of the step are ordered
before it; the wait is an acquire load followed by another block-wide barrier, so every warp's later loads see what
the other programs stored. Loads of data written by other programs must still bypass L1 (cache_modifier=".cg"),
which is not coherent across SMs.

It only works when every program of the grid is resident at once: the launcher guarantees that by launching no
more programs than the device has SMs. The interpreter runs programs one after another, so a spin-wait there would
never end: kernels take a constexpr switch and, without it, run one step per launch (host-stepped mode) instead of
calling this.
"""

import triton
import triton.language as tl

ARRIVALS = tl.constexpr(0)
TIMED_OUT = tl.constexpr(1)
# Polls before a program gives up: minutes at the latency of an L2 atomic, far beyond any real step. A broken
# co-residency (another persistent kernel holding SMs, say) then becomes a reported failure, never a hang.
MAX_POLLS = tl.constexpr(1 << 28)


@triton.jit
def grid_barrier(barrier_ptr, arrivals_expected):
    """Arrive, then wait until the counter reaches `arrivals_expected` (number of programs x barriers so far)."""
    tl.debug_barrier()
    tl.atomic_add(barrier_ptr + ARRIVALS, 1, sem="release", scope="gpu")
    polls = 0
    arrived = tl.atomic_add(barrier_ptr + ARRIVALS, 0, sem="acquire", scope="gpu")
    while (arrived < arrivals_expected) & (polls < MAX_POLLS):
        arrived = tl.atomic_add(barrier_ptr + ARRIVALS, 0, sem="acquire", scope="gpu")
        polls += 1
    if arrived < arrivals_expected:
        tl.atomic_max(barrier_ptr + TIMED_OUT, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()
