"""Ahead-of-time compile check of every kernel variant the launcher can plan, for sm_80 and sm_90, without a GPU.

For each variant (kernels/variant.py) it runs triton.compile against a GPUTarget, reads registers and spills from the
ptxas log and the shared memory from the metadata, and fails on a compile error, any spill, or shared memory above
the chip's limit (triton does not check that at compile time). `fastlstm aot` prints the table; CI runs the full
matrix.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

from .variant import Variant, compile_kernel, config_pairs

# Per-block shared memory limits (bytes): A100 163 KiB, H100/H200 227 KiB.
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)
PRECISIONS = (("fp32", "ieee"), ("fp32", "tf32"), ("fp16", "ieee"), ("bf16", "ieee"))


class Result(NamedTuple):
    variant: Variant
    arch: int
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int | None
    error: str | None

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and self.spill_bytes == 0
            and self.shared_bytes is not None
            and self.shared_bytes <= min(SHARED_LIMIT[self.arch], self.variant.shared_limit or SHARED_LIMIT[self.arch])
        )


# ---------------------------------------------------------------------------------------------------------------
# The variants: every configuration kernels/planning.py can plan
# ---------------------------------------------------------------------------------------------------------------


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def family_configs(family: str, dtype: str, precision: str = "ieee", stage: str = "forward") -> list:
    """Every configuration the launcher can choose for a family, dtype, dot precision and pass, largest first, as
    (config pairs, aligned, shared limit): each padded size planned both as a multiple of 16 and not (which takes
    smaller tiles, planning.py), and the Gluon backward for each device's shared memory (planning.SHARED_BYTES, its
    copy slots), with the smallest shared memory it is planned for (None: any)."""
    from . import planning

    torch_dtype = _torch_dtype(dtype)
    plans = []
    if family == "single":
        pads = [p for p in (64, 32, 16) if p <= planning.SINGLE_MAX_PAD[torch_dtype]]
        for h_pad, is_aligned in itertools.product(pads, (True, False)):
            hidden = h_pad if is_aligned else h_pad - 1
            for proj in sorted({hidden, 16 if is_aligned else 15}, reverse=True):
                single = planning.Plan("single", planning.single_config(hidden, proj, torch_dtype))
                plans.append((single, is_aligned, None))
    elif family in ("split", "split-gluon"):
        if family == "split-gluon" and torch_dtype not in planning.GLUON_DTYPES:
            return []
        smallest = planning.SINGLE_MAX_PAD[torch_dtype] + 1  # below it the single kernel takes the layer
        for is_aligned, batch in itertools.product((True, False), (16, 8)):
            limit = planning.split_max_pad(torch_dtype, precision, is_aligned, cooperative=True)
            for k_pad in (p for p in (1024, 512, 256, 128, 64) if smallest <= p <= limit):
                hidden = k_pad if is_aligned else k_pad - 1
                configs = [planning.split_config(hidden, batch, torch_dtype, precision, cooperative=True)]
                if family == "split-gluon" and planning.gluon_takes_wide_tile(k_pad, hidden, stage):
                    wide = planning.split_config(hidden, batch, torch_dtype, precision, planning.GLUON_WIDE_BLOCK_B)
                    configs.append(wide)
                for config in configs:
                    plans += _split_plans(family, stage, config, is_aligned)
    else:
        plans = [
            (planning.Plan("streaming", planning.STREAMING), True, None),
            (planning.Plan("streaming", planning.STREAMING), False, None),
        ]
    unique, seen = [], set()
    for chosen, is_aligned, limit in plans:  # the smallest shared memory a configuration is planned for comes first
        entry = (config_pairs(chosen, stage), is_aligned)
        if entry not in seen:
            seen.add(entry)
            unique.append((*entry, limit))
    return unique


def _split_plans(family: str, stage: str, config, is_aligned: bool) -> list:
    """(plan, aligned, shared limit) of one split configuration: the Gluon backward's at aligned sizes once per
    device shared memory, from the smallest (planning.plan_for: where no copy slot fits, the pass runs the tl twin)."""
    from . import planning

    if family != "split-gluon":
        return [(planning.Plan("split", config), is_aligned, None)]
    if stage != "backward" or not is_aligned:
        return [(planning.Plan("split", config, "gluon"), is_aligned, None)]
    staged = ((planning.staged_backward(config, shared), shared) for shared in sorted(planning.SHARED_BYTES.values()))
    return [(planning.Plan("split", c, "gluon"), is_aligned, shared) for c, shared in staged if c is not None]


FAMILY_SWITCHES = {
    "single": ("reverse", "lengths", "telemetry", "proj"),
    "split": ("reverse", "lengths", "telemetry", "exchange"),
    "split-gluon": ("reverse", "lengths", "telemetry", "exchange"),
    "streaming": ("reverse", "lengths", "telemetry", "proj"),
}


# Restarts (state resets, docs/resets.md) are compiled for a representative subset only, so that they add under a
# tenth to the matrix (72 variants to 824) rather than doubling it: in each family that takes them
# (planning.RESTART_FAMILIES; not the Gluon split kernels), the largest aligned and the largest unaligned
# configuration that takes restarts (planning.split_takes_restarts) with every switch on plus restarts (the most
# registers a restarts launch can need), and the largest aligned one also with restarts alone. A launch without
# restarts compiles the same code as before the switch existed (its tensors are None, HAS_RESTARTS false): the
# other variants cover it.
RESTART_SWITCH = "resets"


def _restart_combos(family: str, largest: bool, everything: frozenset) -> list:
    """The restart variants of one configuration; `largest`: the family's largest of its alignment."""
    from . import planning

    if family not in planning.RESTART_FAMILIES or not largest:
        return []
    return [everything | {RESTART_SWITCH}]


