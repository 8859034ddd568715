"""Ahead-of-time compile check of every kernel variant the launcher can select, for sm_80 and sm_90, without a GPU.

For each variant it runs triton.compile against a GPUTarget, reads registers and spills from the ptxas log and the
shared memory from the metadata, and fails on a compile error, any spill, or shared memory above the chip's limit
(triton does not check that at compile time). `fastlstm aot` prints the table; CI runs the same matrix in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

# Per-block shared memory limits (bytes): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
DTYPES = ("fp32", "fp16", "bf16")
# Hidden/batch sizes whose configurations together cover every branch of launch.select_config.
CONFIG_PROBES = ((64, 1), (64, 1024), (2048, 1), (2048, 1024))
# Integer arguments that are multiples of 16 at real sizes (triton then compiles with that divisibility known).
ALIGNED_SIZES = ("T", "B", "H", "P", "capacity")


class Variant(NamedTuple):
    kernel: str  # "forward" | "backward" (tiled kernels) | "persistent-forward" | "persistent-backward"
    dtype: str
    reverse: bool
    lengths: bool
    proj: bool
    telemetry: bool
    block_b: int
    block_h: int
    block_k: int
    num_warps: int
    num_stages: int
    maxnreg: int
    precision: str
    grid_barrier: bool = False  # persistent kernels: all steps in one launch (True) or host-stepped
    # Compiled as triton specialises a launch whose tensors are 16-byte aligned and whose sizes (T, B, H, P and the
    # telemetry capacity) are multiples of 16, the usual case at real sizes; otherwise with no such hints.
    aligned: bool = False

    @property
    def name(self) -> str:
        tags = (
            ("R", self.reverse),
            ("L", self.lengths),
            ("P", self.proj),
            ("T", self.telemetry),
            ("G", self.grid_barrier),
        )
        flags = "".join(tag for tag, on in tags if on)
        return (
            f"{self.kernel}-{self.dtype}-{self.precision}-{flags or '_'}"
            f"-b{self.block_b}{'u' if self.kernel.startswith('persistent') else 'h'}{self.block_h}k{self.block_k}w{self.num_warps}s{self.num_stages}r{self.maxnreg}"
        )


class Result(NamedTuple):
    variant: Variant
    arch: int
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.spill_bytes == 0
            and self.shared_bytes is not None
            and self.shared_bytes <= SHARED_LIMIT[self.arch]
        )


def variants(quick: bool = False) -> list[Variant]:
    """Every (kernel, dtype, flags, config) the launcher can produce; `quick` keeps the flag combinations that
    change the kernel's resources the most (all flags on / all off)."""
    import torch

    from .launch import select_config

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    configs = sorted({select_config(h, h, b, torch_dtype[d]) + (d,) for h, b in CONFIG_PROBES for d in DTYPES})
    flag_sets = list(itertools.product((False, True), repeat=4))
    if quick:
        flag_sets = [(False,) * 4, (True,) * 4]
    result = []
    for kernel, (*config, dtype), flags in itertools.product(("forward", "backward"), configs, flag_sets):
        precisions = ("ieee", "tf32") if dtype == "fp32" else ("ieee",)
        for precision in precisions:
            result.append(Variant(kernel, dtype, *flags, *config, precision))
    return with_alignment(result + persistent_variants(quick), quick)


def with_alignment(variants: list[Variant], quick: bool) -> list[Variant]:
    """Each variant compiled without and with triton's alignment specialisation (`quick`: the latter only for the
    variants with every flag on, the largest)."""
    aligned = [v._replace(aligned=True) for v in variants if not quick or (v.reverse and v.lengths and v.telemetry)]
    return variants + aligned


def persistent_variants(quick: bool = False) -> list[Variant]:
    """The persistent kernels in both modes; they take no projection. `quick` keeps the all-flags-on kernel with
    its grid barrier and the all-flags-off host-stepped one."""
    import torch

    from .launch import persistent_config

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    flag_sets = list(itertools.product((False, True), repeat=4))
    if quick:
        flag_sets = [(True, True, True, True), (False, False, False, False)]
    result = []
    for kernel, dtype, (reverse, lengths, telemetry, barrier) in itertools.product(
        ("persistent-forward", "persistent-backward"), DTYPES, flag_sets
    ):
        for precision in ("ieee", "tf32") if dtype == "fp32" else ("ieee",):
            cfg = persistent_config(torch_dtype[dtype])
            config = (cfg.block_b, cfg.block_u, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.maxnreg)
            result.append(Variant(kernel, dtype, reverse, lengths, False, telemetry, *config, precision, barrier))
    return result


