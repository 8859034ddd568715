"""What one compiled kernel does per time step, read from its SASS: bytes, barriers, synchronisation, MMAs, the
dependent global round trips of a step, and a latency estimate.

    analysis = analyse(compiled, lstm_forward_kernel)            # once per compiled variant (no GPU)
    profile = analysis.per_step(dict(T=1024, B=16, H=1024, P=1024, **constexprs), programs=1)
    loads_weights_every_step(compiled, lstm_forward_kernel)      # True: W_hh streams from memory each step

The time loop is the kernel's outermost `for` over time (kernels/source.py); SASS instructions belong to it by
their line info, and nested SASS loops take their trip counts from the matching source loops evaluated at the
launch's sizes. A step's latency comes from replaying the time loop's instructions for one warp in issue order
(kernels/replay.py): register dependencies, asynchronous-copy groups, barriers and shared issue, memory and tensor-core
ports, with the latencies of kernels/hardware.py. docs/performance-model.md states the formula and its limits.
"""

from __future__ import annotations

import functools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from . import sass
from .hardware import H200, Hardware
from .replay import Replay, mma_rate
from .source import KernelSource, LoopRef

WEIGHT_ARGS = ("w_hh_ptr", "w_hr_ptr")
# Instructions counted to tell an unrolled copy of a loop body from its remainder loop.
_BODY_KINDS = ("global_load", "global_store", "async_copy", "shared_load", "shared_store", "mma")
# Share of a SASS loop's instructions a source loop must enclose to be the one it runs (the rest: loop control
# and address arithmetic the compiler attributes to lines outside it).
AGREEMENT = 0.8


@dataclass(frozen=True)
class KernelRoles:
    """What the model cannot read from the code, per kernel. Defaults fit fastlstm's argument names.

    weights: arguments holding W_hh / W_hr (the detector's target).
    first_step_only: arguments whose loads are masked off after the first step (h0, c0): counted apart, no cost.
    streamed: arguments read once per step from HBM (xw[t]); None infers them: loaded, never stored in the time
        loop, at an address that moves with the time loop's variable.
    time_loop_line: the kernel file line of the time loop's `for`, when the heuristic in source.py picks wrong.
    trip_counts: overrides for loops whose bounds the source reader cannot evaluate, by "file.py:line".
    """

    weights: tuple[str, ...] = WEIGHT_ARGS
    first_step_only: tuple[str, ...] = ("h0_ptr", "c0_ptr")
    streamed: tuple[str, ...] | None = None
    time_loop_line: int | None = None
    trip_counts: dict = field(default_factory=dict)


@dataclass
class MemoryOp:
    """One global-memory SASS instruction with what it touches."""

    instruction: sass.Instruction
    args: frozenset[str]  # pointer arguments its address is computed from (PTX dataflow)
    source_args: frozenset[str]  # the same read from the Python source (a cross-check)
    time_dependent: bool  # the address moves with the time loop's variable
    address_waits_for_load: bool  # the address is computed from a value loaded earlier
    in_time_loop: bool
    prologue: bool = False  # a software-pipelining prologue copy of a load inside a nested loop
    level: str = "L2"  # L1 | L2 | L2-far | HBM | masked

    @property
    def label(self) -> str:
        return "+".join(sorted(self.args)) or "?"


@dataclass
class LoopInfo:
    loop: sass.Loop
    ref: LoopRef | None  # the source `for` it runs, None for a while/poll loop
    kind: str  # time | for | poll | other


@dataclass
class StepProfile:
    """Per program, per time step (unless named per launch). Every time is modelled, never measured."""

    programs: int
    global_load_bytes: dict  # argument label -> bytes
    weight_load_bytes: float  # of which from the weight arguments
    weight_shared_load_bytes: float  # shared-memory reads of weights kept on chip
    first_step_only_bytes: dict
    global_store_bytes: dict
    shared_load_bytes: int
    shared_store_bytes: int
    barriers: int
    sync: dict
    mma: dict  # opcode -> count
    mma_flops: int
    ffma: int
    instructions: int  # dynamic, per warp
    round_trips: float
    round_trips_by_arg: dict
    cycles: float
    bounds_cycles: dict
    limiter: str
    step_us: float
    launch_load_bytes: dict
    notes: list

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}


