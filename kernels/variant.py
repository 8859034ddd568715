"""One kernel variant and its ahead-of-time compilation for a GPU target, with no GPU.

A Variant names a kernel family and pass, the storage dtype and dot precision, the switches (which optional tensors
are present, reverse time, the exchange) and the constexprs and launch options its plan sets. `compile_kernel` runs
triton.compile for sm_<arch> on it; aot.py compiles the matrix of every variant the launcher can plan and
model.py reads the compiled code.

Signatures come from each kernel's own argument list: a pointer's element type from POINTER_TYPES by name, the
integers from INTEGER_ARGUMENTS, the switches from the variant; an argument those tables do not know fails the
variant, so a kernel argument can never compile with a guessed type. Optional tensors are compiled as None, which
is what the launcher passes, and their flags are then derived by the kernel's own triton.heuristics.
"""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple

# Element type of every pointer argument of the kernels; "storage" is the layer's dtype.
STORAGE_POINTERS = (
    "xw_ptr",
    "h0_ptr",
    "c0_ptr",
    "w_hh_ptr",
    "w_hr_ptr",
    "out_ptr",
    "hn_ptr",
    "cn_ptr",
    "grad_out_ptr",
    "exchange_ptr",
)
FLOAT32_POINTERS = (
    "gates_ptr",
    "cells_ptr",
    "hfull_ptr",
    "dgates_ptr",
    "grad_h_ptr",
    "grad_c_ptr",
    "dhidden_ptr",
    "dhfull_ptr",
    "partials_ptr",
    "grad_h0_ptr",
    "grad_c0_ptr",
)
POINTER_TYPES = {
    **dict.fromkeys(STORAGE_POINTERS, "storage"),
    **dict.fromkeys(FLOAT32_POINTERS, "fp32"),
    **dict.fromkeys(("stats_ptr", "grad_ptr"), "fp64"),
    **dict.fromkeys(("lengths_ptr", "first_ptr", "seq_ptr"), "i64"),
    "flags_ptr": "i32",
    "restarts_ptr": "i1",
}
INTEGER_ARGUMENTS = ("T", "B", "H", "P", "order", "capacity", "step_begin", "step_end", "batch_group_base")
# Which switch of a variant makes an optional pointer present (absent pointers are compiled as None).
OPTIONAL_POINTERS = {
    "lengths_ptr": "lengths",
    **dict.fromkeys(("w_hr_ptr", "hfull_ptr", "dhidden_ptr", "dhfull_ptr"), "proj"),
    **dict.fromkeys(("stats_ptr", "grad_ptr", "first_ptr", "seq_ptr", "partials_ptr"), "telemetry"),
    "flags_ptr": "exchange",
    **dict.fromkeys(("restarts_ptr", "grad_h0_ptr", "grad_c0_ptr"), "resets"),
}


class Variant(NamedTuple):
    family: str  # "single" | "split" | "split-gluon" | "streaming"
    stage: str  # "forward" | "backward"
    dtype: str
    precision: str
    switches: frozenset  # of "reverse", "lengths", "telemetry", "proj", "exchange", "resets"
    config: tuple  # (name, value) pairs: the constexprs and launch options the plan sets
    # Compiled as triton specialises a launch whose tensors are 16-byte aligned and whose sizes are multiples of 16
    # (the usual case at real sizes); otherwise with no such hints.
    aligned: bool = True
    # The shared memory (bytes) of the devices the plan makes this variant for, where that sets its configuration
    # (the Gluon backward's copy slots); None: any device of the target architecture.
    shared_limit: int | None = None

    @property
    def name(self) -> str:
        flags = "".join(
            tag
            for tag, s in (
                ("R", "reverse"),
                ("L", "lengths"),
                ("T", "telemetry"),
                ("P", "proj"),
                ("X", "exchange"),
                ("E", "resets"),
            )
            if s in self.switches
        )
        config = "".join(f"{_short(k)}{v}" for k, v in self.config)
        suffix = "" if self.aligned else "-u"
        return f"{self.family}-{self.stage}-{self.dtype}-{self.precision}-{flags or '_'}-{config}{suffix}"


def _short(key: str) -> str:
    return {"num_warps": "w", "num_stages": "s", "maxnreg": "r"}.get(key, key.lower().replace("_", "")[:2])


def config_pairs(chosen, stage: str = "forward") -> tuple:
    """The constexpr and option pairs a planning.Plan sets for a pass, as a variant's `config`."""
    import triton

    cfg = chosen.config
    if chosen.kind == "single":
        return (
            ("BLOCK_B", cfg.block_b),
            ("H_PAD", cfg.h_pad),
            ("P_PAD", cfg.p_pad),
            ("num_warps", cfg.num_warps),
            ("maxnreg", cfg.maxnreg),
        )
    if chosen.kind == "split":
        return (
            ("UNITS", cfg.units),
            ("BLOCK_B", cfg.block_b),
            ("K_PAD", cfg.k_pad),
            ("K_SPLIT", cfg.k_split),
            ("MAX_PROGRAMS", triton.next_power_of_2(cfg.unit_groups)),
            ("ASM_FENCE", True),
            *((("COPY_SLOTS", cfg.copy_slots),) if chosen.implementation == "gluon" and stage == "backward" else ()),
            ("num_warps", cfg.num_warps),
            ("maxnreg", cfg.maxnreg),
        )
    return (
        ("BLOCK_B", cfg.block_b),
        ("BLOCK_H", cfg.block_h),
        ("BLOCK_K", cfg.block_k),
        ("num_warps", cfg.num_warps),
        ("num_stages", cfg.num_stages),
        ("maxnreg", cfg.maxnreg),
    )


