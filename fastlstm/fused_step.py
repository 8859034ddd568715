"""The CPU step loops, whole, as one compiled call per loop (csrc/step_loop.c, csrc/fused_step.c).

reference.py's loops issue, per step, a matrix product (one BLAS call) and six to nine pointwise PyTorch ops in the
forward, four in the backward. On the CPU each op costs a few microseconds of dispatch whatever its size and a pass
over the step's rows, and the BLAS splits a product of a few rows poorly between threads: measured with torch
2.13.0+cpu on a 2-core AMD EPYC machine (AVX-512), two threads, input 32, hidden 128, batch 32, 100 steps, the
forward loop's pointwise ops took about 150 µs a step and its product 40 µs. The compiled loop runs every step's
product (its own register-tiled one) and pointwise work, and with telemetry the step's reductions while its rows are
in cache, shared by sequence or by hidden unit across PyTorch's OpenMP threads (step_loop.c says why those and how):
on a 2-core AMD EPYC with AVX2 only, a training pass at that shape took 0.71x the time of the per-step loop around
one compiled call for the pointwise work (9 alternated rounds in one process, medians of the round ratios; 0.83x at
input 64, hidden 256, two layers, batch 16, 200 steps; 0.59x at input 8, hidden 64, batch 64, 500 steps; 0.96x at
input 128, hidden 512, batch 8, 100 steps, 0.74x with W_hh read tile by tile; 0.53-0.59x at batch 1-4; 0.43x at
hidden 1024, batch 16, where the per-step loop's products ran through oneDNN's reordered weight: benchmarks/README.md,
"On a fourth machine").

The C sources are compiled on first use with the machine's C compiler (`cc`, or $CC) into a cache folder
($FASTLSTM_CACHE_DIR, else fastlstm/ under $XDG_CACHE_HOME or ~/.cache), named by a hash of the sources, compiler
and flags, and loaded with ctypes: no PyTorch headers, so a compile takes a fraction of a second. Without a
compiler, or when the compile fails, or with FASTLSTM_FUSED_STEP=0, the loops run their PyTorch ops as before; the
two differ only in float rounding (the sigmoid here is a polynomial of its own, within a few ulp of PyTorch's, and
the product adds in its own order).

What the compiled loops cover: float32, no lengths, no restarts, no projection (reference.py checks, and runs its
ops otherwise). The instruction set is chosen from what PyTorch itself detected on the machine (AVX-512, AVX2 or
neither), so a cache shared between machines never hands one a library built for instructions it lacks.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import is_fake

_CSRC = Path(__file__).with_name("csrc")
_SOURCES = (_CSRC / "fused_step.c", _CSRC / "step_loop.c")
_HEADERS = (_CSRC / "fused_step.h",)
# -O3 vectorises the loops; never -ffast-math (the C file says why). -fno-math-errno only lets the compiler skip errno;
# -fno-trapping-math lets it compute both sides of a select (the sigmoid's), which it must to vectorise a loop with
# one where the vector unit has no masked arithmetic: without it GCC 12 left the sigmoid loops scalar under AVX2, and
# a forward step at batch 32, hidden 128 took 166 µs instead of 34 µs (2-core AMD EPYC with AVX2 only, 500 calls).
# It changes no result: NaN and inf propagate as before; only floating-point traps, which nothing here enables, are
# assumed off. -ffp-contract=fast fuses a multiply and an add into one FMA where the ISA flags allow it (-std=c11
# alone forbids that): one rounding instead of two, and the forward step 26 -> 20 µs on that machine (interleaved
# calls, best of 15 rounds of 200).
_BASE_FLAGS = (
    "-O3",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-std=c11",
)
# The loops' threads (csrc/step_loop.c says why they are OpenMP's). A compiler without OpenMP builds them without it,
# and they run on one thread.
_OPENMP_FLAGS = ("-fopenmp",)
_ISA_FLAGS = {
    "AVX512": ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mavx2", "-mfma"),
    "AVX2": ("-mavx2", "-mfma"),
}
COMPILE_TIMEOUT_S = 120
_FLOAT_P, _INT64 = ctypes.c_void_p, ctypes.c_int64


def enabled() -> bool:
    return os.environ.get("FASTLSTM_FUSED_STEP", "1") != "0"


def _cache_dir() -> Path:
    if os.environ.get("FASTLSTM_CACHE_DIR"):
        return Path(os.environ["FASTLSTM_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlstm"


def _isa_flags() -> tuple:
    if sys.platform == "darwin" or not hasattr(torch.backends, "cpu"):
        return ()
    return _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), ())


def _compile(compiler: str, flags: tuple, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: processes compiling at once (DDP ranks) never load a partial file.
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        built = Path(work) / target.name
        subprocess.run(
            [compiler, *flags, *(str(source) for source in _SOURCES), "-o", str(built)],
            check=True,
            capture_output=True,
            timeout=COMPILE_TIMEOUT_S,
        )
        os.replace(built, target)


@functools.cache
def library():
    """The loaded library, or None when it cannot be built here (a warning, once, says why)."""
    if not enabled():
        return None
    compiler = shutil.which(os.environ.get("CC", "cc"))
    if compiler is None:
        return None  # no compiler: the PyTorch ops, silently, as on any machine without one
    text = b"".join(path.read_bytes() for path in (*_SOURCES, *_HEADERS))
    error = None
    for flags in (_BASE_FLAGS + _OPENMP_FLAGS + _isa_flags(), _BASE_FLAGS + _isa_flags()):
        key = hashlib.sha256(text + repr((compiler, flags)).encode()).hexdigest()[:16]
        target = _cache_dir() / f"fused_step-{key}.so"
        try:
            if not target.exists():
                _compile(compiler, flags, target)
            lib = ctypes.CDLL(str(target))
            break
        except (OSError, subprocess.SubprocessError) as failure:
            error = failure
    else:
        detail = getattr(error, "stderr", b"") or b""
        warnings.warn(
            f"fastlstm: the fused CPU step could not be built ({error}; {detail.decode(errors='replace')[:500]}); "
            "the CPU step loops run PyTorch ops instead",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    lib.fastlstm_forward_loop.argtypes = [_FLOAT_P] * 7 + [_INT64] * 5 + [ctypes.c_void_p]
    lib.fastlstm_forward_loop.restype = ctypes.c_int
    lib.fastlstm_backward_loop.argtypes = [_FLOAT_P] * 13 + [_INT64] * 5 + [ctypes.c_void_p]
    lib.fastlstm_backward_loop.restype = ctypes.c_int
    return lib


def run_loop(loop, tensors, steps: int, batch: int, hidden: int, reverse: bool, stats) -> None:
    """Calls a compiled loop (the library's fastlstm_forward_loop or fastlstm_backward_loop) on the memory of
    `tensors`, in the order of its C arguments, with torch's thread count and `stats` (ForwardStats, BackwardStats or
    None); raises MemoryError when it could not allocate its working memory (it then computed nothing)."""
    status = loop(
        *(t.data_ptr() for t in tensors),
        steps,
        batch,
        hidden,
        reverse,
        torch.get_num_threads(),
        None if stats is None else stats.pointer,
    )
    if status != 0:
        raise MemoryError(
            "fastlstm: the compiled CPU loop could not allocate its copy of W_hh or its per-thread reductions"
        )


def applies(*tensors) -> bool:
    """Whether the compiled loops can take a loop over these tensors: real float32 CPU tensors, contiguous (their
    memory is handed to C as it is), and the library built."""
    for t in tensors:
        if t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or is_fake(t):
            return False
    return library() is not None


class _ForwardStatsStruct(ctypes.Structure):
    _fields_ = [  # csrc/fused_step.c, forward_stats
        ("pre_nonfinite", ctypes.c_void_p),
        ("cell_nonfinite", ctypes.c_void_p),
        ("cell_absmax", ctypes.c_void_p),
        ("saturated", ctypes.c_void_p),
        ("forget_sum", ctypes.c_void_p),
        ("low", ctypes.c_float * 4),
        ("high", ctypes.c_float),
    ]


class ForwardStats:
    """What a recording compiled forward loop reduces as it goes, for reference_telemetry.record_reduced:
    per step whether a pre-activation and whether a cell state is NaN/inf and the largest |c_t|, over all steps the
    saturated gates of each block (below low[k] or above high) and the sum of the forget gate."""

    def __init__(self, steps: int, low: tuple, high: float):
        self.pre_nonfinite = torch.zeros(steps, dtype=torch.int32)
        self.cell_nonfinite = torch.zeros(steps, dtype=torch.int32)
        self._cell_absmax_bits = torch.zeros(steps, dtype=torch.int32)  # |c_t|'s bits: see magnitude_bits in the C
        self.saturated = torch.zeros(4, dtype=torch.int64)
        self.forget_sum = torch.zeros(1, dtype=torch.float64)
        fields = (self.pre_nonfinite, self.cell_nonfinite, self._cell_absmax_bits, self.saturated, self.forget_sum)
        self._struct = _ForwardStatsStruct(*(t.data_ptr() for t in fields), (ctypes.c_float * 4)(*low), high)
        self.pointer = ctypes.addressof(self._struct)

    @property
    def cell_absmax(self) -> torch.Tensor:
        return self._cell_absmax_bits.view(torch.float32)


class _BackwardStatsStruct(ctypes.Structure):
    _fields_ = [  # csrc/fused_step.c, backward_stats
        ("hidden_nonfinite", ctypes.c_void_p),
        ("cell_nonfinite", ctypes.c_void_p),
        ("gates_nonfinite", ctypes.c_void_p),
        ("hidden_sumsq", ctypes.c_void_p),
        ("cell_sumsq", ctypes.c_void_p),
    ]


class BackwardStats:
    """What a recording compiled backward loop reduces as it goes, for reference_telemetry.record_backward:
    per step whether dL/dh_t, dL/dc_t and the gate gradients are NaN/inf, and the squared norms of dL/dh_t and
    dL/dc_t (float64)."""

    def __init__(self, steps: int):
        self.hidden_nonfinite, self.cell_nonfinite, self.gates_nonfinite = (
            torch.zeros(steps, dtype=torch.int32) for _ in range(3)
        )
        self.hidden_sumsq, self.cell_sumsq = (torch.zeros(steps, dtype=torch.float64) for _ in range(2))
        fields = (self.hidden_nonfinite, self.cell_nonfinite, self.gates_nonfinite, self.hidden_sumsq, self.cell_sumsq)
        self._struct = _BackwardStatsStruct(*(t.data_ptr() for t in fields))
        self.pointer = ctypes.addressof(self._struct)
