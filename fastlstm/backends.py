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


def resolve(name: str, device: torch.device):
    """The backend module for `name` on `device`. "auto": the kernels on CUDA, the reference elsewhere."""
    if name == "auto":
        name = "triton" if device.type == "cuda" and _triton_importable() else "reference"
    if name == "reference":
        return reference
    if device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"
        )
    if not _triton_importable():
        raise RuntimeError("backend='triton' needs the triton package; install it or use backend='reference'")
    from .kernels import launch

    return launch


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
