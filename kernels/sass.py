"""Reading what triton compiled: the SASS of a cubin, the PTX it came from, and the links between them.

Three facts make this work without a GPU. `nvdisasm -gp` (shipped in triton's wheel) tags every SASS instruction
with the line of the PTX it was assembled from; every PTX line sits under a `.loc` whose comment spells the whole
inlining chain (`cell.py:43:36 @[ cell.py:36:82 @[ recurrent_fwd.py:54:73 ] ]`), so each instruction is traced to a
source line of the kernel *and* to the call sites of the @triton.jit helpers it was inlined from; and the PTX is
plain register code, so the address of every global access can be followed back to the `ld.param` of the kernel
argument it is computed from, whatever the helpers called that pointer.

Nothing here knows about LSTMs: `analysis.py` turns these facts into per-step counts.
"""

from __future__ import annotations

import functools
import os
import re
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field

Frame = tuple[str, int, int]  # (file basename, line, column)


@functools.lru_cache(maxsize=1)
def nvdisasm_path() -> str:
    """The nvdisasm that ships with triton's NVIDIA backend (no CUDA toolkit needed)."""
    from triton.backends import nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "nvdisasm")
    if not os.path.exists(path):
        raise FileNotFoundError(f"nvdisasm not found at {path}; the model needs triton's NVIDIA backend")
    return path


# ---------------------------------------------------------------------------------------------------------- PTX


@dataclass
class PtxInstruction:
    line: int  # 1-based line in the PTX text
    opcode: str  # e.g. "ld.global.v4.b32"
    dests: list[str]
    sources: list[str]
    address: str | None  # the register inside [...] of a memory operand, if any
    frames: tuple[Frame, ...]  # source chain, innermost first
    predicate: str | None = None


@dataclass
class Ptx:
    text: str
    instructions: dict[int, PtxInstruction]  # by line
    params: dict[str, int]  # register loaded by ld.param -> parameter index
    defs: dict[str, list[int]]  # register -> lines of the instructions writing it
    files: dict[int, str]  # .file index -> path
    origins: dict = field(default_factory=dict)  # memo of address_origin

    def frames_at(self, line: int) -> tuple[Frame, ...]:
        ins = self.instructions.get(line)
        return ins.frames if ins else ()

    def address_origin(self, line: int) -> tuple[frozenset[int], frozenset[int]]:
        """(kernel parameter indices, lines of loads) that the address of the memory instruction at `line` is
        computed from. A non-empty second set means the address itself waits for an earlier load."""
        cache = self.origins
        if line not in cache:
            ins = self.instructions.get(line)
            cache[line] = self._slice(ins.address) if ins and ins.address else (frozenset(), frozenset())
        return cache[line]

    def _slice(self, register: str) -> tuple[frozenset[int], frozenset[int]]:
        params, loads, seen, todo = set(), set(), set(), [register]
        while todo:
            reg = todo.pop()
            if reg in seen:
                continue
            seen.add(reg)
            if reg in self.params:
                params.add(self.params[reg])
                continue
            for def_line in self.defs.get(reg, ()):
                ins = self.instructions[def_line]
                if _is_data_load(ins.opcode):
                    loads.add(def_line)  # the value of a load, not its address: stop here
                    continue
                todo.extend(ins.sources)
        return frozenset(params), frozenset(loads)


_LOC = re.compile(r"^\s*\.loc\s+(\d+)\s+(\d+)\s+(\d+)(?:[^/]*)(?://\s*(.*))?$")
_FILE = re.compile(r'^\s*\.file\s+(\d+)\s+"([^"]+)"')
_CHAIN = re.compile(r"([\w.\-<>]+):(\d+):(\d+)")
_REG = re.compile(r"%[a-z]+\d*")
_PARAM = re.compile(r"\[(\w+?)_param_(\d+)\]")
_NO_DEST = ("st.", "red.", "bar", "barrier", "cp.async", "fence", "membar", "bra", "ret", "exit", "prefetch", "@")


def _is_data_load(opcode: str) -> bool:
    return opcode.startswith(("ld.", "atom.", "ldu.", "ldmatrix", "cp.async")) and not opcode.startswith("ld.param")


