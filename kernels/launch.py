"""The Triton backend: launchers with the same signatures and results as fastlstm.reference.

Chooses a kernel and its configuration, allocates outputs, checks what the kernels cannot, and launches
recurrent_fwd.lstm_forward_kernel / recurrent_bwd.lstm_backward_kernel (one program per tile of sequences) or
persistent.lstm_persistent_forward_kernel / lstm_persistent_backward_kernel (one program per slice of hidden units).
"""

from __future__ import annotations

import contextlib
import itertools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastlstm.reference import BackwardResult, ForwardResult

from .persistent import lstm_persistent_backward_kernel, lstm_persistent_forward_kernel
from .recurrent_bwd import lstm_backward_kernel
from .recurrent_fwd import lstm_forward_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to fill every output with NaN before a kernel writes it, so an element a kernel forgets to write
# fails the comparison instead of passing by luck.
POISON_OUTPUTS = False

# When the persistent kernels run: "off" (the default until a GPU run shows them faster than cuDNN where they
# apply), "on" (wherever they apply: see persistent_applies), or "host-stepped" (wherever they apply, one launch
# per step without the grid barrier: the mode the interpreter tests run, slow on a GPU). FASTLSTM_PERSISTENT sets it.
PERSISTENT_MODES = ("off", "on", "host-stepped")
PERSISTENT = os.environ.get("FASTLSTM_PERSISTENT", "off")


class KernelConfig(NamedTuple):
    block_b: int  # sequences per program
    block_h: int  # hidden units (or projected units) per tile
    block_k: int  # reduction chunk of the tl.dot calls
    num_warps: int
    num_stages: int  # software pipelining depth of the reduction loops
    maxnreg: int  # register cap handed to ptxas


def select_config(hidden: int, proj: int, batch: int, dtype: torch.dtype) -> KernelConfig:
    """Tile sizes for a problem (the README's kernel section explains the choice).

    tl.dot needs every dimension >= 16 on the GPU. A program owns all units of its BLOCK_B sequences, so wider
    tiles only add registers. The AOT matrix (kernels/aot.py: ptxas for sm_80 and sm_90) showed BLOCK_B=32,
    BLOCK_H=64, BLOCK_K=32, 4 warps or pipelined reduction loops each spilling in some variant, while 16 x 32 tiles
    with 16-wide reductions on 8 warps, unpipelined, fit all of them once ptxas may use 255 registers (its own
    default capped some variants at 128 and spilled). Large batches get more programs rather than
    larger tiles, which also fills more SMs. The arguments are kept so shape-dependent choices can come back once
    GPU measurements justify them.
    """
    return KernelConfig(block_b=16, block_h=32, block_k=16, num_warps=8, num_stages=1, maxnreg=255)


class PersistentConfig(NamedTuple):
    block_b: int  # sequences per tile; a program walks every tile of the batch each step
    block_u: int  # hidden units per program (its slice is the 4 * block_u gate rows of W_hh)
    block_k: int  # reduction chunk
    num_warps: int
    num_stages: int  # software pipelining of the reduction loops
    maxnreg: int


PERSISTENT_BLOCK_U = 16  # one for every dtype, so the grid size (and so co-residency) does not depend on it


def persistent_config(dtype: torch.dtype) -> PersistentConfig:
    """16 units per program puts H=2048 on 128 programs, within the H200's 132 SMs. Each step's products read
    h_{t-1} (or the gate gradients) from L2 chunk by chunk, so their latency is paid once per chunk unless the loop
    is pipelined: 16-bit runs 64-wide chunks three deep, the deepest and widest with which every variant, aligned or
    not, compiled without spills (kernels/aot.py). fp32 stays unpipelined: its exact (ieee) dots run on FMA units
    and spilled the backward with even two stages. A choice by the compile matrix and by reasoning about latency;
    no GPU has timed it yet."""
    if dtype == torch.float32:
        return PersistentConfig(16, PERSISTENT_BLOCK_U, block_k=32, num_warps=8, num_stages=1, maxnreg=255)
    return PersistentConfig(16, PERSISTENT_BLOCK_U, block_k=64, num_warps=8, num_stages=3, maxnreg=255)


