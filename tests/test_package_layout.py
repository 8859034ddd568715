"""The package's imports point one way: no module of fastlstm/ reaches itself again through what it imports.

Every import counts, at module level or inside a function (a lazy import is still a dependency, one that only shows
when the function runs). fastlstm.kernels (kernels/) is outside this check; its own layout is docs/kernels.md's.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fastlstm"


def module_names(root: Path, package: str) -> dict:
    """Dotted module name -> path, for every .py file under root/package (a package by its __init__.py)."""
    names = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported_modules(name: str, path: Path, known: dict, skip: tuple = ()) -> set:
    """The known modules that `name` imports anywhere in its file: a from-import of a submodule names that
    submodule; of anything else, the module (or package) it is taken from. Imports of modules under `skip` are
    dropped (not charged to the package above them)."""

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    here = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                base = f"{anchor}.{base}" if base else anchor
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        targets = [t for t in targets if not t.startswith(skip)]
        found.update(m for m in map(owner, targets) if m is not None and m != name)
    return found


def import_cycles(root: Path, package: str, exclude: tuple = ()) -> list:
    """The groups of modules that import each other, directly or through others (strongly connected components of
    the import graph with more than one module), each sorted; modules under `exclude` are left out."""
    known = {n: p for n, p in module_names(root, package).items() if not n.startswith(exclude)}
    graph = {n: imported_modules(n, p, known, exclude) for n, p in known.items()}
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return sorted(groups)


def test_no_import_cycle_in_the_package_outside_the_kernels():
    assert import_cycles(ROOT, PACKAGE, exclude=(f"{PACKAGE}.kernels",)) == []


def test_the_cycle_finder_sees_a_lazy_import_cycle_and_a_direct_one(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from . import b\n")  # lazy: only a function imports it
    (pkg / "b.py").write_text("from .a import f\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import X\n")
    (pkg / "sub" / "c.py").write_text("import pkg.sub.d\nX = 1\n")
    (pkg / "sub" / "d.py").write_text("from ..sub import c\n")
    (pkg / "e.py").write_text("from .a import f\nfrom .sub import X\n")  # imports into both groups, in neither
    assert import_cycles(tmp_path, "pkg") == [["pkg.a", "pkg.b"], ["pkg.sub.c", "pkg.sub.d"]]
    # Left out, a subpackage takes its import edges along: pkg.f importing it is no import of pkg's __init__.
    (pkg / "__init__.py").write_text("from . import f\n")
    (pkg / "f.py").write_text("from .sub import c\n")
    assert import_cycles(tmp_path, "pkg", exclude=("pkg.sub",)) == [["pkg.a", "pkg.b"]]
