"""Which kernel runs a layer-direction, and with which configuration: the launcher's plan.

Given the hidden size, the projection, the batch and the storage dtype (and, on a GPU, how many programs the device
holds at once), `plan` picks one of three families and sizes it:
  - single (single.py): one program per batch tile holds all of W_hh in registers;
  - split (forward.py / backward.py, or their Gluon versions in split_gluon_forward.py / split_gluon_backward.py):
    the units split over about one program per SM, exchanging h_t (gate gradients) every step, launched
    cooperatively;
  - streaming (streaming.py): one program per 16 sequences re-reads W_hh from L2 every step; it takes what the
    resident kernels cannot (a projection past the single kernel's sizes, hidden sizes whose share does not fit a
    split program's registers, more programs than the device can hold at once).
Each limit below is the largest configuration that compiles without spills (kernels/aot.py checks every variant).
Nothing here allocates or launches: launch.py does, from a Plan.
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import NamedTuple

import torch
import triton

from fastlstm import constants as C


def _option(name: str, default: str, choices: tuple) -> str:
    value = os.environ.get(name) or default  # set but empty: the default, as unset
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
    # The Gluon backward's exchanged gates staged in shared memory at once (gluon_copy_slots; 0: through registers).
    copy_slots: int = 0

    @property
    def programs(self) -> int:
        return self.unit_groups * self.batch_groups

    @property
    def launches(self) -> int:
        return triton.cdiv(self.batch_groups, self.batch_groups_per_launch)


class Plan(NamedTuple):
    kind: str  # "single" | "split" | "streaming"
    config: SingleConfig | SplitConfig | StreamingConfig
    # How the split kernels are written: "gluon" (split_gluon_*.py: explicit layouts, 16-bit storage on a GPU) or
    # "tl" (forward.py / backward.py: their twins, which the interpreter runs and fp32 uses).
    implementation: str = "tl"


# Left to itself, ptxas caps some of these kernels at 128 (or fewer) registers, aiming at two programs per SM, and
# spills; both resident kernels hold their weights in registers and want the whole budget of one program per SM.
MAX_REGISTERS = 255

# single.py holds 4 * H_PAD * P_PAD weights (plus W_hr) in registers: the largest padded sizes, per storage dtype,
# with which every variant compiles without spills for sm_80 and sm_90 (kernels/aot.py checks them all).
SINGLE_MAX_PAD = {torch.float16: 64, torch.bfloat16: 64, torch.float32: 32}
SINGLE_WARPS = 8

# Units per program when they are split: 8 gives 32 gate rows (the A operand of the forward product) and, at H=1024,
# 128 programs (the H200 has 132 SMs), each holding 64 KiB of W_hh in 16 bits: 64 registers per thread at 8 warps, its
# share of the reduction axis (K_SPLIT = 8 slices) one per warp. The largest padded H per storage dtype that compiles
# without spills (kernels/aot.py). fp32 weights take more than twice the registers of 16-bit ones (their exact dots
# are FMA products), so past a 128 pad an fp32 program takes half the units (SPLIT_NARROW_UNITS: 16 gate rows,
# tl.dot's smallest M). Compiled with triton 3.6 for sm_80 and sm_90 in every switch combination: at a 256 pad 8 units
# spilled 8-40 bytes in the fp32 backward, 4 units compile clean; at 512 the ieee backward with 4 units still spilled
# 32-136 bytes in seven combinations, so exact fp32 stops at 256. TF32 dots (tensor-core products, taken where
# torch.backends.cuda.matmul.allow_tf32 allows them) need fewer registers: with 4 units they compile clean at 512
# (180 registers forward, 192 backward with every switch on, sm_90), where H=512 is 128 programs. The batch tile
# shrinks instead of the limit where sizes are unaligned (block_b_for).
SPLIT_UNITS = 8
SPLIT_NARROW_UNITS = 4
SPLIT_NARROW_ABOVE_PAD = {torch.float16: None, torch.bfloat16: None, torch.float32: 128}
SPLIT_WARPS = 8
SPLIT_MAX_PAD = {torch.float16: 1024, torch.bfloat16: 1024, torch.float32: 256}
SPLIT_MAX_PAD_TF32 = 512
# Exact fp32 at a 512 pad (4 units, 128 programs) compiles without spills in its cooperative launch at aligned sizes
# (every switch combination, sm_80 and sm_90), but not host-stepped, whose launches resume the state a previous
# launch left (the backward spilled 32-72 bytes) nor unaligned (backward 64-136 bytes, forward 8). So a cooperative
# launch of an aligned fp32 layer takes the split kernels up to this pad; host-stepped or unaligned, up to
# SPLIT_MAX_PAD (triton 3.6, the AOT matrix).
SPLIT_MAX_PAD_FP32_COOPERATIVE = 512
# With restarts the split `tl` forward needs a few more registers; at an unaligned 1024-wide pad (16-bit, every
# switch on) it spilled 36 bytes on sm_90 (triton 3.6, the AOT matrix), so a pass with restarts takes the split
# kernels at unaligned sizes only up to this pad, and the streaming kernels above it.
SPLIT_RESTARTS_UNALIGNED_MAX_PAD = 512

# The Gluon split kernels run tensor-core (mma.sync) products of 16-bit operands; fp32 storage, whose exact dots are
# FMA products, keeps the tl twins.
GLUON_DTYPES = (torch.float16, torch.bfloat16)
# Where one batch group's programs fill most of the device, the batch groups run in sequential launches, each paying
# the whole per-step latency; a wider batch tile per program means fewer groups, so fewer launches, for a step that
# moves twice the data. The Gluon kernels take 32 sequences per program at aligned sizes up to a 512 pad (228 and 194
# registers forward and backward with every switch, sm_80/sm_90, the backward's staged gates then fitting three
# copy slots on sm_80); unaligned, the backward spilled on sm_80. The forward takes it up to a 1024 pad (at most 248
# registers there with every switch, no spills, sm_80/sm_90; 64 sequences spilled 560-1376 bytes), the backward only
# up to 512 (at 1024 it spilled 96-368 bytes): the passes plan their tiles apart, as nothing of the tile crosses from
# one to the other. The plan takes the wide tile only where it saves launches (at H=512, B=64: one launch instead of
# two each way; at H=1024, B=64 a forward of two launches instead of four).
GLUON_WIDE_BLOCK_B = 32
GLUON_WIDE_MAX_PAD = {"forward": 1024, "backward": 512}


# Shared memory one program may take (the opt-in maximum per block, bytes) on the devices the Gluon kernels run on:
# the Gluon backward stages as many gates' exchanged gradients as fit beside its weights (gluon_copy_slots), so its
# plan depends on it. sm_86, sm_89 and sm_120 parts (RTX, A10, L4, L40) have 99 KiB; sm_80 and sm_87 163 KiB; sm_90
# and sm_100 227 KiB (CUDA C++ Programming Guide, compute capabilities). A plan made without a device assumes sm_80.
SHARED_BYTES = {"sm_86": 99 * 1024, "sm_80": 163 * 1024, "sm_90": 227 * 1024}
DEFAULT_SHARED_BYTES = SHARED_BYTES["sm_80"]


def gluon_copy_slots(k_pad: int, block_b: int, shared_bytes: int) -> int:
    """How many gates' exchanged gradients the Gluon backward stages at once (at most the four; 0: none fits), beside
    its resident weights (8 units' columns of W_hh per gate, 16 bits) and the scratch of the product's partials on
    their way to the reduction layout. The AOT matrix's shared-memory figures match this count to the byte."""
    weights = 4 * k_pad * 8 * 2
    layout_change = 8 * block_b * 8 * 4
    return max(0, min(4, (shared_bytes - weights - layout_change) // (k_pad * block_b * 2)))


def staged_backward(split: SplitConfig, shared_bytes: int) -> SplitConfig | None:
    """An aligned split configuration as the Gluon backward takes it on a device with this shared memory per program
    (its copy slots set), or None where not one slot fits (the pass then runs the tl twin)."""
    slots = gluon_copy_slots(split.k_pad, split.block_b, shared_bytes)
    return split._replace(copy_slots=slots) if slots else None


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


def split_units(k_pad: int, dtype: torch.dtype) -> int:
    """Hidden units per split program (see SPLIT_NARROW_UNITS)."""
    narrow_above = SPLIT_NARROW_ABOVE_PAD[dtype]
    return SPLIT_NARROW_UNITS if narrow_above is not None and k_pad > narrow_above else SPLIT_UNITS


def split_max_pad(
    dtype: torch.dtype, precision: str = "ieee", is_aligned: bool = True, cooperative: bool = False
) -> int:
    """The largest padded H the split kernels take for a storage dtype and dot precision ("ieee" | "tf32"), at
    aligned sizes or not, in a cooperative launch or host-stepped (see SPLIT_MAX_PAD_FP32_COOPERATIVE)."""
    if dtype != torch.float32:
        return SPLIT_MAX_PAD[dtype]
    if precision == "tf32":
        return SPLIT_MAX_PAD_TF32
    return SPLIT_MAX_PAD_FP32_COOPERATIVE if is_aligned and cooperative else SPLIT_MAX_PAD[dtype]


def split_config(
    hidden: int,
    batch: int,
    dtype: torch.dtype,
    precision: str = "ieee",
    block_b: int | None = None,
    cooperative: bool = False,
) -> SplitConfig | None:
    """The split configuration of a layer, or None where split_max_pad stops it; `block_b` overrides block_b_for
    (the Gluon kernels' wide tile); `cooperative`: for a cooperative launch rather than a host-stepped one."""
    k_pad = max(16, triton.next_power_of_2(hidden))
    is_aligned = aligned(hidden)
    if k_pad > split_max_pad(dtype, precision, is_aligned, cooperative):
        return None
    block_b = block_b or block_b_for(batch, dtype, is_aligned)
    units = split_units(k_pad, dtype)
    return SplitConfig(
        units=units,
        block_b=block_b,
        k_pad=k_pad,
        k_split=max(1, min(SPLIT_WARPS, k_pad // 16)),  # each slice at least 16 wide (tl.dot's K >= 16)
        num_warps=SPLIT_WARPS,
        maxnreg=MAX_REGISTERS,
        unit_groups=triton.cdiv(hidden, units),
        batch_groups=triton.cdiv(batch, block_b),
        batch_groups_per_launch=triton.cdiv(batch, block_b),
    )


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


def plan(
    hidden: int,
    proj: int,
    batch: int,
    dtype: torch.dtype,
    device: torch.device,
    restarts: bool = False,
    precision: str = "ieee",
    stage: str = "forward",
) -> Plan:
    """The kernel that runs one pass ("forward" | "backward") of a layer-direction on `device` (plan_for with its
    co-residency limit and shared memory); `precision` is the launch's dot precision (arguments.dot_precision)."""
    gluon = not interpreting() and _capability(device) >= (8, 0)
    return plan_for(
        hidden,
        proj,
        batch,
        dtype,
        max_programs=None if host_stepped() else _multiprocessors(device),
        gluon=gluon,
        restarts=restarts,
        precision=precision,
        stage=stage,
        shared_bytes=_shared_bytes(device) if gluon else DEFAULT_SHARED_BYTES,
    )


# The kernel families that take restarts (state resets inside the loop, docs/resets.md); a pass with restarts is
# planned among them only, so that no kernel ever runs one while ignoring them. The split kernels take them in their
# `tl` form only: a pass with restarts runs the tl twins where the Gluon ones would otherwise run.
RESTART_FAMILIES = ("single", "split", "streaming")
RESTART_IMPLEMENTATIONS = ("tl",)


def split_takes_restarts(k_pad: int, is_aligned: bool) -> bool:
    """Whether a split configuration of this pad and alignment runs a pass with restarts (see
    SPLIT_RESTARTS_UNALIGNED_MAX_PAD)."""
    return is_aligned or k_pad <= SPLIT_RESTARTS_UNALIGNED_MAX_PAD


def takes_restarts(chosen: Plan) -> bool:
    return chosen.kind in RESTART_FAMILIES and (
        chosen.kind != "split" or chosen.implementation in RESTART_IMPLEMENTATIONS
    )


def plan_for(
    hidden: int,
    proj: int,
    batch: int,
    dtype: torch.dtype,
    max_programs: int | None,
    gluon: bool = False,
    restarts: bool = False,
    precision: str = "ieee",
    stage: str = "forward",
    shared_bytes: int = DEFAULT_SHARED_BYTES,
) -> Plan:
    """single.py while one program holds all of W_hh; else the split kernels while they take the layer (no
    projection, a W_hh share that fits: split_max_pad, which depends for fp32 on the dot `precision`, the alignment
    and the launch mode) and one batch group's programs can be resident at once (at most max_programs; None: no
    limit, host-stepped), the batch groups in as many slices as the device needs, written in
    Gluon where `gluon` (a GPU of sm_80 or newer) allows it for the dtype and the pass has no `restarts`
    (RESTART_FAMILIES); else the streaming kernels, which take everything. The two passes differ only in the Gluon
    kernels' wide tile (GLUON_WIDE_MAX_PAD) and in the backward's copy slots, which `shared_bytes` (one program's
    shared memory) sizes: where an aligned Gluon backward has room for none, the pass runs the tl twin."""
    if KERNELS != "streaming":
        single = single_config(hidden, proj, dtype)
        if single is not None:
            return Plan("single", single)
        cooperative = max_programs is not None
        split = split_config(hidden, batch, dtype, precision, cooperative=cooperative) if proj == hidden else None
        if split is not None and restarts and not split_takes_restarts(split.k_pad, aligned(hidden)):
            split = None
        use_gluon = gluon and KERNELS != "tl" and dtype in GLUON_DTYPES and not restarts
        if split is not None and max_programs is not None:
            split = _sliced(split, max_programs)
            several = split is not None and use_gluon and split.launches > 1
            if several and gluon_takes_wide_tile(split.k_pad, hidden, stage):
                wide = split_config(hidden, batch, dtype, precision, GLUON_WIDE_BLOCK_B, cooperative)
                wide = _sliced(wide, max_programs)
                split = wide if wide is not None and wide.launches < split.launches else split
        if split is not None and use_gluon and stage == "backward" and aligned(hidden):
            staged = staged_backward(split, shared_bytes)
            split, use_gluon = (staged, True) if staged is not None else (split, False)
        if split is not None:
            return Plan("split", split, "gluon" if use_gluon else "tl")
    return Plan("streaming", STREAMING)


def _sliced(split: SplitConfig, max_programs: int) -> SplitConfig | None:
    """The configuration with its batch groups in slices of as many as max_programs hold (None: not one group)."""
    per_launch = max_programs // split.unit_groups
    return split._replace(batch_groups_per_launch=min(split.batch_groups, per_launch)) if per_launch else None


def gluon_takes_wide_tile(k_pad: int, hidden: int, stage: str) -> bool:
    """Whether a Gluon split pass takes GLUON_WIDE_BLOCK_B sequences per program at this pad and size."""
    return k_pad <= GLUON_WIDE_MAX_PAD[stage] and aligned(hidden)


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


# ---------------------------------------------------------------------------------------------------------------
# What the plan asks of the device and the environment
# ---------------------------------------------------------------------------------------------------------------


def interpreting() -> bool:
    return C.triton_interpreter_on()


def host_stepped() -> bool:
    """Whether the split kernels run one launch per step (the launcher reads it too, to launch them that way)."""
    return EXCHANGE == "host-stepped" or interpreting()


def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _shared_bytes(device: torch.device) -> int:
    """The most shared memory one program may take on the device: the figure triton's launcher checks a kernel's
    against (its OutOfResources error)."""
    return _shared_bytes_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _shared_bytes_of(index: int) -> int:  # a driver query, asked once per device rather than on every pass
    from triton.runtime import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]
