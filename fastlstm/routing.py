"""Which implementation runs a forward pass of fastlstm.LSTM (and so its backward): `choose`, the one place that
decides.

  native     PyTorch's own LSTM op, the one nn.LSTM calls (cuDNN on CUDA, PyTorch's CPU kernels elsewhere):
             fastlstm/native.py. Gives nn.LSTM's results and records no telemetry.
  triton     the fused kernels (fastlstm.kernels.launch) for CUDA tensors; CPU tensors under TRITON_INTERPRET=1.
  reference  the plain-torch specification (fastlstm/reference.py), any device.
  native-recorded
             PyTorch's own LSTM op layer by layer, the telemetry and the analytic backward's state rebuilt from its
             outputs (fastlstm/native_recorded.py): the results of native, the telemetry and gradients of reference.

triton and reference run layer by layer through fastlstm's own ops (function.py); they and native-recorded are what
records telemetry. Which Triton kernel variant runs is the launcher's choice (kernels/planning.py), not this module's.

backend="auto" pays for fastlstm's own implementations only where they are worth it:
  * a pass that records telemetry runs the kernels on CUDA (in their dtypes); on the CPU the reference where its
    loops run compiled (compiled_step_runs), native-recorded where it applies (native_records), and the
    reference elsewhere;
  * a pass that records none (telemetry=False, `telemetry.enabled = False`, an uninstrumented step of a sampling
    Monitor, an inference pass: Telemetry.records) runs natively, as nn.LSTM would, to the bit; except where a
    GPU measurement found the kernels faster (KERNELS_FASTER below), under torch.compile, and under CPU autocast
    (both of which PyTorch's op does not support, see _native_unsupported);
  * a pass with state resets (docs/resets.md) never runs natively: PyTorch's op cannot restart a state.
An explicit backend forces its implementation, with or without telemetry.

A pass that one of PyTorch's program transforms is tracing (torch.export and the ONNX exporters, torch.jit.trace,
torch.func) always runs natively, whatever the module's backend: the artifact then holds aten::lstm, which every
deployment target lowers, and the transform gets nn.LSTM's own rules. torch.jit.script compiles the native path
directly (module.py). torch.compile is not such a transform: it traces fastlstm's custom ops, telemetry included.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd import forward_ad

from . import constants as C
from . import fused_step, reference

BACKENDS = ("auto", "native", "reference", "triton")
NATIVE_RECORDED = "native-recorded"  # an implementation "auto" picks; not a backend a module can be given

# Storage dtypes the kernels run; "auto" sends anything else (float64) to the reference implementation.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def program_transform() -> str | None:
    """The PyTorch program transform tracing the current pass: "export", "tracing", "torch.func", "forward-mode
    AD", or None.

    Ordered so that Dynamo, which evaluates this function while it compiles or exports, only meets calls it folds
    into constants."""
    if torch.compiler.is_exporting():
        return "export"
    if torch.compiler.is_compiling():  # Dynamo answers the functorch query below for its own tracing, not the user's
        return None
    if torch.jit.is_tracing():
        return "tracing"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "torch.func"
    if forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): PyTorch's op has forward derivatives
        return "forward-mode AD"
    return None


class PassShape(NamedTuple):
    """What the measured table distinguishes about a pass."""

    hidden_size: int
    proj_size: int
    num_layers: int
    bidirectional: bool
    packed: bool
    batch: int
    steps: int


@dataclasses.dataclass(frozen=True)
class KernelsFaster:
    """A region of shapes (inclusive ranges) where a GPU benchmark measured the kernels faster than cuDNN for
    passes that record no telemetry."""

    dtype: torch.dtype
    hidden: tuple[int, int]
    batch: tuple[int, int]
    steps: tuple[int, int]
    num_layers: tuple[int, int] = (1, 1)
    bidirectional: bool = False
    projected: bool = False
    packed: bool = False

    def covers(self, dtype: torch.dtype, shape: PassShape) -> bool:
        return (
            dtype == self.dtype
            and self.hidden[0] <= shape.hidden_size <= self.hidden[1]
            and self.batch[0] <= shape.batch <= self.batch[1]
            and self.steps[0] <= shape.steps <= self.steps[1]
            and self.num_layers[0] <= shape.num_layers <= self.num_layers[1]
            and shape.bidirectional == self.bidirectional
            and (shape.proj_size > 0) == self.projected
            and shape.packed == self.packed
        )


# Where fastlstm's kernels beat cuDNN for uninstrumented passes, so that backend="auto" runs them there too. Written
# by hand from a GPU run of `fastlstm bench` (the `fastlstm-notelemetry` provider against `nn.LSTM`, forward and
# forward+backward both faster) whose results.json lies under benchmarks/results/; KERNELS_FASTER_SOURCE names
# that file. The package never reads benchmarks/ (it is not installed with it). Empty: no GPU run exists yet.
KERNELS_FASTER_SOURCE: str | None = None
KERNELS_FASTER: tuple[KernelsFaster, ...] = ()


def choose(
    backend: str,
    device: torch.device,
    dtype: torch.dtype,
    *,
    records_telemetry: bool = True,
    shape: Callable[[], PassShape] | None = None,
    resets: bool = False,
) -> str:
    """The implementation ("native" | "triton" | "reference" | NATIVE_RECORDED) that runs one pass of a module whose
    backend setting is `backend`, on input of this device and dtype. `records_telemetry`: whether the pass records
    telemetry (Telemetry.records); `shape`: returns the pass's PassShape, called only where KERNELS_FASTER could
    apply; `resets`: whether the pass restarts states inside the loop, which PyTorch's op cannot do (docs/resets.md),
    so such a pass runs fastlstm's own ops, never native-recorded."""
    if backend == "native" or program_transform() is not None:
        if resets:
            raise RuntimeError(_NATIVE_RESETS.format(why=program_transform() or "backend='native'"))
        return "native"
    if backend == "auto":
        kernels = device.type == "cuda" and dtype in KERNEL_DTYPES and _triton_importable()
        fused = "triton" if kernels else "reference"
        if resets or _native_unsupported(device):
            return fused
        if records_telemetry:
            if kernels or not native_records(device, dtype):
                return fused
            return "reference" if compiled_step_runs(dtype, shape) else NATIVE_RECORDED
        if kernels and shape is not None and any(region.covers(dtype, shape()) for region in KERNELS_FASTER):
            return "triton"
        return "native"
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and C.triton_interpreter_on()):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
            )
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='reference'")
    return backend


