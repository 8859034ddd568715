"""Step-to-step exchange between the programs of one cooperative launch (the split kernels: forward.py,
backward.py, and their Gluon versions through split_gluon.py).

Every program publishes its share of a step (h_t in the forward, the gate gradients in the backward) into a buffer
the others read, then raises its own flag to the number of steps it has published. A reader waits until every
producer's flag has reached the step it needs. The flags are a fresh zeroed int32 buffer per launch, one word per
producer and one abort word after them, so no state survives from one launch into the next and two launches on
different streams never share a word. Layout: word 0 is the abort word, word 1 + i the flag of program i (programs
numbered over the whole grid); a reader waits for a contiguous range of producers (its batch group's unit groups).

Why this scheme (what triton 3.6 compiles it to for sm_90):
  - A program's stores are ordered before its flag by a block barrier followed by one release atomic from one
    thread; the barrier makes every warp's stores visible to that thread first (release is cumulative).
  - Readers poll with relaxed (volatile) loads: an acquire poll compiles to a strong load plus CCTL.IVALL, which
    would invalidate the SM's whole L1 on every poll. One acquire fence after the last poll orders the data loads
    that follow; those read through L2 (".cg"), which is coherent across SMs.
  - A reader that waits WAIT_POLLS polls without seeing a flag gives up, raises the abort word (so every other
    program stops waiting at once instead of timing out in turn) and carries on with whatever it reads; the launcher
    turns a raised abort word into a device-side assertion, so such a launch fails loudly and never returns numbers.
The interpreter runs programs one after another, so a wait for another program can never finish there: the
launcher runs such kernels host-stepped (one launch per step, the kernel boundary being the exchange) or with a
single program, whose only producer is itself.
"""

import triton
import triton.language as tl

# Polls before a waiting program gives up. A poll is a relaxed load served by L2 (about 0.3-0.6 us on H100/H200 under
# load), so this is about 2-5 s: far beyond any real step, short enough that a lost program fails the run quickly.
WAIT_POLLS = tl.constexpr(1 << 23)


@triton.jit
def publish(flags_ptr, program, steps_published):
    """Raise this program's flag to `steps_published` once every warp's stores of the step are done."""
    tl.debug_barrier()
    tl.atomic_xchg(flags_ptr + 1 + program, steps_published, sem="release", scope="gpu")


@triton.jit
def wait_for(flags_ptr, first_producer, producers, steps_needed, MAX_PRODUCERS: tl.constexpr, ASM_FENCE: tl.constexpr):
    """Block until producers first_producer .. first_producer + producers - 1 have each published `steps_needed`
    steps (or the launch was aborted)."""
    slots = tl.arange(0, MAX_PRODUCERS)
    watched = flags_ptr + 1 + first_producer + slots
    is_flag = slots < producers
    seen = tl.load(watched, mask=is_flag, other=steps_needed, volatile=True)
    aborted = tl.load(flags_ptr, volatile=True)
    polls = 0
    while (tl.min(seen, axis=0) < steps_needed) & (aborted == 0) & (polls < WAIT_POLLS):
        seen = tl.load(watched, mask=is_flag, other=steps_needed, volatile=True)
        aborted = tl.load(flags_ptr, volatile=True)
        polls += 1
    if (tl.min(seen, axis=0) < steps_needed) & (aborted == 0):
        tl.atomic_xchg(flags_ptr, 1, sem="relaxed", scope="gpu")
    acquire_fence(flags_ptr, ASM_FENCE)


@triton.jit
def acquire_fence(any_flag_ptr, ASM_FENCE: tl.constexpr):
    """Order every later load after the polls that saw the flags. On the GPU a bare fence (no memory round trip);
    the interpreter cannot run inline assembly, so there an acquire atomic on a flag word stands in (it has the
    same meaning and the interpreter ignores memory orders anyway)."""
    if ASM_FENCE:
        tl.inline_asm_elementwise("fence.acq_rel.gpu; mov.u32 $0, 0;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.atomic_add(any_flag_ptr, 0, sem="acquire", scope="gpu")
