"""Choosing the module that runs the time loops of one layer-direction.

A backend is a module with `recurrence_forward` and `recurrence_backward` (signatures in reference.py).
"""

from __future__ import annotations

import os

import torch

from . import reference

BACKENDS = ("auto", "reference", "triton")


def check_backend_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Storage dtypes the kernels run; "auto" sends anything else (float64) to the reference backend.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs: "auto" means the kernels for CUDA tensors of a kernel dtype, else the reference."""
    if name == "auto":
        use_kernels = device.type == "cuda" and dtype in KERNEL_DTYPES and _triton_importable()
        return "triton" if use_kernels else "reference"
    if name == "triton":
        if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
            raise RuntimeError(
                f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
            )
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package; install it or use backend='reference'")
    return name


def backend_module(name: str):
    """The module with recurrence_forward/recurrence_backward for a resolved backend name."""
    if name == "reference":
        return reference
    from .kernels import launch

    return launch


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