class KernelAnalysis:
    def __init__(self, compiled, kernel, roles: KernelRoles = KernelRoles(), name: str | None = None):
        self.roles = roles
        self.name = name or getattr(kernel, "__name__", str(kernel))
        self.source = KernelSource(kernel, roles.time_loop_line)
        self.listing = sass.disassemble(compiled.asm["cubin"], compiled.asm["ptx"])
        self.num_warps = compiled.metadata.num_warps
        self.shared_bytes = compiled.metadata.shared
        self.pointer_args, self.param_names = _parameters(compiled, self.source.kernel.params)
        constants = getattr(compiled.src, "constants", {}) or {}
        params = self.source.kernel.params
        self.constexprs = {params[k[0]] if isinstance(k, tuple) else k: v for k, v in constants.items()}
        self.loops = self._classify_loops()
        self.unroll, self._main_loop = self._unrolling()
        self.time_loop = self._time_loop()
        self.time_unroll = self.unroll.get(self.time_loop.start, 1)
        self.ops = self._memory_ops()
        self._assign_levels()

    # ------------------------------------------------------------------------------------------ structure

    def _classify_loops(self) -> dict[int, LoopInfo]:
        """Each SASS loop's source loop: the deepest source loop around (nearly) all of its instructions, nested
        ones included, that is not already an enclosing SASS loop's (a loop the compiler made, such as a poll,
        keeps its parent's)."""
        infos = {}
        time_ref = LoopRef(self.source.kernel.file, self.source.time_loop.lineno, ())
        for loop in self.listing.all_loops():  # parents before children
            body = [i for i in self.listing.within(loop) if i.frames and not i.never_runs]
            paths = [p for i in body if (p := self.source.enclosing_loops(i.frames))]
            shared = []  # source loops around nearly every instruction, outermost first
            for depth in range(max(map(len, paths), default=0)):
                candidate, votes = Counter(p[depth] for p in paths if len(p) > depth).most_common(1)[0]
                if votes < AGREEMENT * len(paths):
                    break
                shared.append(candidate)
            outer, parent = set(), loop.parent
            while parent is not None:
                outer.add(infos[parent.start].ref)
                parent = parent.parent
            # The shallowest one no enclosing SASS loop runs yet, passing over loops with compile-time bounds
            # (unrolled, so they have no SASS loop of their own) while a deeper one is left.
            fresh = [r for r in shared if r not in outer]
            dynamic = [r for r in fresh if r.is_while or self.source.trip_count(r, self.constexprs) is None]
            ref = (dynamic or fresh or [None])[0]
            direct = self._direct(loop)
            polls = any(i.kind in ("global_load", "global_atomic") and "STRONG" in i.opcode for i in direct)
            if ref is None or ref.is_while:
                kind = "poll" if polls else "other"
            else:
                kind = "time" if ref == time_ref else "for"
            infos[loop.start] = LoopInfo(loop, ref, kind)
        return infos

    def _unrolling(self) -> tuple[dict, dict]:
        """LLVM may unroll a small loop with a run-time trip count: a main loop holding u copies of the body and a
        remainder loop holding one, both running the same source loop. (unroll factor per loop, main loop per
        source loop and parent.) A source loop with a single SASS loop is taken as not unrolled."""
        groups = defaultdict(list)
        for info in self.loops.values():
            if info.kind in ("time", "for"):
                parent = info.loop.parent.start if info.loop.parent else None
                groups[(parent, info.ref)].append(info.loop)
        unroll, main = {}, {}
        for key, loops in groups.items():
            if len(loops) < 2:
                continue
            copies = {
                lp.start: sum(1 for i in self._direct(lp) if i.kind in _BODY_KINDS and not i.never_runs) for lp in loops
            }
            base = max(1, min(copies.values()))
            for lp in loops:
                unroll[lp.start] = max(1, round(copies[lp.start] / base))
            main[key] = max(loops, key=lambda lp: unroll[lp.start]).start
        return unroll, main

    def _direct(self, loop: sass.Loop) -> list[sass.Instruction]:
        """Instructions of a loop outside its nested loops."""
        return [i for i in self.listing.within(loop) if not any(c.contains(i.address) for c in loop.children)]

    def _time_loop(self) -> sass.Loop:
        candidates = [info.loop for info in self.loops.values() if info.kind == "time"]
        if not candidates:  # the compiler merged the time loop's body into an inner loop's shape: take the
            # outermost loop holding mostly time-loop instructions
            scored = []
            for info in self.loops.values():
                body = [i for i in self.listing.within(info.loop) if i.frames and not i.never_runs]
                inside = sum(self.source.in_time_loop(i.frames) for i in body)
                if body and inside * 2 > len(body):
                    scored.append((info.loop.depth, -len(body), info.loop))
            if not scored:
                raise ValueError(f"{self.name}: no SASS loop runs the time loop at line {self.source.time_loop.lineno}")
            candidates = [min(scored, key=lambda s: (s[0], s[1]))[2]]
        outermost = min(lp.depth for lp in candidates)
        candidates = [lp for lp in candidates if lp.depth == outermost]
        # Unrolled: the main loop is the step's steady state; the remainder loop's few iterations are left out.
        return max(candidates, key=lambda lp: (self.unroll.get(lp.start, 1), -lp.start))

    def _memory_ops(self) -> dict[int, MemoryOp]:
        ops = {}
        kinds = ("global_load", "global_store", "global_atomic", "global_red", "async_copy")
        for ins in self.listing.instructions:
            if ins.kind not in kinds or ins.never_runs:
                continue
            params, loads = self.listing.ptx.address_origin(ins.ptx_line) if ins.ptx_line else ((), ())
            args = frozenset(self.param_names[p] for p in params if p < len(self.param_names)) & self.pointer_args
            source_args, time_dependent = self.source.pointer_origin(ins.frames)
            source_args = source_args & self.pointer_args
            if not args:  # no PTX trace (should not happen): fall back to the source's reading
                args = source_args
            ops[ins.address] = MemoryOp(
                ins, args, source_args, time_dependent, bool(loads), self.time_loop.contains(ins.address)
            )
        self._mark_prologues(ops)
        return ops

    def _mark_prologues(self, ops) -> None:
        """A pipelined loop's loads are issued early, once per stage, just above it: the same source load as one
        inside the loop. Those copies are the loop's first iterations' loads, not extra traffic."""
        for info in self.loops.values():
            loop = info.loop
            if loop.parent is None:
                continue
            inside = {ops[i.address].instruction.frames for i in self._direct(loop) if i.address in ops}
            for i in self._direct(loop.parent):
                op = ops.get(i.address)
                is_load = op is not None and op.instruction.kind in ("global_load", "async_copy")
                if is_load and op.instruction.frames in inside and i.address < loop.start:
                    op.prologue = True

    def _assign_levels(self) -> None:
        loop_ops = [op for op in self.ops.values() if op.in_time_loop]
        stored = set().union(*[op.args for op in loop_ops if op.instruction.kind == "global_store"] or [set()])
        body = self.listing.within(self.time_loop)
        self.invalidates_l1 = any(i.kind == "cctl" and "IVALL" in i.opcode for i in body)
        self.cross_program_sync = any(
            info.kind == "poll" for info in self.loops.values() if self.time_loop.contains(info.loop.start)
        ) or any(i.kind in ("global_atomic", "global_red") and "STRONG" in i.opcode for i in body)
        weights = set(self.roles.weights)
        first = set(self.roles.first_step_only)
        streamed = set(self.roles.streamed or ())
        for op in self.ops.values():
            ins = op.instruction
            if op.args and op.args <= first:
                op.level = "masked"
            elif "STRONG" in ins.opcode or ins.kind in ("global_atomic", "global_red"):
                op.level = "L2-far"
            elif op.args & stored and op.in_time_loop:
                op.level = "L2-far" if self.cross_program_sync else "L2"
            elif op.args & streamed or (self.roles.streamed is None and op.time_dependent and not op.args & weights):
                op.level = "HBM"
            elif "BYPASS" in ins.opcode or (self.invalidates_l1 and op.in_time_loop):
                op.level = "L2"
            else:
                op.level = "L1?"  # L1 if the per-step footprint fits beside shared memory: decided per shape

    # ------------------------------------------------------------------------------------------ queries

    def weight_loads_in_time_loop(self, weight_args=None) -> list[MemoryOp]:
        weights = set(weight_args or self.roles.weights)
        return [
            op
            for op in self.ops.values()
            if op.in_time_loop and op.instruction.kind in ("global_load", "async_copy") and op.args & weights
        ]

    @functools.cached_property
    def _polls_read_before(self) -> frozenset[int]:
        """The poll loops whose first read of the polled words is made before the loop, in its parent: code that
        reads the flags once and loops while they are not up, or a loop whose first iteration the compiler peeled.
        A poll succeeds at its first read in the model, so the body of such a loop never runs."""
        starts = set()
        for info in self.loops.values():
            if info.kind != "poll" or info.loop.parent is None:
                continue
            polled = self._strong_load_args(self._direct(info.loop))
            before = [i for i in self._direct(info.loop.parent) if i.address < info.loop.start]
            if polled and polled <= self._strong_load_args(before):
                starts.add(info.loop.start)
        return frozenset(starts)

    def _strong_load_args(self, instructions) -> set:
        """The pointer arguments read by the strong (volatile or acquire) global loads among `instructions`."""
        found = set()
        for ins in instructions:
            op = self.ops.get(ins.address)
            if op is not None and ins.kind == "global_load" and "STRONG" in ins.opcode:
                found |= op.args
        return found

    def iterations(self, loop: sass.Loop, scalars: dict, notes: list | None = None) -> int:
        info = self.loops[loop.start]
        if info.kind == "poll" and loop.start in self._polls_read_before:
            return 0  # its first read, before it, already succeeded
        if info.kind in ("poll", "other") or info.ref is None:
            return 1  # a poll succeeds the first time in the model: waiting for the slowest program is not modelled
        key = f"{info.ref.file}:{info.ref.line}"
        override = self.roles.trip_counts.get(key)
        if override is not None:
            n = int(override(scalars) if callable(override) else override)
        else:
            n = self.source.trip_count(info.ref, scalars)
        if n is None:
            if notes is not None:
                notes.append(f"trip count of {key} not evaluable; taken as 1 (give it in KernelRoles.trip_counts)")
            return 1
        u = self.unroll.get(loop.start, 1)
        main = self._main_loop.get((loop.parent.start if loop.parent else None, info.ref))
        if main is None:
            return n
        if main == loop.start:
            return n // u
        return (n % self.unroll[main]) // u  # a remainder loop

    def executions(self, ins: sass.Instruction, scalars: dict, notes=None, within: sass.Loop | None = None) -> int:
        """How often an instruction runs per iteration of `within` (the time loop by default; None and outside
        it: per launch)."""
        loop = self.listing.loop_of(ins.address)
        count = 1
        stop = within if within is not None else self.time_loop
        while loop is not None and loop is not stop:
            count *= self.iterations(loop, scalars, notes)
            loop = loop.parent
        return count

    # ------------------------------------------------------------------------------------------ per step

    def per_step(self, scalars: dict, programs: int = 1, hw: Hardware = H200) -> StepProfile:
        """Counts and estimate for one launch: `scalars` are the kernel's integer arguments (T, B, H, ...; the
        variant's constexprs are added), `programs` the grid size (for the shared L2 and HBM limits)."""
        scalars = {**self.constexprs, **scalars}
        notes: list[str] = []
        c = self._count(scalars, notes)
        fits_l1 = sum(c["l1_candidates"].values()) <= hw.l1_bytes.value - self.shared_bytes
        levels = {a: ("L1" if fits_l1 else "L2") if op.level == "L1?" else op.level for a, op in self.ops.items()}
        loads, stores = c["loads"], c["stores"]
        weights = set(self.roles.weights)
        weight_bytes = sum(b for label, b in loads.items() if set(label.split("+")) & weights)

        cycles, trips, trips_by_arg = Replay(self, scalars, programs, hw, levels, notes).step()
        by_level = Counter()
        for address, n in c["load_bytes_at"].items():
            by_level[levels[address]] += n
        l2_bytes = sum(b for level, b in by_level.items() if level != "L1") + sum(stores.values())
        hbm_bytes = by_level.get("HBM", 0) + sum(stores.values())
        clock = hw.clock_ghz.value * 1e9
        bounds = {
            "latency_path": cycles,
            "l2_aggregate": programs * l2_bytes / hw.l2_bandwidth.value * clock,
            "hbm": programs * hbm_bytes / hw.hbm_bandwidth.value * clock,
            "issue": c["instructions"] * self.num_warps / hw.warp_schedulers_per_sm.value,
            "shared_memory": (c["shared_loads"] + c["shared_stores"]) / hw.shared_bytes_per_clock.value,
            "tensor_cores": c["mma_flops"] * self.num_warps / mma_rate(hw, self._mma_opcode()),
        }
        limiter = max(("latency_path", "l2_aggregate", "hbm"), key=lambda k: bounds[k])
        return StepProfile(
            programs=programs,
            global_load_bytes=dict(loads),
            weight_load_bytes=weight_bytes,
            weight_shared_load_bytes=c["weight_shared_loads"],
            first_step_only_bytes=dict(c["first"]),
            global_store_bytes=dict(stores),
            shared_load_bytes=c["shared_loads"],
            shared_store_bytes=c["shared_stores"],
            barriers=c["barriers"],
            sync=dict(c["sync"]),
            mma=dict(c["mma"]),
            mma_flops=c["mma_flops"],
            ffma=c["ffma"],
            instructions=c["instructions"],
            round_trips=trips,
            round_trips_by_arg=trips_by_arg,
            cycles=cycles,
            bounds_cycles=bounds,
            limiter=limiter,
            step_us=hw.cycles_to_us(bounds[limiter]),
            launch_load_bytes=dict(c["launch"]),
            notes=sorted(set(notes)),
        )

    def _count(self, scalars: dict, notes: list) -> dict:
        """Per-step totals of one program (an unrolled time loop's counts divided by its unroll factor), and the
        global loads outside the time loop (per launch)."""
        threads, u = 32 * self.num_warps, self.time_unroll
        c = {
            k: Counter()
            for k in ("loads", "first", "stores", "launch", "mma", "sync", "l1_candidates", "load_bytes_at")
        }
        c.update(
            shared_loads=0, shared_stores=0, weight_shared_loads=0, barriers=0, ffma=0, instructions=0, mma_flops=0
        )
        weights = set(self.roles.weights)
        weight_frames = {op.instruction.frames for op in self.ops.values() if op.args & weights}
        remainders = [
            lp
            for lp in self.listing.all_loops()
            if lp is not self.time_loop and self.loops[lp.start].kind == "time" and lp.depth == self.time_loop.depth
        ]
        for ins in self.listing.instructions:
            if ins.never_runs or any(lp.contains(ins.address) for lp in remainders):
                continue
            op = self.ops.get(ins.address)
            n = self.executions(ins, scalars, notes)
            nbytes = n * ins.bytes_per_thread * threads
            loads = op is not None and ins.kind in ("global_load", "async_copy")
            if not self.time_loop.contains(ins.address):
                if loads:
                    c["launch"][op.label] += nbytes
                continue
            share = nbytes / u
            c["instructions"] += n / u
            if loads and not op.prologue:
                c["first" if op.level == "masked" else "loads"][op.label] += share
                if op.level != "masked":
                    c["load_bytes_at"][ins.address] += share
                if op.level == "L1?":
                    c["l1_candidates"][ins.address] = share
            if op is not None and ins.kind == "global_store":
                c["stores"][op.label] += share
            if ins.kind == "shared_load":
                c["shared_loads"] += share
                if ins.frames in weight_frames:  # W kept in shared memory: its reads carry W's load location
                    c["weight_shared_loads"] += share
            if ins.kind in ("shared_store", "async_copy"):
                c["shared_stores"] += share
            if ins.kind == "barrier":
                c["barriers"] += n / u
            if ins.kind == "mma":
                c["mma"][ins.opcode] += n / u
                c["mma_flops"] += n * sass.mma_flops(ins.opcode) / u
            if ins.base in ("FFMA", "DFMA"):
                c["ffma"] += n / u
            if kind := _sync_kind(ins):
                c["sync"][kind] += n / u
        c["sync"]["poll_loops"] = sum(
            1 for i in self.loops.values() if i.kind == "poll" and self.time_loop.contains(i.loop.start)
        )
        return c

    def _mma_opcode(self) -> str:
        return next((i.opcode for i in self.listing.within(self.time_loop) if i.kind == "mma"), "")