# Every program walks the whole batch each step, one 16-sequence tile after another: built for the small batches
# where one program per sequence tile leaves most SMs idle, and unmeasured beyond them.
PERSISTENT_MAX_BATCH = 64


@contextlib.contextmanager
def persistent_mode(mode: str):
    """PERSISTENT = mode inside the block (restored after): how a benchmark or test pins the kernel choice for
    launches it makes, forward and backward alike."""
    global PERSISTENT
    if mode not in PERSISTENT_MODES:
        raise ValueError(f"persistent mode must be one of {PERSISTENT_MODES}, got {mode!r}")
    previous, PERSISTENT = PERSISTENT, mode
    try:
        yield
    finally:
        PERSISTENT = previous


def persistent_programs(hidden: int) -> int:
    return triton.cdiv(hidden, PERSISTENT_BLOCK_U)


def persistent_applies(hidden: int, proj: int, batch: int, steps: int, device: torch.device) -> bool:
    """Whether the persistent kernels run this layer: no projection, 1..PERSISTENT_MAX_BATCH sequences, at least one
    step, and (for a real launch, which spins on a grid barrier) no more programs than SMs, so that all of them are
    resident at once."""
    if PERSISTENT not in PERSISTENT_MODES:
        raise ValueError(f"FASTLSTM_PERSISTENT must be one of {PERSISTENT_MODES}, got {PERSISTENT!r}")
    if PERSISTENT == "off" or proj != hidden or not 0 < batch <= PERSISTENT_MAX_BATCH or steps == 0:
        return False
    if _host_stepped():
        return True
    return persistent_programs(hidden) <= _multiprocessors(device)


def _host_stepped() -> bool:
    return PERSISTENT == "host-stepped" or _interpreting()


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 follows torch's matmul setting, as nn.LSTM's cuBLAS/cuDNN GEMMs do: TF32 only when allowed."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def dot_dtype(dtype: torch.dtype):
    """The tl.dot operand type: the storage type, except bf16 under the interpreter, whose bf16 dot returns garbage
    (triton 3.6), so those tests run the dot in fp32 while every load, store and conversion stays bf16."""
    if dtype == torch.bfloat16 and _interpreting():
        return tl.float32
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


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