_NATIVE_RESETS = (
    "fastlstm.LSTM: resets need fastlstm's own ops, and this pass runs PyTorch's LSTM op ({why}), which cannot "
    "restart states inside a sequence; run the segments between resets as separate calls there (docs/resets.md)"
)


# Storage dtypes native-recorded takes. 16-bit passes stay on the reference: PyTorch's CPU op computes them in its
# own mixed precision (oneDNN bf16), which the analytic backward's float32 state would not mirror.
NATIVE_RECORDED_DTYPES = (torch.float32, torch.float64)


def native_records(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a recording pass under "auto" may run native-recorded: on the CPU (on CUDA the kernels record), in
    NATIVE_RECORDED_DTYPES. A pass with resets never gets here: choose() sends it to the reference first."""
    return device.type == "cpu" and dtype in NATIVE_RECORDED_DTYPES


def compiled_step_runs(dtype: torch.dtype, shape: Callable[[], PassShape] | None) -> bool:
    """Whether every step loop of a recording CPU pass would run compiled (fused_step.py: float32, no lengths, no
    projection), which makes the reference faster than native-recorded there: native-recorded runs
    PyTorch's op and then the same products again to rebuild the gates, the reference runs the products once.
    Measured with torch 2.13.0+cpu on a 2-core AMD EPYC machine (AVX-512), two threads, at the CPU targets' four
    shapes (benchmarks/README.md), time over nn.LSTM's, reference with the compiled step against native-recorded:
    forward 2.41 / 2.08 / 2.84 / 1.54x against 3.32 / 2.82 / 4.10 / 2.70x, forward+backward 1.89 / 1.41 / 1.20 /
    1.57x against 2.22 / 1.66 / 1.16 / 1.74x (medians of 5 alternated rounds in one process)."""
    if dtype != torch.float32 or shape is None:
        return False
    pass_shape = shape()
    return not pass_shape.packed and pass_shape.proj_size == 0 and fused_step.library() is not None


def _native_unsupported(device: torch.device) -> bool:
    """Eager settings under which PyTorch's LSTM op fails where fastlstm's own ops work (torch 2.13): inside
    torch.compile (Dynamo refuses nn.LSTM, and the op's CPU kernel fails in a compiled graph), and under CPU
    autocast (oneDNN rejects the bfloat16 LSTM on CPUs without its bf16 support; with AVX512-BF16 or AMX it runs,
    but a module cannot know in advance). Those passes stay on fastlstm's ops, without telemetry."""
    return torch.compiler.is_compiling() or (device.type == "cpu" and torch.is_autocast_enabled("cpu"))


def time_loops(implementation: str):
    """The module with recurrence_forward/recurrence_backward (the kernel contract, reference.py) for "reference"
    or "triton"."""
    if implementation == "reference":
        return reference
    from .kernels import launch

    return launch


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
