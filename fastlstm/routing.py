"""Which implementation runs a forward pass of fastlstm.LSTM (and so its backward).

  native     PyTorch's own LSTM op, the one nn.LSTM calls (cuDNN on CUDA, PyTorch's CPU kernels elsewhere):
             fastlstm/native.py. Gives nn.LSTM's results and records no telemetry.
  triton     the fused kernels (fastlstm.kernels.launch) for CUDA tensors; CPU tensors under TRITON_INTERPRET=1.
  reference  the plain-torch specification (fastlstm/reference.py), any device.

The last two run layer by layer through fastlstm's own ops (function.py) and record telemetry; which Triton kernel
variant runs is the launcher's choice (kernels/launch.py), not this module's.

A pass that one of PyTorch's program transforms is tracing (torch.export and the ONNX exporters, torch.jit.trace,
torch.func) always runs natively, whatever the module's backend: the artifact then holds aten::lstm, which every
deployment target lowers, and the transform gets nn.LSTM's own rules. torch.jit.script compiles the native path
directly (module.py). torch.compile is not such a transform: it traces fastlstm's custom ops, telemetry included.
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("auto", "native", "reference", "triton")

# Storage dtypes the kernels run; "auto" sends anything else (float64) to the reference implementation.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def program_transform() -> str | None:
    """The PyTorch program transform tracing the current pass: "export", "tracing", "torch.func", or None.

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
    return None


def choose(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation ("native" | "triton" | "reference") that runs one pass of a module whose backend setting
    is `backend`, on input of this device and dtype."""
    if backend == "native" or program_transform() is not None:
        return "native"
    if backend == "auto":
        use_kernels = device.type == "cuda" and dtype in KERNEL_DTYPES and _triton_importable()
        return "triton" if use_kernels else "reference"
    if backend == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
            )
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='reference'")
    return backend


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