def _config_takes_restarts(family: str, config, is_aligned: bool) -> bool:
    """Whether the plan would run a pass with restarts on this configuration (planning.split_takes_restarts)."""
    from . import planning

    return family != "split" or planning.split_takes_restarts(dict(config)["K_PAD"], is_aligned)


def variants(quick: bool = False) -> list[Variant]:
    """Every (family, stage, dtype, precision, switches, config, alignment) the launcher can produce. Every switch
    combination is compiled for each family's largest aligned configuration (the most registers); the other
    configurations with every switch on and every switch off, the two ends of their register budget; restarts for
    the subset RESTART_SWITCH's comment names. `quick` keeps each family's largest aligned configuration with every
    switch on (restarts too, where the family takes them)."""
    from . import planning

    result = []
    for family, stage, (dtype, precision) in itertools.product(FAMILY_SWITCHES, ("forward", "backward"), PRECISIONS):
        names = FAMILY_SWITCHES[family]
        everything = frozenset(names)
        seen_alignments = set()  # of the configurations that take restarts
        host_stepped_seen = False  # whether a configuration launchable host-stepped came (they come largest first)
        for index, (config, is_aligned, limit) in enumerate(family_configs(family, dtype, precision, stage)):
            takes = _config_takes_restarts(family, config, is_aligned)
            restart_combos = _restart_combos(family, takes and is_aligned not in seen_alignments, everything)
            # The largest configuration of each launch mode gets every combination: the first one, and where that one
            # is cooperative only (planning.split_max_pad), also the largest that is launched host-stepped.
            host_steppable = _launchable(family, dtype, precision, frozenset(), config, is_aligned)
            largest = index == 0 or (host_steppable and not host_stepped_seen)
            host_stepped_seen = host_stepped_seen or host_steppable
            if largest and takes and family in planning.RESTART_FAMILIES:
                restart_combos.append(frozenset({RESTART_SWITCH}))
            if takes:
                seen_alignments.add(is_aligned)
            if quick:
                if index == 0:
                    combo = (restart_combos or [everything])[0]
                    result.append(Variant(family, stage, dtype, precision, combo, config, shared_limit=limit))
                continue
            if largest:
                combos = [frozenset(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]
            else:
                combos = [frozenset(), everything]
            for switches in combos + restart_combos:
                if _possible(switches, config) and _launchable(family, dtype, precision, switches, config, is_aligned):
                    tail = {"aligned": is_aligned, "shared_limit": limit}
                    result.append(Variant(family, stage, dtype, precision, switches, config, **tail))
    return result


def _possible(switches, config) -> bool:
    """A layer without a projection has P = H: a single-kernel tile for P narrower than H's needs one."""
    pads = dict(config)
    return "proj" in switches or pads.get("P_PAD") == pads.get("H_PAD")


def _launchable(family: str, dtype: str, precision: str, switches, config, is_aligned: bool) -> bool:
    """Whether the plan launches a split configuration this way: host-stepped (no "exchange") only up to the pad it
    takes host-stepped (planning.split_max_pad)."""
    from . import planning

    if family != "split" or "exchange" in switches:
        return True
    return dict(config)["K_PAD"] <= planning.split_max_pad(
        _torch_dtype(dtype), precision, is_aligned, cooperative=False
    )


# ---------------------------------------------------------------------------------------------------------------
# Compiling the matrix
# ---------------------------------------------------------------------------------------------------------------


def compile_variant(variant: Variant, arch: int) -> Result:
    try:
        compiled = compile_kernel(variant, arch, ptxas_log=True)
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report, not a crash of the matrix
        return Result(variant, arch, None, None, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    text = compiled.ptxas_log
    registers = _last_int(r"Used (\d+) registers", text)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    return Result(variant, arch, registers, sum(spills) if spills else None, compiled.kernel.metadata.shared, None)


def _last_int(pattern: str, text: str) -> int | None:
    found = re.findall(pattern, text)
    return int(found[-1]) if found else None


def _compile_pair(args):
    return compile_variant(*args)


def _compiler_process():
    # The kernels must be real JIT functions here, even when the caller runs the interpreter (the test suite does):
    # workers start fresh (spawn) and clear the switch before anything imports triton.
    os.environ["TRITON_INTERPRET"] = "0"


def run_matrix(quick: bool = False, jobs: int = 2) -> list[Result]:
    # A variant planned for a device's shared memory compiles for the architectures that have as much.
    work = [(v, arch) for v in variants(quick) for arch in ARCHS if (v.shared_limit or 0) <= SHARED_LIMIT[arch]]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=context, initializer=_compiler_process) as pool:
        return list(pool.map(_compile_pair, work, chunksize=4))


def format_table(results: list[Result]) -> str:
    width = max([len(r.variant.name) for r in results] + [8])
    lines = [f"{'variant':<{width}} {'sm':>3} {'regs':>5} {'spill':>6} {'shared':>8}  status"]
    for r in results:
        status = "ok" if r.ok else (r.error or "SPILL/SHARED")
        lines.append(
            f"{r.variant.name:<{width}} {r.arch:>3} {_cell(r.registers):>5} {_cell(r.spill_bytes):>6} "
            f"{_cell(r.shared_bytes):>8}  {status}"
        )
    return "\n".join(lines)


def _cell(value) -> str:
    return "-" if value is None else str(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlstm aot", description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--quick", action="store_true", help="each family's largest configuration, every switch on")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile processes")
    parser.add_argument(
        "--model",
        action="store_true",
        help="run the performance model instead (fastlstm.kernels.model; the options after --model are its own)",
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--model" in argv:
        from . import model

        return model.main([a for a in argv if a != "--model"])
    args = parser.parse_args(argv)
    results = run_matrix(quick=args.quick, jobs=args.jobs)
    print(format_table(results))
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} variant/arch compiles pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
