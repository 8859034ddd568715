"""The Triton backend: launchers with the signatures and results of fastlstm.reference.

For each layer-direction and pass it picks a kernel and its configuration (`plan`), allocates the outputs and the
exchange buffers, launches, and checks what the kernels cannot:
  - resident kernels (forward.py / backward.py): the weights stay on chip for the whole sequence; one program per
    batch tile when one program can hold all of W_hh, otherwise the units split over about one program per SM,
    exchanging h_t (gate gradients) every step, launched cooperatively;
  - streaming kernels (streaming.py): one program per 16 sequences re-reads W_hh from L2 every step; they take what
    the resident kernels cannot (a projection past the single kernel's sizes, hidden sizes whose share does not fit
    a split program's registers, more programs than the device can hold at once).
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from fastlstm import constants as C
from fastlstm.reference import BackwardResult, ForwardResult

from .backward import lstm_split_backward_kernel
from .forward import lstm_split_forward_kernel
from .single import lstm_single_backward_kernel, lstm_single_forward_kernel
from .split_gluon import lstm_split_backward_gluon_kernel, lstm_split_forward_gluon_kernel
from .streaming import lstm_streaming_backward_kernel, lstm_streaming_forward_kernel

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Tests set this to fill every output with NaN before a kernel writes it, so an element a kernel forgets to write
# fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


def _option(name: str, default: str, choices: tuple) -> str:
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


# Launch options, read once at import (docs/environment.md lists every variable):
#   FASTLSTM_KERNELS   auto (`plan` below) | tl (the split kernels' `tl` twins also on a GPU, where auto runs the Gluon
#                      ones: to tell a wrong result of one from the other) | streaming (the streaming kernels for every
#                      layer: a fallback that needs no co-residency, and the baseline of the benchmarks)
#   FASTLSTM_EXCHANGE  cooperative (one launch per pass) | host-stepped (one launch per step: the interpreter's mode,
#                      for debugging a cooperative kernel on a GPU)
KERNEL_CHOICES = ("auto", "tl", "streaming")
KERNELS = _option("FASTLSTM_KERNELS", "auto", KERNEL_CHOICES)
EXCHANGE = _option("FASTLSTM_EXCHANGE", "cooperative", ("cooperative", "host-stepped"))


# ---------------------------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------------------------


class StreamingConfig(NamedTuple):
    block_b: int  # sequences per program
    block_h: int  # hidden units (or projected units) per tile
    block_k: int  # reduction chunk of the tl.dot calls
    num_warps: int
    num_stages: int  # software pipelining depth of the reduction loops
    maxnreg: int  # register cap handed to ptxas


# 16-sequence x 32-unit tiles with 16-wide reductions on 8 warps, unpipelined, and ptxas allowed 255 registers:
# the AOT matrix showed every larger tile, 4 warps or a pipelined reduction spilling in some variant.
STREAMING = StreamingConfig(block_b=16, block_h=32, block_k=16, num_warps=8, num_stages=1, maxnreg=255)


class SingleConfig(NamedTuple):
    """single.py: one program per batch tile owns every unit."""

    block_b: int  # sequences per program
    h_pad: int  # H and P padded to powers of two (>= 16, tl.dot's smallest reduction)
    p_pad: int
    num_warps: int
    maxnreg: int  # register cap handed to ptxas (see MAX_REGISTERS)


class SplitConfig(NamedTuple):
    """forward.py / backward.py: the units split over about one program per SM, exchanging every step."""

    units: int  # hidden units per program (its W_hh share: 4 * units rows forward, 4 * units columns backward)
    block_b: int  # sequences per program
    k_pad: int  # the reduction axis (H), padded to a power of two
    k_split: int  # slices of the reduction axis, one per warp
    num_warps: int
    maxnreg: int
    unit_groups: int
    batch_groups: int
    # Batch groups exchange nothing with each other, so where the whole grid would not be resident at once the
    # launcher runs them in slices of this many, one cooperative launch per slice, one after another on the stream.
    batch_groups_per_launch: int

    @property
    def programs(self) -> int:
        return self.unit_groups * self.batch_groups

    @property
    def launches(self) -> int:
        return triton.cdiv(self.batch_groups, self.batch_groups_per_launch)


class Plan(NamedTuple):
    kind: str  # "single" | "split" | "streaming"
    config: SingleConfig | SplitConfig | StreamingConfig
    # How the split kernels are written: "gluon" (split_gluon.py: explicit layouts, 16-bit storage on a GPU) or
    # "tl" (forward.py / backward.py: their twins, which the interpreter runs and fp32 uses).
    implementation: str = "tl"


# Left to itself, ptxas caps some of these kernels at 128 (or fewer) registers, aiming at two programs per SM, and
# spills; both resident kernels hold their weights in registers and want the whole budget of one program per SM.
MAX_REGISTERS = 255

# single.py holds 4 * H_PAD * P_PAD weights (plus W_hr) in registers: the largest padded sizes, per storage dtype,
# with which every variant compiles without spills for sm_80 and sm_90 (kernels/aot.py checks them all).
SINGLE_MAX_PAD = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
SINGLE_WARPS = 8

# Units per program when they are split: 8 gives 32 gate rows (the A operand of the forward product) and, at
# H=1024, 128 programs (the H200 has 132 SMs), each holding 64 KiB of W_hh in 16 bits: 64 registers per thread at 8
# warps, its share of the reduction axis (K_SPLIT = 8 slices) one per warp. The largest padded H per storage dtype
# that compiles without spills (kernels/aot.py): fp32 weights take twice the registers (at 512 units the fp32
# forward spilled over a kilobyte, at 256 the fp32 backward 8-40 bytes in most switch combinations). The batch tile
# shrinks instead of the limit where sizes are unaligned (block_b_for).
SPLIT_UNITS = 8
SPLIT_WARPS = 8
SPLIT_MAX_PAD = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 128}


def aligned(*sizes: int) -> bool:
    """Whether triton compiles a launch with these sizes as multiples of 16 (it specialises on that): otherwise
    every row address is unaligned, loads lose their 16-byte vectors and the kernels need more registers."""
    return all(n % 16 == 0 for n in sizes)


def block_b_for(batch: int, dtype: torch.dtype, is_aligned: bool) -> int:
    """Sequences per program: 16, or 8 where the tiles must shrink to fit the registers without spills (fp32, whose
    dots take more registers; unaligned sizes, see `aligned`) or where there are no more than 8 sequences."""
    return 8 if batch <= 8 or dtype == torch.float32 or not is_aligned else 16


def single_config(hidden: int, proj: int, dtype: torch.dtype) -> SingleConfig | None:
    h_pad = max(16, triton.next_power_of_2(hidden))
    # A 16-wide projection tile under a wider unit tile made ptxas keep the projection's operands in a local-memory
    # array (kilobytes of spills); 32 columns, masked past P, compile cleanly.
    p_pad = max(triton.next_power_of_2(proj), min(32, h_pad))
    limit = SINGLE_MAX_PAD[dtype]
    if h_pad > limit or p_pad > limit:
        return None
    block_b = block_b_for(16, dtype, aligned(hidden, proj))
    return SingleConfig(block_b=block_b, h_pad=h_pad, p_pad=p_pad, num_warps=SINGLE_WARPS, maxnreg=MAX_REGISTERS)


def split_config(hidden: int, batch: int, dtype: torch.dtype) -> SplitConfig | None:
    k_pad = max(16, triton.next_power_of_2(hidden))
    is_aligned = aligned(hidden)
    if k_pad > SPLIT_MAX_PAD[dtype]:
        return None
    block_b = block_b_for(batch, dtype, is_aligned)
    return SplitConfig(
        units=SPLIT_UNITS,
        block_b=block_b,
        k_pad=k_pad,
        k_split=max(1, min(SPLIT_WARPS, k_pad // 16)),  # each slice at least 16 wide (tl.dot's K >= 16)
        num_warps=SPLIT_WARPS,
        maxnreg=MAX_REGISTERS,
        unit_groups=triton.cdiv(hidden, SPLIT_UNITS),
        batch_groups=triton.cdiv(batch, block_b),
        batch_groups_per_launch=triton.cdiv(batch, block_b),
    )


def plan(hidden: int, proj: int, batch: int, dtype: torch.dtype, device: torch.device, restarts: bool = False) -> Plan:
    """The kernel that runs a layer-direction on `device` (plan_for with its co-residency limit)."""
    gluon = not _interpreting() and _capability(device) >= (8, 0)
    return plan_for(
        hidden,
        proj,
        batch,
        dtype,
        max_programs=None if _host_stepped() else _multiprocessors(device),
        gluon=gluon,
        restarts=restarts,
    )


# The kernel families that take restarts (state resets inside the loop); a pass with restarts is planned among them
# only, so that no kernel ever runs one while ignoring them. The split kernels take them in their `tl` form only: a
# pass with restarts runs the tl twins where the Gluon ones would otherwise run.
RESTART_FAMILIES = ("single", "split", "streaming")
RESTART_IMPLEMENTATIONS = ("tl",)


def plan_for(
    hidden: int,
    proj: int,
    batch: int,
    dtype: torch.dtype,
    max_programs: int | None,
    gluon: bool = False,
    restarts: bool = False,
) -> Plan:
    """single.py while one program holds all of W_hh; else the split kernels while they take the layer (no
    projection, a W_hh share that fits, no restarts: RESTART_FAMILIES) and one batch group's programs can be
    resident at once (at most max_programs; None: no limit, host-stepped), the batch groups in as many slices as the
    device needs, written in Gluon where `gluon` (a GPU of sm_80 or newer) allows it for the dtype; else the
    streaming kernels, which take everything."""
    if KERNELS != "streaming":
        single = single_config(hidden, proj, dtype)
        if single is not None:
            return Plan("single", single)
        takes = proj == hidden and (not restarts or "split" in RESTART_FAMILIES)
        split = split_config(hidden, batch, dtype) if takes else None
        if split is not None and max_programs is not None:
            per_launch = max_programs // split.unit_groups
            split = split._replace(batch_groups_per_launch=min(split.batch_groups, per_launch)) if per_launch else None
        if split is not None:
            use_gluon = gluon and KERNELS != "tl" and dtype in GLUON_DTYPES and not restarts
            return Plan("split", split, "gluon" if use_gluon else "tl")
    return Plan("streaming", STREAMING)


def programs_of(chosen: Plan, batch: int) -> int:
    """How many programs one launch of a plan runs for `batch` sequences."""
    if chosen.kind == "split":
        return chosen.config.unit_groups * chosen.config.batch_groups_per_launch
    return triton.cdiv(batch, chosen.config.block_b)


@contextlib.contextmanager
def kernels(choice: str):
    """KERNELS = choice inside the block (restored after): how a benchmark or test pins the kernel choice for the
    launches it makes, forward and backward alike."""
    global KERNELS
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    previous, KERNELS = KERNELS, choice
    try:
        yield
    finally:
        KERNELS = previous


# The Gluon split kernels run tensor-core (mma.sync) products of 16-bit operands; fp32 storage, whose exact dots are
# FMA products, keeps the tl twins.
GLUON_DTYPES = (torch.float16, torch.bfloat16)


def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _host_stepped() -> bool:
    return EXCHANGE == "host-stepped" or _interpreting()


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


def _telemetry_args(probe):
    """(stats-or-gradient rows, first-key pointer, pass-number pointer, launch order) of a StageProbe, or Nones."""
    if probe is None:
        return None, None, None, 0
    return probe.target, probe.first, probe.seq, probe.order


# ---------------------------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------------------------


class Launched(NamedTuple):
    """How the last pass was launched (tests and benchmarks read it through `last_launch`)."""

    kernel: str  # "forward" | "backward"
    plan: Plan
    mode: str  # "single" | "cooperative" | "host-stepped" | "streaming"


last_launch: Launched | None = None


def recurrence_forward(xw, h0, c0, w_hh, w_hr, lengths, reverse: bool, probe=None, restarts=None) -> ForwardResult:
    check_supported(xw)
    steps, batch, four_h = xw.shape
    hidden, proj = four_h // 4, h0.shape[-1]
    dtype, device = xw.dtype, xw.device
    xw, h0, c0, w_hh = (t.contiguous() for t in (xw, h0, c0, w_hh))
    w_hr = None if w_hr is None else w_hr.contiguous()
    gates = _new((steps, batch, four_h), torch.float32, device)
    cells = _new((steps, batch, hidden), torch.float32, device)
    h_n = _new((batch, proj), dtype, device)
    c_n = _new((batch, hidden), dtype, device)
    stats, first, seq, order = _telemetry_args(probe)
    chosen = plan(hidden, proj, batch, dtype, device, restarts is not None)
    _check_restarts(chosen, restarts)
    if chosen.kind == "split":
        # The exchange buffer is [h0; out]: row 0 holds h0, so that a sequence starting at a step reads its h_{t-1}
        # from the same tensor as the others (forward.py, _load_exchanged). `out` is a view of rows 1..T.
        exchange = _new((steps + 1, batch, hidden), dtype, device)
        exchange[0] = h0
        out = exchange[1:]
    else:
        out = _new((steps, batch, proj), dtype, device)
    if batch == 0:
        return ForwardResult(out, h_n, c_n, (gates, cells))
    with torch.cuda.device_of(xw):  # triton launches on the current device, not on the tensors' one
        if chosen.kind == "single":
            cfg = chosen.config
            _record("forward", chosen, "single")
            lstm_single_forward_kernel[(triton.cdiv(batch, cfg.block_b),)](
                xw,
                h0,
                c0,
                w_hh,
                w_hr,
                lengths,
                restarts,
                out,
                gates,
                cells,
                h_n,
                c_n,
                stats,
                first,
                seq,
                order,
                steps,
                batch,
                hidden,
                proj,
                REVERSE=reverse,
                BLOCK_B=cfg.block_b,
                H_PAD=cfg.h_pad,
                P_PAD=cfg.p_pad,
                DOT_DTYPE=dot_dtype(dtype),
                DOT_PRECISION=dot_precision(dtype),
                num_warps=cfg.num_warps,
                maxnreg=cfg.maxnreg,
            )
        elif chosen.kind == "split":
            args = (xw, h0, c0, w_hh, lengths, restarts, out, gates, cells, h_n, c_n, stats, first, seq, order)
            kernel = lstm_split_forward_gluon_kernel if chosen.implementation == "gluon" else lstm_split_forward_kernel
            _launch_split(kernel, "forward", args, chosen, steps, batch, hidden, reverse, dtype)
        else:
            _record("forward", chosen, "streaming")
            _forward_streaming(
                xw,
                h0,
                c0,
                w_hh,
                w_hr,
                lengths,
                restarts,
                out,
                gates,
                cells,
                h_n,
                c_n,
                stats,
                first,
                seq,
                order,
                reverse,
            )
    return ForwardResult(out, h_n, c_n, (gates, cells))


def _forward_streaming(
    xw, h0, c0, w_hh, w_hr, lengths, restarts, out, gates, cells, h_n, c_n, stats, first, seq, order, reverse
):
    steps, batch, hidden = cells.shape
    cfg = STREAMING
    hfull = _new((batch, hidden), torch.float32, xw.device) if w_hr is not None else None
    lstm_streaming_forward_kernel[(triton.cdiv(batch, cfg.block_b),)](
        xw,
        h0,
        c0,
        w_hh,
        w_hr,
        lengths,
        restarts,
        out,
        gates,
        cells,
        hfull,
        h_n,
        c_n,
        stats,
        first,
        seq,
        order,
        steps,
        batch,
        hidden,
        h0.shape[-1],
        REVERSE=reverse,
        BLOCK_B=cfg.block_b,
        BLOCK_H=cfg.block_h,
        BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(xw.dtype),
        DOT_DTYPE=dot_dtype(xw.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------


def recurrence_backward(
    grad_out, grad_hn, grad_cn, c0, saved, w_hh, w_hr, lengths, reverse: bool, probe=None, restarts=None
):
    gates, cells = saved
    steps, batch, four_h = gates.shape
    hidden, proj = four_h // 4, grad_hn.shape[-1]
    dtype, device = w_hh.dtype, gates.device
    grad_out, c0, w_hh = (t.contiguous() for t in (grad_out, c0, w_hh))
    w_hr = None if w_hr is None else w_hr.contiguous()
    dgates = _new((steps, batch, four_h), torch.float32, device)
    # The carried gradients start as dL/dh_n, dL/dc_n and end as dL/dh0, dL/dc0.
    grad_h = grad_hn.to(torch.float32, copy=True).contiguous()
    grad_c = grad_cn.to(torch.float32, copy=True).contiguous()
    dhidden = _new((steps, batch, proj), torch.float32, device) if w_hr is not None else None
    grad_rows, first, seq, order = _telemetry_args(probe)
    chosen = plan(hidden, proj, batch, dtype, device, restarts is not None)
    _check_restarts(chosen, restarts)
    if batch > 0:
        with torch.cuda.device_of(gates):
            if chosen.kind == "single":
                cfg = chosen.config
                _record("backward", chosen, "single")
                grad_h0, grad_c0 = _restart_accumulators(restarts, grad_h, grad_c)
                lstm_single_backward_kernel[(triton.cdiv(batch, cfg.block_b),)](
                    grad_out,
                    c0,
                    gates,
                    cells,
                    w_hh,
                    w_hr,
                    lengths,
                    restarts,
                    dgates,
                    grad_h,
                    grad_c,
                    grad_h0,
                    grad_c0,
                    dhidden,
                    grad_rows,
                    _capacity(grad_rows),
                    first,
                    seq,
                    order,
                    steps,
                    batch,
                    hidden,
                    proj,
                    REVERSE=reverse,
                    BLOCK_B=cfg.block_b,
                    H_PAD=cfg.h_pad,
                    P_PAD=cfg.p_pad,
                    DOT_DTYPE=dot_dtype(dtype),
                    DOT_PRECISION=dot_precision(dtype),
                    num_warps=cfg.num_warps,
                    maxnreg=cfg.maxnreg,
                )
                grad_h, grad_c = _with_restarted(grad_h, grad_c, grad_h0, grad_c0)
            elif chosen.kind == "split":
                grad_h, grad_c = _backward_split(
                    grad_out,
                    c0,
                    gates,
                    cells,
                    w_hh,
                    lengths,
                    restarts,
                    dgates,
                    grad_h,
                    grad_c,
                    grad_rows,
                    first,
                    seq,
                    order,
                    reverse,
                    chosen,
                )
            else:
                _record("backward", chosen, "streaming")
                grad_h, grad_c = _backward_streaming(
                    grad_out,
                    c0,
                    gates,
                    cells,
                    w_hh,
                    w_hr,
                    lengths,
                    restarts,
                    dgates,
                    grad_h,
                    grad_c,
                    dhidden,
                    grad_rows,
                    first,
                    seq,
                    order,
                    reverse,
                )
    hidden_full = None
    if w_hr is not None:
        hidden_full = gates[..., 3 * hidden :] * torch.tanh(cells)
    return BackwardResult(dgates, grad_h, grad_c, dhidden, hidden_full)


def _capacity(grad_rows) -> int:
    return 0 if grad_rows is None else grad_rows.shape[-1]


def _backward_split(
    grad_out,
    c0,
    gates,
    cells,
    w_hh,
    lengths,
    restarts,
    dgates,
    grad_h,
    grad_c,
    grad_rows,
    first,
    seq,
    order,
    reverse,
    chosen,
):
    steps, batch, hidden = cells.shape
    cfg = chosen.config
    device = gates.device
    # Two slots of every unit's gate gradients, in the storage dtype: step q writes slot q % 2 while the others
    # still read slot (q - 1) % 2 (backward.py; a program cannot reach step q + 2 before every program has read q).
    exchange = _new((2, batch, 4 * hidden), w_hh.dtype, device)
    partials = _new((2, cfg.programs, steps), torch.float32, device) if grad_rows is not None else None
    grad_h0, grad_c0 = _restart_accumulators(restarts, grad_h, grad_c)
    args = (
        grad_out,
        c0,
        gates,
        cells,
        w_hh,
        lengths,
        restarts,
        dgates,
        grad_h,
        grad_c,
        grad_h0,
        grad_c0,
        exchange,
        partials,
        grad_rows,
        _capacity(grad_rows),
        first,
        seq,
        order,
    )
    kernel = lstm_split_backward_gluon_kernel if chosen.implementation == "gluon" else lstm_split_backward_kernel
    _launch_split(kernel, "backward", args, chosen, steps, batch, hidden, reverse, w_hh.dtype)
    if partials is not None:  # the per-program squared norms of every step, added up once
        sums = partials.sum(dim=1, dtype=torch.float64)
        grad_rows[C.GRAD_SUMSQ, :steps] += sums[0]
        grad_rows[C.GRAD_CELL_SUMSQ, :steps] += sums[1]
    return _with_restarted(grad_h, grad_c, grad_h0, grad_c0)


def _restart_accumulators(restarts, grad_h, grad_c):
    """Zeroed buffers for what restarted steps send to h0 and c0 (None without restarts)."""
    if restarts is None:
        return None, None
    return torch.zeros_like(grad_h), torch.zeros_like(grad_c)


def _with_restarted(grad_h, grad_c, grad_h0, grad_c0):
    """dL/dh0, dL/dc0: what the first step left in the carried gradients plus what restarted steps sent."""
    if grad_h0 is None:
        return grad_h, grad_c
    return grad_h0.add_(grad_h), grad_c0.add_(grad_c)


def _backward_streaming(
    grad_out,
    c0,
    gates,
    cells,
    w_hh,
    w_hr,
    lengths,
    restarts,
    dgates,
    grad_h,
    grad_c,
    dhidden,
    grad_rows,
    first,
    seq,
    order,
    reverse,
):
    steps, batch, hidden = cells.shape
    cfg = STREAMING
    dhfull = _new((batch, hidden), torch.float32, gates.device) if w_hr is not None else None
    grad_h0, grad_c0 = _restart_accumulators(restarts, grad_h, grad_c)
    lstm_streaming_backward_kernel[(triton.cdiv(batch, cfg.block_b),)](
        grad_out,
        c0,
        gates,
        cells,
        w_hh,
        w_hr,
        lengths,
        restarts,
        dgates,
        grad_h,
        grad_c,
        grad_h0,
        grad_c0,
        dhidden,
        dhfull,
        grad_rows,
        _capacity(grad_rows),
        first,
        seq,
        order,
        steps,
        batch,
        hidden,
        grad_h.shape[-1],
        REVERSE=reverse,
        BLOCK_B=cfg.block_b,
        BLOCK_H=cfg.block_h,
        BLOCK_K=cfg.block_k,
        DOT_PRECISION=dot_precision(w_hh.dtype),
        DOT_DTYPE=dot_dtype(w_hh.dtype),
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        maxnreg=cfg.maxnreg,
    )
    return _with_restarted(grad_h, grad_c, grad_h0, grad_c0)


def _check_restarts(chosen: Plan, restarts) -> None:
    """Restarts reach only a kernel that takes them (plan_for keeps them from the others): never silently ignored."""
    family = chosen.kind if chosen.kind != "split" else f"split ({chosen.implementation})"
    takes = chosen.kind in RESTART_FAMILIES and (
        chosen.kind != "split" or chosen.implementation in RESTART_IMPLEMENTATIONS
    )
    if restarts is not None and not takes:
        raise NotImplementedError(
            f"fastlstm: the {family} kernels do not take restarts (resets); the plan should not have chosen them "
            f"for this pass ({', '.join(RESTART_FAMILIES)} do, the split ones as {', '.join(RESTART_IMPLEMENTATIONS)})"
        )
    if restarts is not None and (restarts.dtype != torch.bool or not restarts.is_contiguous()):
        raise ValueError("fastlstm: restarts must be a contiguous bool tensor [T, B]")


# ---------------------------------------------------------------------------------------------------------------
# Split (cooperative) launches
# ---------------------------------------------------------------------------------------------------------------


def _record(kernel: str, chosen: Plan, mode: str) -> None:
    global last_launch
    last_launch = Launched(kernel, chosen, mode)


def _launch_split(kernel, name, args, chosen: Plan, steps, batch, hidden, reverse, dtype):
    """Cooperative launches for the whole sequence, exchanging every step, one per slice of batch groups (one slice
    when the grid fits the device), or one launch per step (host-stepped; the backward adds a last launch that only
    finishes dL/dh0)."""
    cfg = chosen.config
    device = args[0].device
    constants = {
        "REVERSE": reverse,
        "UNITS": cfg.units,
        "BLOCK_B": cfg.block_b,
        "K_PAD": cfg.k_pad,
        "K_SPLIT": cfg.k_split,
        "MAX_PROGRAMS": triton.next_power_of_2(cfg.unit_groups),
        "ASM_FENCE": not _interpreting(),
        "DOT_DTYPE": dot_dtype(dtype),
        "DOT_PRECISION": dot_precision(dtype),
        "num_warps": cfg.num_warps,
        "maxnreg": cfg.maxnreg,
    }
    grid = (cfg.unit_groups, cfg.batch_groups)
    if _host_stepped():
        _record(name, chosen, "host-stepped")
        for step in range(steps):
            kernel[grid](*args, None, 0, step, step + 1, steps, batch, hidden, **constants)
        if name == "backward":
            kernel[grid](*args, None, 0, steps, steps, steps, batch, hidden, **constants)
        return
    _record(name, chosen, "cooperative")
    # [abort word, one flag per program of every slice], zeroed per pass so that nothing survives into the next
    # (exchange.py); each slice's programs raise their own flags.
    flags = torch.zeros(1 + cfg.programs, dtype=torch.int32, device=device)
    for base in range(0, cfg.batch_groups, cfg.batch_groups_per_launch):
        slice_grid = (cfg.unit_groups, min(cfg.batch_groups_per_launch, cfg.batch_groups - base))
        try:
            kernel[slice_grid](
                *args, flags, base, 0, steps, steps, batch, hidden, launch_cooperative_grid=True, **constants
            )
        except RuntimeError as error:
            raise RuntimeError(
                f"fastlstm: the {name} kernel needs its {slice_grid[0] * slice_grid[1]} programs resident at once (a "
                f"cooperative launch) and the device refused it ({error}); FASTLSTM_KERNELS=streaming selects "
                "kernels that need no co-residency"
            ) from error
    # A program that gave up waiting (exchange.py) leaves wrong results: fail loudly on the device, without a host
    # sync, rather than return them.
    torch._assert_async(flags[0] == 0, "fastlstm: a resident LSTM kernel timed out waiting for another program")
