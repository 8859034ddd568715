"""One warp's walk through a kernel's time loop in issue order: the latency of a time step, and the dependent global
round trips on its critical path (kernels/analysis.py counts everything else and calls this for the latency bound).

The replay knows instructions only as kernels/sass.py decodes them and latencies only as kernels/hardware.py gives
them; which SASS loop runs which source loop, how often, and where each memory access is served from are the
analysis's findings, read from the KernelAnalysis (kernels/analysis.py) it is given, which this module never
imports. docs/performance-model.md states the method.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict

from . import sass
from .hardware import Hardware


def mma_rate(hw: Hardware, opcode: str) -> float:
    """FLOP per clock per SM of mma.sync for this opcode's input type (TF32 at half the 16-bit rate)."""
    rate = hw.dense_16bit_flops_per_clock_per_sm.value * hw.mma_sync_fraction.value
    if "HGMMA" in opcode:
        rate = hw.dense_16bit_flops_per_clock_per_sm.value
    return rate / 2 if "TF32" in opcode else rate


class Replay:
    """One warp's issue-ordered walk through the time loop, every warp of the program assumed to do the same.

    Time advances by the issue interval (warps share the SM's schedulers), by waits for source registers, for
    asynchronous-copy groups (DEPBAR) and for outstanding stores (MEMBAR.GPU), and by barrier costs. Global
    accesses queue on the SM's L2 port, shared accesses on its shared-memory port and MMAs on its tensor cores,
    each charged for the whole program (all warps). `depth` counts dependent global round trips: a load's value
    carries the depth of the instruction stream when it was issued plus one, and consuming it raises the stream's.
    """

    STEPS = 3  # time-loop iterations replayed; the last one is the steady state reported
    SAMPLE = 6  # iterations replayed of an inner loop before extrapolating

    def __init__(self, analysis, scalars, programs, hw: Hardware, levels, notes):
        self.a, self.scalars, self.hw, self.levels, self.notes = analysis, scalars, hw, levels, notes
        self.warps = analysis.num_warps
        self.issue = max(1.0, self.warps / hw.warp_schedulers_per_sm.value)
        per_sm = min(hw.l2_bytes_per_clock_per_sm.value, hw.l2_bandwidth.value / (hw.clock_ghz.value * 1e9) / programs)
        self.l2_rate = per_sm
        self.latency = {
            "L1": hw.l1_latency.value,
            "L2": hw.l2_latency.value,
            "L2-far": hw.l2_far_latency.value,
            "HBM": hw.hbm_latency.value,
        }
        self.t = 0.0
        self.depth = 0.0
        self.ready, self.rdepth, self.rorigin = defaultdict(float), defaultdict(float), {}
        self.groups: list[list] = []  # closed cp.async groups: [done, depth, origin]
        self.open: list | None = None
        self.ports = defaultdict(float)
        self.stores_done, self.stores_depth = 0.0, 0.0
        self.trips_by_arg = Counter()
        self.body = self._region(analysis.time_loop)

    def _region(self, loop: sass.Loop) -> list:
        items, i = [], 0
        instructions = self.a.listing.within(loop)
        while i < len(instructions):
            ins = instructions[i]
            child = next((c for c in loop.children if c.contains(ins.address)), None)
            if child is None:
                items.append(ins)
                i += 1
            else:
                items.append((child, self._region(child)))
                while i < len(instructions) and child.contains(instructions[i].address):
                    i += 1
        return items

    def step(self) -> tuple[float, float, dict]:
        marks = []
        for k in range(self.STEPS):
            if k == self.STEPS - 1:
                self.trips_by_arg.clear()
            self._run(self.body, set())
            marks.append((self.t, self.depth))
        (t0, d0), (t1, d1) = marks[-2], marks[-1]
        u = self.a.time_unroll  # an unrolled time loop runs u steps per iteration
        trips = {k: round(v / u, 2) for k, v in self.trips_by_arg.most_common()}
        return (t1 - t0) / u, (d1 - d0) / u, trips

    def _run(self, items, written: set) -> None:
        for item in items:
            if isinstance(item, tuple):
                loop, body = item
                self._loop(loop, body, self.a.iterations(loop, self.scalars, self.notes), written)
            else:
                self._instruction(item, written)

    def _loop(self, loop, body, n: int, outer_written: set) -> None:
        """Replay up to SAMPLE iterations, then extrapolate the rest from the last two (pipelined loops
        alternate), shifting every value and port the loop touched by the extrapolated time."""
        if n <= 0:
            return
        written: set = set()
        groups_before = len(self.groups)
        marks = [(self.t, self.depth, Counter(self.trips_by_arg))]
        for _ in range(min(n, self.SAMPLE)):
            self._run(body, written)
            marks.append((self.t, self.depth, Counter(self.trips_by_arg)))
        rest = n - (len(marks) - 1)
        if rest > 0:
            span = min(2, len(marks) - 1)
            (t_a, d_a, trips_a), (t_b, d_b, trips_b) = marks[-1 - span], marks[-1]
            shift, deepen = (t_b - t_a) / span * rest, (d_b - d_a) / span * rest
            start = marks[0][0]
            self.t += shift
            self.depth += deepen
            for reg in written:
                self.ready[reg] += shift
                self.rdepth[reg] += deepen
            for g in self.groups[groups_before:] + ([self.open] if self.open else []):
                g[0] += shift
                g[1] += deepen
            for port, free in list(self.ports.items()):
                if free > start:
                    self.ports[port] = free + shift
            for label in trips_b:
                self.trips_by_arg[label] += (trips_b[label] - trips_a.get(label, 0)) / span * rest
        outer_written |= written

    def _consume(self, regs) -> float:
        start = self.t + self.issue
        deepest, origin = self.depth, None
        for r in regs:
            start = max(start, self.ready[r])
            if self.rdepth[r] > deepest:
                deepest, origin = self.rdepth[r], self.rorigin.get(r)
        self._raise(deepest, origin)
        return start

    def _raise(self, depth: float, origin) -> None:
        if depth > self.depth:
            self.trips_by_arg[origin or "?"] += depth - self.depth
            self.depth = depth

    def _port(self, name: str, start: float, busy: float) -> float:
        begin = max(start, self.ports[name])
        self.ports[name] = begin + busy
        return begin + busy

    def _instruction(self, ins: sass.Instruction, written: set) -> None:
        if ins.never_runs:
            return
        hw, kind = self.hw, ins.kind
        start = self._consume(ins.registers("src"))
        dests = ins.registers("dest")
        latency, depth, origin = hw.alu_latency.value, self.depth, None
        program_bytes = ins.bytes_per_thread * 32 * self.warps
        op = self.a.ops.get(ins.address)
        if kind in ("global_load", "global_atomic", "async_copy") and op is not None:
            level = self.levels[ins.address]
            if level == "masked":
                latency = hw.alu_latency.value
            else:
                done = self._port("l2", start, program_bytes / self.l2_rate) if level != "L1" else start
                latency = done - start + self.latency[level]
                if "STRONG" in ins.opcode and self.a.cross_program_sync and kind == "global_load":
                    latency += hw.poll_release_wait.value * hw.l2_far_latency.value  # the release lands first
                depth, origin = (self.depth + 1, op.label) if level != "L1" else (self.depth, None)
            if kind == "async_copy":
                if self.open is None:
                    self.open = [start, self.depth, origin]
                self.open[0] = max(self.open[0], start + latency)
                if depth > self.open[1]:
                    self.open[1], self.open[2] = depth, origin
                self.t = start
                return
        elif kind == "async_commit":
            if self.open is not None:
                self.groups.append(self.open)
                self.open = None
        elif kind == "async_wait":
            keep = _depbar_keep(ins)
            waited = self.groups[: max(0, len(self.groups) - keep)]
            self.groups = self.groups[len(waited) :]
            for done, d, o in waited:
                start = max(start, done)
                self._raise(d, o)
        elif kind == "barrier":
            start += hw.barrier_cycles.value
        elif kind == "fence" and ins.base == "MEMBAR":
            if self.stores_done > start:
                start = self.stores_done
                self._raise(self.stores_depth + 1, "store visibility")
            self.stores_done = 0.0
        elif kind == "cctl":
            start += hw.cctl_cycles.value
        elif kind in ("global_store", "global_red") and op is not None:
            self._port("l2", start, program_bytes / self.l2_rate)
            self.stores_done = max(self.stores_done, start + hw.l2_latency.value)
            self.stores_depth = max(self.stores_depth, self.depth)
        elif kind in ("shared_load", "shared_store"):
            done = self._port("smem", start, program_bytes / hw.shared_bytes_per_clock.value)
            latency = done - start + (hw.shared_latency.value if kind == "shared_load" else 0)
        elif kind == "mma":
            busy = sass.mma_flops(ins.opcode) * self.warps / mma_rate(hw, ins.opcode)
            begin = max(start, self.ports["tensor"])
            self.ports["tensor"] = begin + busy
            start, latency = begin, hw.mma_latency.value
        elif kind == "mufu":
            latency = hw.mufu_latency.value
        elif ins.base in ("S2R", "S2UR", "CS2R"):
            latency = hw.special_register_latency.value
        self.t = start
        for r in dests:
            self.ready[r] = start + latency
            self.rdepth[r] = depth
            self.rorigin[r] = origin
            written.add(r)


def _depbar_keep(ins: sass.Instruction) -> int:
    """DEPBAR.LE SB0, n: wait until at most n copy groups are still in flight."""
    for op in ins.operands[1:]:
        m = re.fullmatch(r"0x([0-9a-f]+)|(\d+)", op.strip())
        if m:
            return int(m.group(1), 16) if m.group(1) else int(m.group(2))
    return 0
