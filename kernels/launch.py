"""The Triton backend: launchers with the signatures and results of fastlstm.reference.

For each layer-direction and pass it takes the kernel and configuration planning.py chooses, allocates the outputs
and the exchange buffers, builds each kernel's arguments, launches, records how it launched (`last_launch`), and
checks what the kernels cannot: a supported dtype and device before, a cooperative launch the device refused or a
program that timed out waiting for another after.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from fastlstm import constants as C
from fastlstm.reference import BackwardResult, ForwardResult

# planning's switches (host_stepped, interpreting) are read through the module, so that a test that replaces one
# there changes what the launcher does as well as what it plans.
from . import planning
from .arguments import check_supported, dot_precision, single_keywords, split_keywords, streaming_keywords
from .backward import lstm_split_backward_kernel
from .forward import lstm_split_forward_kernel
from .single import lstm_single_backward_kernel, lstm_single_forward_kernel
from .split_gluon_backward import lstm_split_backward_gluon_kernel
from .split_gluon_forward import lstm_split_forward_gluon_kernel
from .streaming import lstm_streaming_backward_kernel, lstm_streaming_forward_kernel

# Tests set this to fill every output with NaN before a kernel writes it, so an element a kernel forgets to write
# fails the comparison instead of passing by luck.
POISON_OUTPUTS = False


# ---------------------------------------------------------------------------------------------------------------
# Allocation and the record of the last launch
# ---------------------------------------------------------------------------------------------------------------


class Launched(NamedTuple):
    """How the last pass was launched (tests and benchmarks read it through `last_launch`)."""

    kernel: str  # "forward" | "backward"
    plan: planning.Plan
    mode: str  # "single" | "cooperative" | "host-stepped" | "streaming"


last_launch: Launched | None = None


def _record(kernel: str, chosen: planning.Plan, mode: str) -> None:
    global last_launch
    last_launch = Launched(kernel, chosen, mode)


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
    chosen = planning.plan(hidden, proj, batch, dtype, device, restarts is not None, dot_precision(dtype), "forward")
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
                **single_keywords(cfg, reverse, dtype),
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
    cfg = planning.STREAMING
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
        **streaming_keywords(cfg, reverse, xw.dtype),
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
    chosen = planning.plan(hidden, proj, batch, dtype, device, restarts is not None, dot_precision(dtype), "backward")
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
                    **single_keywords(cfg, reverse, dtype),
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
    cfg = planning.STREAMING
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
        **streaming_keywords(cfg, reverse, w_hh.dtype),
    )
    return _with_restarted(grad_h, grad_c, grad_h0, grad_c0)


# ---------------------------------------------------------------------------------------------------------------
# Restarts (state resets inside the loop, docs/resets.md)
# ---------------------------------------------------------------------------------------------------------------


def _check_restarts(chosen: planning.Plan, restarts) -> None:
    """Restarts reach only a kernel that takes them (the plan keeps them from the others): never silently ignored."""
    if restarts is None:
        return
    if not planning.takes_restarts(chosen):
        family = chosen.kind if chosen.kind != "split" else f"split ({chosen.implementation})"
        raise NotImplementedError(
            f"fastlstm: the {family} kernels do not take restarts (resets); the plan should not have chosen them for "
            f"this pass ({', '.join(planning.RESTART_FAMILIES)} do, the split ones as "
            f"{', '.join(planning.RESTART_IMPLEMENTATIONS)})"
        )
    if restarts.dtype != torch.bool or not restarts.is_contiguous():
        raise ValueError("fastlstm: restarts must be a contiguous bool tensor [T, B]")


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


# ---------------------------------------------------------------------------------------------------------------
# Split (cooperative) launches
# ---------------------------------------------------------------------------------------------------------------


def _launch_split(kernel, name, args, chosen: planning.Plan, steps, batch, hidden, reverse, dtype):
    """Cooperative launches for the whole sequence, exchanging every step, one per slice of batch groups (one slice
    when the grid fits the device), or one launch per step (host-stepped; the backward adds a last launch that only
    finishes dL/dh0)."""
    cfg = chosen.config
    device = args[0].device
    constants = split_keywords(cfg, reverse, dtype, gluon_backward=kernel is lstm_split_backward_gluon_kernel)
    grid = (cfg.unit_groups, cfg.batch_groups)
    if planning.host_stepped():
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
