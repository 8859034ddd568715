"""The Triton backend: launchers with the same signatures and results as fastlstm.reference.

Chooses a kernel configuration, allocates outputs, checks what the kernels cannot, and launches
recurrent_fwd.lstm_forward_kernel / recurrent_bwd.lstm_backward_kernel.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton

from fastlstm import constants as C
from fastlstm.reference import BackwardResult, ForwardResult

from .recurrent_bwd import lstm_backward_kernel
from .recurrent_fwd import lstm_forward_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to fill every output with NaN before a kernel writes it, so an element a kernel forgets to write
# fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


class KernelConfig(NamedTuple):
    block_b: int  # sequences per program
    block_h: int  # hidden units (or projected units) per tile
    block_k: int  # reduction chunk of the tl.dot calls
    num_warps: int


def select_config(hidden: int, proj: int, batch: int, dtype: torch.dtype) -> KernelConfig:
    """Tile sizes from the problem shape (documented in the README's kernel section).

    tl.dot needs every dimension >= 16 on the GPU, so 16 is the floor everywhere. Wider batch tiles use the tensor
    cores better but leave SMs idle when B is small, so a batch tile grows only once there are more sequences than
    ~2 per SM; unit tiles grow with the hidden size to cut loop overhead.
    """
    block_b = 16 if batch <= 256 else 32
    block_h = 32 if max(hidden, proj) <= 256 else 64
    block_k = 32
    num_warps = 4 if block_b * block_h <= 1024 else 8
    return KernelConfig(block_b, block_h, block_k, num_warps)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting, as nn.LSTM's cuBLAS/cuDNN GEMMs do: TF32 only when allowed."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def check_supported(xw: torch.Tensor) -> None:
    if xw.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the triton backend supports float32, float16 and bfloat16, got {xw.dtype}; "
            "use backend='reference' (or 'auto', which falls back to it)"
        )
    if xw.device.type != "cuda" and not _interpreting():
        raise RuntimeError("the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _new(shape, dtype, device):
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _key_base(stage: int, slot: int) -> int:
    return (stage << C.SLOT_BITS) | slot


def _telemetry_args(probe, stage, placeholder):
    """(stats-or-gradnorm pointer, marks pointer, key base); the launch counter is bumped in stream order first."""
    if probe is None:
        return placeholder, placeholder, 0
    probe.marks[C.MARK_LAUNCHES] += 1
    target = probe.stats if stage == C.STAGE_FORWARD else probe.grad[C.GRAD_SUMSQ]
    return target, probe.marks, _key_base(stage, probe.slot)


def recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse: bool, probe=None) -> ForwardResult:
    check_supported(xw)
    steps, batch, four_h = xw.shape
    hidden, proj = four_h // 4, h0.shape[-1]
    dtype, device = xw.dtype, xw.device
    xw, h0, c0, w_hh = (t.contiguous() for t in (xw, h0, c0, w_hh))
    w_hr = None if w_hr is None else w_hr.contiguous()
    out = _new((steps, batch, proj), dtype, device)
    gates = _new((steps, batch, four_h), torch.float32, device)
    cells = _new((steps, batch, hidden), torch.float32, device)
    h_n = _new((batch, proj), dtype, device)
    c_n = _new((batch, hidden), dtype, device)
    hfull = _new((batch, hidden), torch.float32, device) if w_hr is not None else gates
    stats, marks, key_base = _telemetry_args(probe, C.STAGE_FORWARD, gates)
    if batch > 0:
        cfg = select_config(hidden, proj, batch, dtype)
        lstm_forward_kernel[(triton.cdiv(batch, cfg.block_b),)](
            xw, h0, c0, w_hh, w_hh if w_hr is None else w_hr, xw if lengths is None else lengths,
            out, gates, cells, hfull, h_n, c_n,
            stats, marks, key_base,
            steps, batch, hidden, proj,
            REVERSE=reverse, HAS_LENGTHS=lengths is not None, HAS_PROJ=w_hr is not None, TELEMETRY=probe is not None,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(dtype),
            num_warps=cfg.num_warps,
        )  # fmt: skip
    return ForwardResult(out, h_n, c_n, (gates, cells))


def recurrence_backward(grad_out, grad_hn, grad_cn, c0, saved, w_hh, w_hr, lengths, reverse: bool, probe=None):
    gates, cells = saved
    steps, batch, four_h = gates.shape
    hidden, proj = four_h // 4, grad_hn.shape[-1]
    device = gates.device
    grad_out, c0, w_hh = (t.contiguous() for t in (grad_out, c0, w_hh))
    w_hr = None if w_hr is None else w_hr.contiguous()
    dgates = _new((steps, batch, four_h), torch.float32, device)
    # The carried gradients start as dL/dh_n, dL/dc_n and end as dL/dh0, dL/dc0.
    grad_h = grad_hn.to(torch.float32, copy=True).contiguous()
    grad_c = grad_cn.to(torch.float32, copy=True).contiguous()
    dhidden = _new((steps, batch, proj), torch.float32, device) if w_hr is not None else None
    dhfull = _new((batch, hidden), torch.float32, device) if w_hr is not None else dgates
    gradnorm, marks, key_base = _telemetry_args(probe, C.STAGE_BACKWARD, dgates)
    if probe is not None:
        probe.grad[C.GRAD_PASSES, :steps] += 1
    if batch > 0:
        cfg = select_config(hidden, proj, batch, grad_out.dtype)
        lstm_backward_kernel[(triton.cdiv(batch, cfg.block_b),)](
            grad_out, c0, gates, cells, w_hh, w_hh if w_hr is None else w_hr, gates if lengths is None else lengths,
            dgates, grad_h, grad_c, dgates if dhidden is None else dhidden, dhfull,
            gradnorm, marks, key_base,
            steps, batch, hidden, proj,
            REVERSE=reverse, HAS_LENGTHS=lengths is not None, HAS_PROJ=w_hr is not None, TELEMETRY=probe is not None,
            BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(w_hh.dtype),
            num_warps=cfg.num_warps,
        )  # fmt: skip
    hidden_full = None
    if w_hr is not None:
        hidden_full = gates[..., 3 * hidden :] * torch.tanh(cells)
    return BackwardResult(dgates, grad_h, grad_c, dhidden, hidden_full)