def parse_ptx(text: str) -> Ptx:
    """Instructions with their source chains and register def sites (enough for backward slices)."""
    instructions, params, defs, files = {}, {}, defaultdict(list), {}
    frames: tuple[Frame, ...] = ()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("//"):
            continue
        if m := _FILE.match(line):
            files[int(m.group(1))] = m.group(2)
            continue
        if m := _LOC.match(raw):
            chain = tuple((f, int(a), int(b)) for f, a, b in _CHAIN.findall(m.group(4) or ""))
            if not chain:
                path = files.get(int(m.group(1)), "?")
                chain = ((os.path.basename(path), int(m.group(2)), int(m.group(3))),)
            frames = chain
            continue
        if line.startswith(".") or line.endswith(":") or line in ("{", "}") or not line.endswith(";"):
            continue
        body = line[:-1].split("//")[0].strip()
        predicate = None
        if body.startswith("@"):
            predicate, body = body.split(None, 1)
        opcode, _, rest = body.partition(" ")
        operands = _split_operands(rest)
        # The global address: the first [...] operand, except for cp.async, whose first one is the shared-memory
        # destination.
        brackets = [regs[0] for op in operands if op.startswith("[") and (regs := _REG.findall(op))]
        address = (brackets[1:] if opcode.startswith("cp.async") else brackets)[:1]
        address = address[0] if address else None
        if opcode.startswith(_NO_DEST):
            dest_ops, src_ops = [], operands
        else:
            dest_ops, src_ops = operands[:1], operands[1:]
        dests = [r for op in dest_ops for r in _REG.findall(op)]
        sources = [r for op in src_ops for r in _REG.findall(op)]
        if predicate:
            sources += _REG.findall(predicate)
        if opcode.startswith("ld.param") and (m := _PARAM.search(rest)) and dests:
            params[dests[0]] = int(m.group(2))
        for reg in dests:
            defs[reg].append(number)
        instructions[number] = PtxInstruction(number, opcode, dests, sources, address, frames, predicate)
    return Ptx(text, instructions, params, dict(defs), files)


def _split_operands(rest: str) -> list[str]:
    """Top-level comma-separated operands ({...} vectors and [...] addresses kept whole)."""
    out, depth, current = [], 0, []
    for ch in rest:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        out.append("".join(current).strip())
    return out


# --------------------------------------------------------------------------------------------------------- SASS