def analyse(compiled, kernel, roles: KernelRoles = KernelRoles(), name: str | None = None) -> KernelAnalysis:
    """Static analysis of one compiled variant (triton.compile's result for sm_90) of a @triton.jit kernel."""
    return KernelAnalysis(compiled, kernel, roles, name)


def loads_weights_every_step(compiled, kernel, weight_args=WEIGHT_ARGS) -> bool:
    """Whether any global load inside the kernel's time loop reads one of `weight_args` (W_hh, W_hr): the check
    that a kernel meant to keep its weights on chip does. Shape-independent; needs no GPU."""
    roles = KernelRoles(weights=tuple(weight_args))
    return bool(analyse(compiled, kernel, roles).weight_loads_in_time_loop())


# ---------------------------------------------------------------------------------------------- helpers


def _parameters(compiled, arg_names) -> tuple[frozenset[str], list[str]]:
    """(pointer arguments, names of the PTX parameters in order): constexpr arguments are not parameters."""
    signature = dict(getattr(compiled.src, "signature", {}) or {})
    names, pointers = [], set()
    for name in arg_names:
        kind = signature.get(name, "")
        if kind == "constexpr":
            continue
        names.append(name)
        if str(kind).startswith("*"):
            pointers.add(name)
    return frozenset(pointers), names


def _sync_kind(ins: sass.Instruction) -> str | None:
    if ins.kind == "global_atomic":
        return "atomics"
    if ins.kind == "global_red":
        return "reductions"
    if ins.kind == "global_load" and "STRONG" in ins.opcode:
        return "strong_loads"
    if ins.kind == "fence" and ins.base == "MEMBAR":
        return "fences"
    if ins.kind == "cctl":
        return "cctl_invalidations"
    return None