def _telemetry_args(probe, placeholder):
    """(stats-or-gradient rows, first-key pointer, pass-number pointer, launch order) of a StageProbe."""
    if probe is None:
        return placeholder, placeholder, placeholder, 0
    return probe.target, probe.first, probe.seq, probe.order


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
    stats, first, seq, order = _telemetry_args(probe, gates)
    if persistent_applies(hidden, proj, batch, steps, device):
        with torch.cuda.device_of(xw):
            _launch_persistent(
                lstm_persistent_forward_kernel,
                (xw, h0, c0, w_hh, xw if lengths is None else lengths, out, gates, cells, h_n, c_n,
                 stats, first, seq, order),
                steps, batch, hidden, reverse, lengths is not None, probe is not None, dtype,
            )  # fmt: skip
    elif batch > 0:
        cfg = select_config(hidden, proj, batch, dtype)
        with torch.cuda.device_of(xw):  # triton launches on the current device, not on the tensors' one
            lstm_forward_kernel[(triton.cdiv(batch, cfg.block_b),)](
                xw, h0, c0, w_hh, w_hh if w_hr is None else w_hr, xw if lengths is None else lengths,
                out, gates, cells, hfull, h_n, c_n,
                stats, first, seq, order,
                steps, batch, hidden, proj,
                REVERSE=reverse, HAS_LENGTHS=lengths is not None, HAS_PROJ=w_hr is not None,
                TELEMETRY=probe is not None, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
                DOT_PRECISION=dot_precision(dtype), DOT_DTYPE=dot_dtype(dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
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
    grad_rows, first, seq, order = _telemetry_args(probe, dgates)
    if persistent_applies(hidden, proj, batch, steps, device):
        with torch.cuda.device_of(gates):
            _launch_persistent(
                lstm_persistent_backward_kernel,
                (grad_out, c0, gates, cells, w_hh, gates if lengths is None else lengths, dgates, grad_h, grad_c,
                 grad_rows, grad_rows.shape[-1], first, seq, order),
                steps, batch, hidden, reverse, lengths is not None, probe is not None, w_hh.dtype,
            )  # fmt: skip
    elif batch > 0:
        cfg = select_config(hidden, proj, batch, grad_out.dtype)
        with torch.cuda.device_of(gates):
            lstm_backward_kernel[(triton.cdiv(batch, cfg.block_b),)](
                grad_out, c0, gates, cells, w_hh, w_hh if w_hr is None else w_hr,
                gates if lengths is None else lengths,
                dgates, grad_h, grad_c, dgates if dhidden is None else dhidden, dhfull,
                grad_rows, grad_rows.shape[-1], first, seq, order,
                steps, batch, hidden, proj,
                REVERSE=reverse, HAS_LENGTHS=lengths is not None, HAS_PROJ=w_hr is not None,
                TELEMETRY=probe is not None, BLOCK_B=cfg.block_b, BLOCK_H=cfg.block_h, BLOCK_K=cfg.block_k,
                DOT_PRECISION=dot_precision(w_hh.dtype), DOT_DTYPE=dot_dtype(w_hh.dtype),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
            )  # fmt: skip
    hidden_full = None
    if w_hr is not None:
        hidden_full = gates[..., 3 * hidden :] * torch.tanh(cells)
    return BackwardResult(dgates, grad_h, grad_c, dhidden, hidden_full)


def _launch_persistent(kernel, args, steps, batch, hidden, reverse, has_lengths, telemetry, dtype):
    """All steps in one launch with a grid barrier per step, or (host-stepped) one launch per step."""
    cfg = persistent_config(dtype)
    programs = persistent_programs(hidden)
    device = args[0].device
    # [arrivals, timed out]: zeroed per launch, the arrival counter only grows within one (kernels/sync.py).
    barrier = torch.zeros(2, dtype=torch.int32, device=device)
    constants = dict(
        REVERSE=reverse, HAS_LENGTHS=has_lengths, TELEMETRY=telemetry, BLOCK_B=cfg.block_b, BLOCK_U=cfg.block_u,
        BLOCK_K=cfg.block_k, DOT_PRECISION=dot_precision(dtype), DOT_DTYPE=dot_dtype(dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg,
    )  # fmt: skip
    # The backward's steps have two phases (gate gradients, then the carried dh) with a barrier between them.
    if kernel is lstm_persistent_backward_kernel:
        step_phases, all_phases = ((1,), (2,)), (3,)
    else:
        step_phases, all_phases = ((),), ()
    if _host_stepped():
        for step, phases in itertools.product(range(steps), step_phases):
            kernel[(programs,)](
                *args, barrier, step, step + 1, steps, batch, hidden, *phases, PERSISTENT=False, **constants
            )
        return
    if programs > _multiprocessors(device):  # persistent_applies checked it; a spin-wait must never start without
        raise RuntimeError(f"the persistent kernel needs {programs} resident programs, more than the device's SMs")
    kernel[(programs,)](*args, barrier, 0, steps, steps, batch, hidden, *all_phases, PERSISTENT=True, **constants)
    # A program that gave up waiting (co-residency broken by something else on the GPU) leaves wrong results:
    # fail loudly on the device, without a host sync, rather than return them.
    torch._assert_async(barrier[1] == 0, "fastlstm: a persistent LSTM kernel timed out at its grid barrier")