@dataclass
class Instruction:
    address: int
    opcode: str  # full mnemonic with modifiers, e.g. "LDG.E.128"
    operands: list[str]
    predicate: str | None  # "@P0", "@!P3", ... or None
    ptx_line: int | None
    kind: str = ""  # see classify()
    bytes_per_thread: int = 0
    frames: tuple[Frame, ...] = ()

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def never_runs(self) -> bool:
        # ptxas pads with `@!PT LDS RZ, [RZ]`: a predicate that is never true.
        return self.predicate == "@!PT"

    def registers(self, which: str) -> list[str]:
        """Registers written ("dest") or read ("src"): general (R), uniform (UR) and predicate (P) registers, a
        vector or 64-bit operand expanded to every register it spans."""
        if self.kind in ("barrier", "fence", "cctl", "exit"):
            return []
        ops = self.operands
        writes = self.kind not in ("global_store", "shared_store", "global_red", "async_copy", "branch")
        n_dest = (2 if self.base.endswith("SETP") else 1) if writes and ops else 0
        chosen = ops[:n_dest] if which == "dest" else ops[n_dest:]
        regs = []
        for index, op in enumerate(chosen):
            width = 1 if "[" in op else self._width(which, index + (0 if which == "dest" else n_dest))
            for m in _REGISTER.finditer(op):
                prefix, number, wide = m.group(1), int(m.group(2)), m.group(3)
                span = 2 if wide else width if prefix in ("R", "UR") else 1
                regs.extend(f"{prefix}{number + k}" for k in range(span))
        if which == "src" and self.predicate and self.predicate.lstrip("@!") != "PT":
            regs.append(self.predicate.lstrip("@!"))
        return regs

    def _width(self, which: str, index: int) -> int:
        """How many consecutive registers the operand at `index` names."""
        if self.kind in ("global_load", "shared_load", "global_atomic") and which == "dest":
            return max(1, self.bytes_per_thread // 4)
        if self.kind in ("global_store", "shared_store") and index == len(self.operands) - 1:
            return max(1, self.bytes_per_thread // 4)
        if self.kind == "mma" and (shape := mma_shape(self.opcode)):
            m, n, k, acc_bits = shape
            in_bits = 32 if "TF32" in self.opcode else 8 if "E4M3" in self.opcode or "E5M2" in self.opcode else 16
            acc, a, b = m * n * acc_bits // 1024, m * k * in_bits // 1024, n * k * in_bits // 1024
            return max(1, acc if which == "dest" else (a, b, acc)[min(index - 1, 2)])
        return 1


_REGISTER = re.compile(r"\b(UR|R|UP|P)(\d+)(\.64)?\b")


def classify(opcode: str) -> tuple[str, int]:
    """(kind, bytes per thread) of a SASS mnemonic. Kinds: global_load, global_store, global_atomic, global_red,
    async_copy (LDGSTS: global -> shared), async_wait (DEPBAR), async_commit (LDGDEPBAR), shared_load,
    shared_store, barrier (BAR), fence (MEMBAR/ERRBAR), cctl, mma, mufu, branch, exit, alu."""
    parts = opcode.split(".")
    base = parts[0]
    width = _access_bytes(parts)
    if base in ("LDG", "LD"):
        return "global_load", width
    if base in ("STG", "ST"):
        return "global_store", width
    if base in ("ATOMG", "ATOM"):
        return "global_atomic", width
    if base in ("REDG", "RED"):
        return "global_red", width
    if base == "LDGSTS":
        return "async_copy", width
    if base == "DEPBAR":
        return "async_wait", 0
    if base == "LDGDEPBAR":
        return "async_commit", 0
    if base in ("LDS", "LDSM"):
        if base == "LDSM":
            return "shared_load", 4 * _ldsm_count(parts)
        return "shared_load", width
    if base in ("STS", "STSM"):
        return "shared_store", width
    if base in ("BAR", "BSYNC_BAR"):
        return "barrier", 0
    if base in ("MEMBAR", "ERRBAR", "CGAERRBAR", "FENCE"):
        return "fence", 0
    if base == "CCTL":
        return "cctl", 0
    if base in ("HMMA", "HGMMA", "IMMA", "QGMMA", "DMMA"):
        return "mma", 0
    if base == "MUFU":
        return "mufu", 0
    if base in ("BRA", "BRX", "JMP", "CALL", "RET"):
        return "branch", 0
    if base == "EXIT":
        return "exit", 0
    return "alu", 0


def _access_bytes(parts: list[str]) -> int:
    for p in parts[1:]:
        if p in ("128", "64", "U16", "S16", "U8", "S8"):
            return {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}[p]
        if p == "F64":
            return 8
    return 4


def _ldsm_count(parts: list[str]) -> int:
    # LDSM.16.M88.4 loads four 8x8 16-bit matrices: four registers per thread.
    last = parts[-1]
    return int(last) if last.isdigit() and last in ("1", "2", "4") else 1


def mma_shape(opcode: str) -> tuple[int, int, int, int] | None:
    """(m, n, k, accumulator bits) of an HMMA/HGMMA mnemonic, e.g. HMMA.16816.F32.BF16 -> (16, 8, 16, 32)."""
    parts = opcode.split(".")
    acc_bits = 16 if "F16" in parts[2:3] and parts[0] == "HMMA" else 32
    if parts[0] == "HMMA":
        shape = {"16816": (16, 8, 16), "1688": (16, 8, 8), "884": (8, 8, 4), "168": (16, 8, 8)}.get(parts[1])
        return (*shape, acc_bits) if shape else None
    if parts[0] in ("HGMMA", "QGMMA"):
        m = re.match(r"(\d+)x(\d+)x(\d+)", parts[1])
        return (int(m.group(1)), int(m.group(2)), int(m.group(3)), 32) if m else None
    return None


def mma_flops(opcode: str) -> int:
    shape = mma_shape(opcode)
    return 2 * shape[0] * shape[1] * shape[2] if shape else 0


@dataclass
class Loop:
    start: int  # address of the first instruction (the back edge's target)
    end: int  # address of the back-edge branch
    children: list[Loop] = field(default_factory=list)
    parent: Loop | None = None

    def contains(self, address: int) -> bool:
        return self.start <= address <= self.end

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth + 1


@dataclass
class Listing:
    """One kernel's SASS, each instruction linked to its PTX line and source chain."""

    instructions: list[Instruction]
    loops: list[Loop]  # outermost first; nested loops in .children
    ptx: Ptx

    def loop_of(self, address: int) -> Loop | None:
        """The innermost loop containing an address."""
        found, level = None, self.loops
        while True:
            inner = next((lp for lp in level if lp.contains(address)), None)
            if inner is None:
                return found
            found, level = inner, inner.children

    def all_loops(self) -> list[Loop]:
        out, todo = [], list(self.loops)
        while todo:
            lp = todo.pop(0)
            out.append(lp)
            todo.extend(lp.children)
        return out

    def within(self, loop: Loop) -> list[Instruction]:
        return [i for i in self.instructions if loop.contains(i.address)]


_SASS = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
_PTX_LINE = re.compile(r'//## File "\.nv_debug_ptx_txt", line (\d+)')
_TARGET = re.compile(r"`\(\.L_x_(\d+)\)")
_LABEL = re.compile(r"^\.L_x_(\d+):")


def disassemble(cubin: bytes, ptx_text: str) -> Listing:
    """SASS of the (single-kernel) cubin with PTX line info, parsed into instructions and loops."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run(
            [nvdisasm_path(), "-c", "-gp", f.name], capture_output=True, text=True, check=True, timeout=120
        ).stdout
    return parse_listing(out, parse_ptx(ptx_text))


def parse_listing(text: str, ptx: Ptx) -> Listing:
    instructions, labels, branches = [], {}, []
    ptx_line = None
    pending_labels = []
    for raw in text.splitlines():
        if m := _PTX_LINE.search(raw):
            ptx_line = int(m.group(1))
            continue
        if m := _LABEL.match(raw.strip()):
            pending_labels.append(int(m.group(1)))
            continue
        m = _SASS.search(raw)
        if not m:
            continue
        address = int(m.group(1), 16)
        for label in pending_labels:
            labels[label] = address
        pending_labels = []
        opcode, rest = m.group(3), m.group(4)
        predicate = m.group(2).strip() if m.group(2) else None
        kind, width = classify(opcode)
        ins = Instruction(address, opcode, _split_operands(rest), predicate, ptx_line, kind, width)
        ins.frames = ptx.frames_at(ptx_line) if ptx_line else ()
        instructions.append(ins)
        if kind == "branch" and (t := _TARGET.search(rest)):
            branches.append((address, int(t.group(1))))
    for label in pending_labels:  # a label after the last instruction
        labels[label] = instructions[-1].address + 16 if instructions else 0
    # A back edge is a branch to an address at or before it; a branch to itself (ptxas ends code with one after
    # EXIT) is not a loop anything runs.
    spans = sorted({(labels[t], a) for a, t in branches if t in labels and labels[t] < a}, key=lambda s: (s[0], -s[1]))
    return Listing(instructions, _nest(spans), ptx)


def _nest(spans) -> list[Loop]:
    """Loops from back-edge spans (target <= branch); spans sharing a start merge into the widest."""
    roots: list[Loop] = []
    stack: list[Loop] = []
    for start, end in spans:
        while stack and not (stack[-1].start <= start and end <= stack[-1].end):
            stack.pop()
        if stack and stack[-1].start == start:
            continue  # a second back edge to the same header (continue-style): same loop
        loop = Loop(start, end, parent=stack[-1] if stack else None)
        (stack[-1].children if stack else roots).append(loop)
        stack.append(loop)
    return roots