def _signature(variant: Variant):
    """The argument types and constexpr values of one variant, in the kernel's argument order."""
    import triton.language as tl

    from .persistent import lstm_persistent_backward_kernel, lstm_persistent_forward_kernel
    from .recurrent_bwd import lstm_backward_kernel
    from .recurrent_fwd import lstm_forward_kernel

    d = "*" + variant.dtype
    constexprs = {
        "REVERSE": variant.reverse,
        "HAS_LENGTHS": variant.lengths,
        "HAS_PROJ": variant.proj,
        "TELEMETRY": variant.telemetry,
        "BLOCK_B": variant.block_b,
        "BLOCK_H": variant.block_h,
        "BLOCK_K": variant.block_k,
        "DOT_PRECISION": variant.precision,
        "DOT_DTYPE": {"fp32": tl.float32, "fp16": tl.float16, "bf16": tl.bfloat16}[variant.dtype],
    }
    ints = {
        "T": "i32", "B": "i32", "H": "i32", "P": "i32", "capacity": "i32", "order": "i32", "step_begin": "i32",
        "step_end": "i32", "phases": "i32",
    }  # fmt: skip
    if variant.kernel.startswith("persistent"):
        del constexprs["HAS_PROJ"], constexprs["BLOCK_H"]
        constexprs.update(PERSISTENT=variant.grid_barrier, BLOCK_U=variant.block_h)
    if variant.kernel == "persistent-forward":
        fn = lstm_persistent_forward_kernel
        pointers = {
            "xw_ptr": d, "h0_ptr": d, "c0_ptr": d, "w_hh_ptr": d, "lengths_ptr": "*i64", "out_ptr": d,
            "gates_ptr": "*fp32", "cells_ptr": "*fp32", "hn_ptr": d, "cn_ptr": d, "stats_ptr": "*fp64",
            "first_ptr": "*i64", "seq_ptr": "*i64", "barrier_ptr": "*i32",
        }  # fmt: skip
    elif variant.kernel == "persistent-backward":
        fn = lstm_persistent_backward_kernel
        pointers = {
            "grad_out_ptr": d, "c0_ptr": d, "gates_ptr": "*fp32", "cells_ptr": "*fp32", "w_hh_ptr": d,
            "lengths_ptr": "*i64", "dgates_ptr": "*fp32", "dh_ptr": "*fp32", "dc_ptr": "*fp32", "grad_ptr": "*fp64",
            "first_ptr": "*i64", "seq_ptr": "*i64", "barrier_ptr": "*i32",
        }  # fmt: skip
    elif variant.kernel == "forward":
        fn = lstm_forward_kernel
        pointers = {
            "xw_ptr": d, "h0_ptr": d, "c0_ptr": d, "w_hh_ptr": d, "w_hr_ptr": d, "lengths_ptr": "*i64",
            "out_ptr": d, "gates_ptr": "*fp32", "cells_ptr": "*fp32", "hfull_ptr": "*fp32", "hn_ptr": d, "cn_ptr": d,
            "stats_ptr": "*fp64", "first_ptr": "*i64", "seq_ptr": "*i64",
        }  # fmt: skip
    else:
        fn = lstm_backward_kernel
        pointers = {
            "grad_out_ptr": d, "c0_ptr": d, "gates_ptr": "*fp32", "cells_ptr": "*fp32", "w_hh_ptr": d,
            "w_hr_ptr": d, "lengths_ptr": "*i64", "dgates_ptr": "*fp32", "dh_ptr": "*fp32", "dc_ptr": "*fp32",
            "dhidden_ptr": "*fp32", "dhfull_ptr": "*fp32", "grad_ptr": "*fp64", "first_ptr": "*i64", "seq_ptr": "*i64",
        }  # fmt: skip
    signature = {}
    for name in fn.arg_names:
        signature[name] = pointers.get(name) or ints.get(name) or "constexpr"
    attrs = {}
    if variant.aligned:
        for index, name in enumerate(fn.arg_names):
            if name in pointers or name in ALIGNED_SIZES:
                attrs[(index,)] = [["tt.divisibility", 16]]
    return fn, signature, constexprs, attrs


def compile_variant(variant: Variant, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = _signature(variant)
    log = io.StringIO()
    try:
        triton.knobs.nvidia.dump_ptxas_log = True
        triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and so its log
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": variant.num_warps, "num_stages": variant.num_stages, "maxnreg": variant.maxnreg},
            )
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report, not a crash of the matrix
        return Result(variant, arch, None, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    text = log.getvalue()
    registers = _last_int(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return Result(variant, arch, registers, sum(spills) if spills else None, compiled.metadata.shared, None)


def compile_kernel(variant: Variant, arch: int = 90):
    """(kernel function, triton's compiled kernel) of one variant for sm_<arch>, without a GPU: what the
    performance model (kernels/model.py) reads. Uses triton's cache, unlike compile_variant, which needs ptxas's log."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs = _signature(variant)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages, "maxnreg": variant.maxnreg}
    source = ASTSource(fn, signature, constexprs, attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    return fn, compiled


def _last_int(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def _compile_pair(args):
    return compile_variant(*args)


def _compiler_process():
    # The kernels must be real JIT functions here, even when the caller runs the interpreter (the test suite does):
    # workers start fresh (spawn) and clear the switch before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "0"


def run_matrix(quick: bool = False, jobs: int = 2) -> list[Result]:
    work = [(v, arch) for v in variants(quick) for arch in ARCHS]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, initializer=_compiler_process) as pool:
        return list(pool.map(_compile_pair, work, chunksize=4))


def format_table(results: list[Result]) -> str:
    lines = [f"{'variant':<66} {'sm':>3} {'regs':>5} {'spill':>6} {'shared':>8}  status"]
    for r in results:
        status = "ok" if r.ok else (r.error or "SPILL/SHARED")
        lines.append(
            f"{r.variant.name:<66} {r.arch:>3} {_cell(r.registers):>5} {_cell(r.spill_bytes):>6} "
            f"{_cell(r.shared_bytes):>8}  {status}"
        )
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlstm aot", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only the all-flags-off and all-flags-on variants")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    parser.add_argument("--model", action="store_true", help="run the performance model instead (fastlstm.kernels.model;"
                        " the options after --model are its own)")  # fmt: skip
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:
        from . import model

        return model.main([a for a in argv if a != "--model"])
    args = parser.parse_args(argv)
    results = run_matrix(quick=args.quick, jobs=args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} variant/arch compiles pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
