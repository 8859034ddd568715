"""Small @triton.jit kernels whose structure is known by construction, for tests/test_model.py: the performance
model (fastlstm.kernels.analysis) must read back from their SASS what their source says they do.

Each is a 'recurrence': a time loop over T with a product against a weight tile W. They are compiled for sm_90 in
a fresh process (the suite may run the interpreter), so this module holds the kernels and the worker functions.
"""

import triton
import triton.language as tl

ROWS = 16  # rows of the state tile (a batch tile)
BLOCK = 64  # the weight tile is BLOCK x BLOCK, bf16
GATHER_BLOCK = 128  # int32 indices and fp32 table entries per step of gather_kernel


@triton.jit
def load_tile(base, BLOCK: tl.constexpr):
    """A BLOCK x BLOCK row-major tile; the pointer arrives under another name than the kernel's."""
    offs = tl.arange(0, BLOCK)
    return tl.load(base + offs[:, None] * BLOCK + offs[None, :])


@triton.jit
def weights_resident_kernel(x_ptr, w_hh_ptr, h0_ptr, out_ptr, T, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """W loaded once, before the time loop: the product re-reads it from on-chip storage every step."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    tile = rows[:, None] * BLOCK + cols[None, :]
    w = load_tile(w_hh_ptr, BLOCK)
    h = tl.load(h0_ptr + tile).to(tl.float32)
    for t in range(T):
        x = tl.load(x_ptr + t * ROWS * BLOCK + tile).to(tl.float32)
        h = tl.sigmoid(tl.dot(h.to(tl.bfloat16), w) + x)
        tl.store(out_ptr + t * ROWS * BLOCK + tile, h.to(tl.bfloat16))


@triton.jit
def weights_every_step_kernel(x_ptr, w_hh_ptr, h0_ptr, out_ptr, T, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """The same recurrence with W re-loaded inside the time loop, through the helper."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    tile = rows[:, None] * BLOCK + cols[None, :]
    h = tl.load(h0_ptr + tile).to(tl.float32)
    for t in range(T):
        w = load_tile(w_hh_ptr, BLOCK)
        x = tl.load(x_ptr + t * ROWS * BLOCK + tile).to(tl.float32)
        h = tl.sigmoid(tl.dot(h.to(tl.bfloat16), w) + x)
        tl.store(out_ptr + t * ROWS * BLOCK + tile, h.to(tl.bfloat16))


@triton.jit
def gather_kernel(
    index_ptr, table_ptr, out_ptr, T, BLOCK: tl.constexpr, DEPENDENT: tl.constexpr, BARRIER: tl.constexpr
):
    """Per step one load of indices and one of table entries; with DEPENDENT the second's address is the first's
    value (two dependent round trips per step), otherwise both addresses are known up front (one). Without
    BARRIER the loop is small enough for LLVM to unroll it by four, overlapping four steps' loads."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(T):
        idx = tl.load(index_ptr + t * BLOCK + offs)
        if DEPENDENT:
            acc += tl.load(table_ptr + idx)
        else:
            acc += tl.load(table_ptr + t * BLOCK + offs) + idx.to(tl.float32)
        if BARRIER:
            tl.debug_barrier()  # a convergent operation: LLVM does not unroll a loop holding one
    tl.store(out_ptr + offs, acc)


@triton.jit
def chunked_kernel(x_ptr, w_hh_ptr, out_ptr, T, H, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """A time loop around a runtime-bounded reduction over H in BLOCK-wide chunks: W streams H/BLOCK tiles per step."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    for t in range(T):
        acc = tl.zeros((ROWS, BLOCK), tl.float32)
        for k0 in range(0, H, BLOCK):
            x = tl.load(x_ptr + (t * ROWS + rows[:, None]) * H + k0 + cols[None, :])
            w = load_tile(w_hh_ptr + k0 * BLOCK, BLOCK)
            acc = tl.dot(x, w, acc)
        tl.store(out_ptr + (t * ROWS + rows[:, None]) * BLOCK + cols[None, :], acc.to(tl.bfloat16))


@triton.jit
def poll_kernel(flags_ptr, data_ptr, out_ptr, T, BLOCK: tl.constexpr):
    """Per step a wait for flag t (read once before the poll loop, which runs only while it is not up), then a load
    of step t's data: with the flag already up the wait is one read, one round trip, and the data one more."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(T):
        seen = tl.load(flags_ptr + t, volatile=True)
        while seen == 0:
            seen = tl.load(flags_ptr + t, volatile=True)
        acc += tl.load(data_ptr + t * BLOCK + offs)
    tl.store(out_ptr + offs, acc)


KERNELS = {
    "resident": (
        weights_resident_kernel,
        {"x_ptr": "*bf16", "w_hh_ptr": "*bf16", "h0_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32"},
        {"ROWS": ROWS, "BLOCK": BLOCK},
    ),
    "every_step": (
        weights_every_step_kernel,
        {"x_ptr": "*bf16", "w_hh_ptr": "*bf16", "h0_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32"},
        {"ROWS": ROWS, "BLOCK": BLOCK},
    ),
    **{
        f"{name}{'-unrolled' if not barrier else ''}": (
            gather_kernel,
            {"index_ptr": "*i32", "table_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32"},
            {"BLOCK": GATHER_BLOCK, "DEPENDENT": dependent, "BARRIER": barrier},
        )
        for name, dependent in (("dependent", True), ("independent", False))
        for barrier in (True, False)
    },
    "poll": (
        poll_kernel,
        {"flags_ptr": "*i32", "data_ptr": "*fp32", "out_ptr": "*fp32", "T": "i32"},
        {"BLOCK": GATHER_BLOCK},
    ),
    "chunked": (
        chunked_kernel,
        {"x_ptr": "*bf16", "w_hh_ptr": "*bf16", "out_ptr": "*bf16", "T": "i32", "H": "i32"},
        {"ROWS": ROWS, "BLOCK": BLOCK},
    ),
}


def compile_toy(name: str, num_warps: int = 4, num_stages: int = 1):
    import triton.compiler
    from triton.backends.compiler import GPUTarget

    fn, pointers, constexprs = KERNELS[name]
    signature = {arg: pointers.get(arg, "constexpr") for arg in fn.arg_names}
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return fn, triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def profile_task(task) -> dict:
    """Worker (runs in a fresh process): compile a toy kernel or a routed variant of fastlstm's kernels for sm_90
    and return what the model reads from it at the given sizes."""
    from fastlstm.kernels import analysis, model

    kind, name, sizes = task
    if kind == "resident-claims":
        return resident_weight_offenders()
    if kind == "toy":
        fn, compiled = compile_toy(name)
        programs = 1
    else:  # ("route", "split-forward", sizes) or "split-gluon-backward": the variant kernels/model.py routes
        from fastlstm.kernels.variant import compile_kernel

        label, pass_name = name.rsplit("-", 1)
        shape = model.Shape(sizes["H"], sizes["B"], sizes["T"], sizes["dtype"])
        route = next(r for r in model.routes(shape) if r.label == label)
        built = compile_kernel(route.variant(pass_name), 90)
        fn, compiled = built.fn, built.kernel
        programs = route.programs[pass_name]
    result = analysis.analyse(compiled, fn)
    scalars = {k: v for k, v in sizes.items() if k != "dtype"}
    return {
        "weights_every_step": analysis.loads_weights_every_step(compiled, fn),
        "weight_loads": [(op.instruction.opcode, sorted(op.args)) for op in result.weight_loads_in_time_loop()],
        "num_warps": result.num_warps,
        "profile": result.per_step(scalars, programs).to_dict(),
    }


def resident_weight_offenders() -> list:
    """Worker: every routed variant that claims to keep W_hh on chip but whose time loop loads it."""
    from fastlstm.kernels import analysis, model
    from fastlstm.kernels.variant import compile_kernel

    offenders, claimed = [], model.resident_weight_variants()
    for label, pass_name, variant in claimed:
        built = compile_kernel(variant, 90)
        ops = analysis.analyse(built.kernel, built.fn).weight_loads_in_time_loop()
        if ops:
            where = ", ".join(f"{op.instruction.opcode} of {op.label} at {op.instruction.frames[:1]}" for op in ops)
            offenders.append(f"{label} {pass_name} ({variant.name}): {where}")
    return [len(claimed), offenders]
