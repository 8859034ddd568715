"""Reading a @triton.jit kernel's Python source: its time loop, the trip count of every loop, and which kernel
arguments (and whether the time loop's variable) a pointer inside an inlined helper comes from.

Line info names source positions as inlining chains of (file, line, column), innermost first (sass.py). This module
maps each frame to the function and the `for` statements around it, binds a helper's parameters to the argument
expressions at its call site, and evaluates `range(...)` bounds with the launch's sizes and constexprs. Nothing is
hard-coded about the kernels it reads: the time loop is the kernel's outermost `for` whose bounds mention a time
size (`T`, `step_end`, ...) in its range or its while condition, unless the caller names its line.
"""

from __future__ import annotations

import ast
import inspect
import math
import os
from dataclasses import dataclass

# Names a time loop's bounds are written with, in the order they are tried.
TIME_SIZE_NAMES = ("T", "step_end", "steps", "seq_len", "num_steps")
MEMORY_CALLS = (
    "load",
    "store",
    "atomic_add",
    "atomic_max",
    "atomic_min",
    "atomic_cas",
    "atomic_xchg",
    "atomic_or",
    "atomic_and",
)


@dataclass(frozen=True)
class LoopRef:
    """One source loop in one inlining context: `context` is the chain of call-site frames outside its function
    (outermost last), so the same helper loop called with different bounds gives different LoopRefs."""

    file: str
    line: int
    context: tuple
    is_while: bool = False  # a `while` loop: no trip count (a poll, in the kernels this reads)

    def __repr__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass
class _Function:
    name: str
    file: str
    node: ast.FunctionDef
    params: list[str]

    def __post_init__(self):
        # Indexes built once: every query below would otherwise walk the whole function again.
        nodes = list(ast.walk(self.node))
        self.calls = [n for n in nodes if isinstance(n, ast.Call)]
        self.loops = sorted((n for n in nodes if isinstance(n, (ast.For, ast.While))), key=lambda n: n.lineno)
        self.definitions: dict[str, list] = {}
        for node in nodes:
            for name, value in _assigned(node):
                self.definitions.setdefault(name, []).append(value)


