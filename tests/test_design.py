"""Design limits (issue 11): one concept per module, short functions, no import cycles.

These guard the shape of the code, not its numbers: a module over 600 lines, a function whose
code (its docstring excluded) is over 80 lines, or two library modules that import each other
(directly or through others; imports inside functions count, and importing ``a.b.c`` also runs
the package ``a.b``) fails here with the names.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("msam", "analysis", "landscape")
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


FILES = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
MODULES = {_module_name(p): p for p in FILES}


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = fn.body[0]
    has_doc = isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
        and isinstance(first.value.value, str)
    start = first.end_lineno + 1 if has_doc and len(fn.body) > 1 else first.lineno
    return fn.end_lineno - start + 1


def imported_modules(path: pathlib.Path) -> set[str]:
    """The library modules that importing ``path`` runs (its own parent packages excluded:
    Python runs those before the module itself, so they are no edge)."""
    name = _module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[: len(base) - (node.level - 1)]
                module = ".".join(prefix + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in MODULES and candidate != name and not name.startswith(candidate + "."):
                    out.add(candidate)
    return out


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module are the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_cycle_between_modules():
    graph = {m: imported_modules(p) for m, p in MODULES.items()}
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_check_finds_a_planted_cycle():
    # the checker itself: a cycle of three and a self-contained chain
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_relative_imports_resolve_to_modules():
    # ``from ..x import y`` in landscape/cli/__init__.py means landscape.x (and landscape.x.y)
    cli = ROOT / "landscape" / "cli" / "__init__.py"
    assert "landscape.cli._common" in imported_modules(cli)
    assert "landscape.cli" not in imported_modules(cli)


def test_no_library_module_is_too_long():
    long = {str(p.relative_to(ROOT)): p.read_text().count("\n") for p in FILES}
    bad = {k: v for k, v in long.items() if v > MAX_MODULE_LINES}
    assert not bad, f"modules over {MAX_MODULE_LINES} lines: {bad}"


def test_no_library_function_is_too_long():
    bad = []
    for p in FILES:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = _code_lines(node)
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    assert not bad, f"functions over {MAX_FUNCTION_LINES} code lines: " + ", ".join(bad)


@pytest.mark.slow
@pytest.mark.parametrize("package", PACKAGES)
def test_every_module_imports_alone(package):
    # each module imports in a fresh interpreter by itself (no hidden order dependence)
    import subprocess

    names = [m for m in MODULES if m.split(".")[0] == package]
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    for m in names:
        r = subprocess.run([sys.executable, "-c", code, m], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, f"import {m} failed alone:\n{r.stderr[-2000:]}"