def plan_variant(chosen, stage: str, dtype: str, precision: str, switches) -> Variant:
    """The variant a planning.Plan compiles for one pass, with the given switches."""
    family = "split-gluon" if chosen.implementation == "gluon" else chosen.kind
    return Variant(family, stage, dtype, precision, frozenset(switches), config_pairs(chosen, stage))


# ---------------------------------------------------------------------------------------------------------------
# Compiling one variant
# ---------------------------------------------------------------------------------------------------------------


def _not_specialized(fn) -> set:
    """The arguments a kernel marks do_not_specialize, from a JIT function or (under the interpreter, as the test
    suite runs) from the keywords its InterpretedFunction kept."""
    if hasattr(fn, "params"):
        return {fn.arg_names[p.num] for p in fn.params if p.do_not_specialize}
    return set(fn.kwargs.get("do_not_specialize") or ())


def kernel_of(variant: Variant):
    """The @triton.jit function (under its heuristics) a variant compiles."""
    from .backward import lstm_split_backward_kernel
    from .forward import lstm_split_forward_kernel
    from .single import lstm_single_backward_kernel, lstm_single_forward_kernel
    from .split_gluon_backward import lstm_split_backward_gluon_kernel
    from .split_gluon_forward import lstm_split_forward_gluon_kernel
    from .streaming import lstm_streaming_backward_kernel, lstm_streaming_forward_kernel

    return {
        ("single", "forward"): lstm_single_forward_kernel,
        ("single", "backward"): lstm_single_backward_kernel,
        ("split", "forward"): lstm_split_forward_kernel,
        ("split", "backward"): lstm_split_backward_kernel,
        ("split-gluon", "forward"): lstm_split_forward_gluon_kernel,
        ("split-gluon", "backward"): lstm_split_backward_gluon_kernel,
        ("streaming", "forward"): lstm_streaming_forward_kernel,
        ("streaming", "backward"): lstm_streaming_backward_kernel,
    }[(variant.family, variant.stage)]


def signature(variant: Variant):
    """(jit function, signature, constexprs, attributes) of a variant, derived from the kernel's argument list."""
    import triton.language as tl

    heuristics = kernel_of(variant)
    fn = heuristics.fn
    options = {k: v for k, v in variant.config if k in ("num_warps", "num_stages", "maxnreg")}
    constexprs = {k: v for k, v in variant.config if k not in options}
    constexprs.update(
        REVERSE="reverse" in variant.switches,
        DOT_PRECISION=variant.precision,
        DOT_DTYPE={"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[variant.dtype],
    )
    types, present = {}, {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name.endswith("_ptr"):
            if name not in POINTER_TYPES:
                raise KeyError(
                    f"{fn.__name__}: pointer argument {name!r} has no type in POINTER_TYPES (kernels/variant.py)"
                )
            needs = OPTIONAL_POINTERS.get(name)
            if needs is not None and needs not in variant.switches:
                constexprs[name] = None
                present[name] = None
                continue
            kind = POINTER_TYPES[name]
            types[name] = "*" + (variant.dtype if kind == "storage" else kind)
            present[name] = object()  # any non-None value: what the heuristics test
        elif name in INTEGER_ARGUMENTS:
            types[name] = "i32"
            present[name] = 16 if variant.aligned else 1  # a size as the specialisation sees it (heuristics test it)
        elif name not in heuristics.values:
            raise KeyError(f"{fn.__name__}: argument {name!r} is neither a pointer, a known integer nor a constexpr")
    for flag, rule in heuristics.values.items():
        constexprs[flag] = rule(present)
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    attrs = {}
    if variant.aligned:
        # What triton specialises at run time: 16-byte aligned tensors and integers divisible by 16, except the
        # integers the kernel marks do_not_specialize (those are compiled as any value).
        generic = _not_specialized(fn)
        for index, name in enumerate(fn.arg_names):
            if name in types and (types[name].startswith("*") or name not in generic):
                attrs[(index,)] = [["tt.divisibility", 16]]
    return fn, signature, constexprs, attrs, options


class Compiled(NamedTuple):
    fn: object  # the @triton.jit function (what the performance model reads the source of)
    kernel: object  # triton's CompiledKernel: asm["ptx"], asm["cubin"], metadata
    ptxas_log: str  # registers and spills; empty unless asked for


def compile_kernel(variant: Variant, arch: int = 90, ptxas_log: bool = False) -> Compiled:
    """One variant compiled for sm_<arch> without a GPU; raises what the compiler raises. With ptxas_log the cache
    is bypassed (a cache hit skips ptxas, and with it the log that reports registers and spills)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.experimental.gluon._runtime import GluonASTSource

    fn, sig, constexprs, attrs, options = signature(variant)
    source = (GluonASTSource if variant.family.endswith("-gluon") else ASTSource)(fn, sig, constexprs, attrs)
    log = io.StringIO()
    with contextlib.ExitStack() as stack:
        if ptxas_log:
            stack.enter_context(triton.knobs.nvidia.scope())
            stack.enter_context(triton.knobs.compilation.scope())
            triton.knobs.nvidia.dump_ptxas_log = True
            triton.knobs.compilation.always_compile = True
            stack.enter_context(contextlib.redirect_stdout(log))
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return Compiled(fn, kernel, log.getvalue())