class KernelSource:
    """The kernel function and every @triton.jit helper reachable from it, parsed once."""

    def __init__(self, kernel, time_loop_line: int | None = None):
        self.kernel_fn = getattr(kernel, "fn", kernel)
        self.functions: dict[tuple[str, str], _Function] = {}
        self._by_file: dict[str, list[_Function]] = {}
        self._loops_memo: dict = {}
        self._trip_memo: dict = {}
        for module_path in self._module_files(self.kernel_fn):
            self._parse(module_path)
        kernel_file = os.path.basename(inspect.getsourcefile(self.kernel_fn))
        self.kernel = self.functions[(kernel_file, self.kernel_fn.__name__)]
        self.time_loop = self._find_time_loop(time_loop_line)

    # ------------------------------------------------------------------------------------------ parsing

    @staticmethod
    def _module_files(fn) -> list[str]:
        """Source files of the kernel and of every jit function its globals reach (helpers live elsewhere)."""
        seen, todo, files = set(), [fn], []
        while todo:
            f = todo.pop()
            f = getattr(f, "fn", f)
            if not inspect.isfunction(f) or f in seen:
                continue
            seen.add(f)
            path = inspect.getsourcefile(f)
            if path and path not in files:
                files.append(path)
            for value in f.__globals__.values():
                if hasattr(value, "fn") and inspect.isfunction(getattr(value, "fn", None)):
                    todo.append(value)
        return files

    def _parse(self, path: str) -> None:
        with open(path) as f:
            tree = ast.parse(f.read(), filename=path)
        base = os.path.basename(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                params = [a.arg for a in node.args.args]
                fn = _Function(node.name, base, node, params)
                self.functions[(base, node.name)] = fn
                self._by_file.setdefault(base, []).append(fn)

    def function_at(self, file: str, line: int) -> _Function | None:
        candidates = [f for f in self._by_file.get(file, ()) if f.node.lineno <= line <= f.node.end_lineno]
        return max(candidates, key=lambda f: f.node.lineno, default=None)

    # ------------------------------------------------------------------------------------------ time loop

    def _find_time_loop(self, line: int | None) -> ast.For | ast.While:
        loops = _outer_loops(self.kernel.node.body)
        if line is not None:
            for node in ast.walk(self.kernel.node):
                if isinstance(node, (ast.For, ast.While)) and node.lineno == line:
                    return node
            raise ValueError(f"no for or while statement at line {line} of {self.kernel.name}")
        if not loops:
            raise ValueError(f"{self.kernel.name} has no loop: nothing to call a time loop")
        for name in TIME_SIZE_NAMES:
            for loop in loops:
                if name in _names(_loop_bounds(loop)):
                    return loop
        return loops[0]

    @property
    def time_variable(self) -> str | None:
        loop = self.time_loop
        if isinstance(loop, ast.For):
            return loop.target.id if isinstance(loop.target, ast.Name) else None
        test = loop.test  # `while p < step_end`: the counter is the compared name
        if isinstance(test, ast.Compare) and isinstance(test.left, ast.Name):
            return test.left.id
        return None

    def in_time_loop(self, frames) -> bool:
        """Whether a source chain (innermost first) runs inside the time loop's body."""
        if not frames:
            return False
        file, line, _ = frames[-1]
        kernel = self.kernel
        return file == kernel.file and self.time_loop.lineno < line <= self.time_loop.end_lineno

    # ------------------------------------------------------------------------------------------ loops

    def enclosing_loops(self, frames) -> list[LoopRef]:
        """The loops around a chain, outermost first (the time loop included when inside it)."""
        frames = tuple(frames)
        if frames not in self._loops_memo:
            out = []
            for depth in range(len(frames) - 1, -1, -1):
                file, line, _ = frames[depth]
                fn = self.function_at(file, line)
                if fn is None:
                    continue
                context = frames[depth + 1 :]
                for loop in fn.loops:
                    if loop.lineno <= line <= loop.end_lineno:
                        out.append(LoopRef(file, loop.lineno, context, isinstance(loop, ast.While)))
            self._loops_memo[frames] = out
        return self._loops_memo[frames]

    def trip_count(self, ref: LoopRef, scalars: dict) -> int | None:
        """Iterations of a `for` in its inlining context, given the kernel's scalar arguments and constexprs;
        None when a bound cannot be evaluated (then the caller must supply it)."""
        key = (ref, tuple(sorted((k, repr(v)) for k, v in scalars.items())))
        if key not in self._trip_memo:
            self._trip_memo[key] = self._trip_count(ref, scalars)
        return self._trip_memo[key]

    def _trip_count(self, ref: LoopRef, scalars: dict) -> int | None:
        fn = self.function_at(ref.file, ref.line)
        if ref.is_while or fn is None:
            return None
        loop = next((n for n in fn.loops if isinstance(n, ast.For) and n.lineno == ref.line), None)
        if loop is None or not _is_range(loop.iter):
            return None
        env = self._environment(fn, ref.context, scalars, before=loop.lineno)
        args = [_evaluate(a, env) for a in loop.iter.args]
        if any(a is None for a in args) or not 1 <= len(args) <= 3:
            return None
        start, stop, step = (0, args[0], 1) if len(args) == 1 else (args[0], args[1], args[2] if len(args) == 3 else 1)
        if step == 0:
            return None
        return max(0, math.ceil((stop - start) / step))

    def _environment(self, fn: _Function, context, scalars: dict, before: int) -> dict:
        """Values of fn's names: its parameters (bound at the call site in `context`, or the kernel's scalars)
        and its simple assignments above line `before`."""
        if not context:
            env = dict(scalars)
        else:
            file, line, col = context[0]
            caller = self.function_at(file, line)
            env = {}
            if caller is not None:
                caller_env = self._environment(caller, context[1:], scalars, before=line)
                call = _call_at(caller, line, col, fn.name)
                if call is not None:
                    for name, expr in _bind(fn, call).items():
                        env[name] = _evaluate(expr, caller_env)
        for stmt in _statements_before(fn.node, before):
            if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
                value = _evaluate(stmt.value, env)
                if value is not None:
                    env[stmt.targets[0].id] = value
        return env

    # ------------------------------------------------------------------------------------------ pointers

    def pointer_origin(self, frames) -> tuple[frozenset[str], bool]:
        """(kernel arguments, whether the time loop variable) that the pointer of the tl.load/tl.store/atomic at
        the innermost frame is computed from, following helper parameters to their call sites."""
        if not frames:
            return frozenset(), False
        file, line, col = frames[0]
        fn = self.function_at(file, line)
        call = _call_at(fn, line, col, *MEMORY_CALLS) if fn else None
        if call is None:
            return frozenset(), False
        pointer = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "pointer"), None)
        if pointer is None:
            return frozenset(), False
        kernel_names: set[str] = set()
        self._resolve(_names(pointer), fn, tuple(frames[1:]), kernel_names, set())
        args = frozenset(n for n in kernel_names if n in self.kernel.params)
        return args, self.time_variable in kernel_names

    def _resolve(self, names, fn: _Function, context, out: set, seen: set) -> None:
        for name in names:
            key = (fn.file, fn.name, context, name)
            if key in seen:
                continue
            seen.add(key)
            if fn is self.kernel:
                out.add(name)
            if name in fn.params and context:
                file, line, col = context[0]
                caller = self.function_at(file, line)
                call = _call_at(caller, line, col, fn.name) if caller else None
                expr = _bind(fn, call).get(name) if call else None
                if expr is not None:
                    self._resolve(_names(expr), caller, context[1:], out, seen)
                continue
            for value in fn.definitions.get(name, ()):
                self._resolve(_names(value), fn, context, out, seen)


# ---------------------------------------------------------------------------------------------- AST helpers


def _outer_loops(body) -> list:
    """`for` and `while` statements of a body, looking through if/with blocks but not into other loops."""
    out = []
    for stmt in body:
        if isinstance(stmt, (ast.For, ast.While)):
            out.append(stmt)
        elif isinstance(stmt, (ast.If, ast.With)):
            out += _outer_loops(stmt.body) + _outer_loops(getattr(stmt, "orelse", []))
    return out


def _loop_bounds(loop):
    """What a loop's extent is written in: a for loop's iterable, a while loop's condition."""
    return loop.iter if isinstance(loop, ast.For) else loop.test


def _is_range(node) -> bool:
    return isinstance(node, ast.Call) and _call_name(node) in ("range", "static_range")


def _call_name(call: ast.Call) -> str | None:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return None


def _names(node) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)} if node is not None else set()


def _call_at(fn: _Function, line: int, col: int, *names: str) -> ast.Call | None:
    """The innermost call to one of `names` whose source span holds (line, col); else the first on the line."""
    calls = [n for n in fn.calls if n.lineno <= line <= n.end_lineno and _call_name(n) in names]
    holding = [c for c in calls if (c.lineno, c.col_offset) <= (line, col) <= (c.end_lineno, c.end_col_offset)]
    if holding:
        return min(holding, key=lambda c: (c.end_lineno - c.lineno, c.end_col_offset - c.col_offset))
    on_line = [c for c in calls if c.lineno <= line <= c.end_lineno]
    return min(on_line, key=lambda c: c.col_offset, default=None)


def _bind(fn: _Function, call: ast.Call) -> dict:
    bound = dict(zip(fn.params, call.args))
    bound.update({k.arg: k.value for k in call.keywords if k.arg})
    return bound


def _assigned(node):
    """(name, expression) pairs a statement assigns (tuple targets: the whole right-hand side; augmented
    assignments also depend on the old value; a `for` target on its iterable)."""
    if isinstance(node, ast.Assign):
        for target in node.targets:
            for name in _names(target):
                yield name, node.value
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and isinstance(node.target, ast.Name) and node.value:
        yield node.target.id, node.value
        if isinstance(node, ast.AugAssign):
            yield node.target.id, node.target
    elif isinstance(node, ast.For):
        for name in _names(node.target):
            yield name, node.iter


def _statements_before(fn: ast.FunctionDef, line: int):
    for stmt in fn.body:
        if stmt.lineno >= line:
            break
        yield stmt


_BINOPS = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Div: lambda a, b: a / b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}


def _evaluate(node, env: dict):
    """Integer value of a bound expression, or None."""
    try:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.Name):
            value = env.get(node.id)
            value = getattr(value, "value", value)  # tl.constexpr
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            a, b = _evaluate(node.left, env), _evaluate(node.right, env)
            return None if a is None or b is None else _BINOPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            a = _evaluate(node.operand, env)
            return None if a is None else -a
        if isinstance(node, ast.Call):
            name, args = _call_name(node), [_evaluate(a, env) for a in node.args]
            if any(a is None for a in args):
                return None
            if name == "cdiv" and len(args) == 2:
                return -(-args[0] // args[1])
            if name in ("min", "minimum") and args:
                return min(args)
            if name in ("max", "maximum") and args:
                return max(args)
    except (ArithmeticError, TypeError):
        return None
    return None
