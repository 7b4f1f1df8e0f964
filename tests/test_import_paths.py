"""Import paths (issue 23): what is private stays in its module.

The rules (docs/ARCHITECTURE.md, "Import paths"):

1. A name with a leading underscore is used only in the module that defines it: library code
   never imports ``_name`` from another module nor reads ``module._name``. Tests and benchmarks
   may import a private name of the module they exercise, from the module that defines it (never
   through a re-export).
2. A private module (``_atomic.py``, ``_perturbation.py``, ``sharpness/_common.py``, ...) belongs
   to the package that holds it: only modules of that package (or its subpackages) import it,
   and the names it shares with them are public (no underscore) within it.
3. No re-export without ``__all__``: library code has no ``# noqa: F401`` (an import kept only to
   be reachable from another path).
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("msam", "analysis", "landscape")
USER_DIRS = ("tests", "benchmarks", "examples")


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


LIBRARY = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
           if p.name != "__main__.py"}


def absolute(path: pathlib.Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    name = module_name(path)
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    prefix = base[: len(base) - (node.level - 1)]
    return ".".join(prefix + ([node.module] if node.module else []))


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("_")


def top_level_definitions(path: pathlib.Path) -> set[str]:
    """The names a module binds itself at top level (defs, classes, assignments; not imports)."""
    out: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out.add(node.target.id)
    return out


def private_uses(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """``(module, private name, line)`` for each private name ``path`` takes from a library
    module: ``from m import _x`` and ``m._x`` on an imported module ``m``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    modules: dict[str, str] = {}  # local name -> library module it is bound to
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = absolute(path, node)
            if mod.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                if f"{mod}.{alias.name}" in LIBRARY:
                    modules[alias.asname or alias.name] = f"{mod}.{alias.name}"
                if is_private(alias.name):
                    out.append((mod, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    modules[alias.asname or alias.name] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in modules:
                mod = ".".join([modules[value.id], *reversed(chain)])
                if mod in LIBRARY:
                    out.append((mod, node.attr, node.lineno))
    return out


def test_library_uses_no_private_name_of_another_module():
    bad = []
    for name, path in LIBRARY.items():
        for mod, private, line in private_uses(path):
            if mod != name:
                bad.append(f"{path.relative_to(ROOT)}:{line} uses {mod}.{private}")
    assert not bad, "private names used across modules (make them public):\n" + "\n".join(bad)


def test_tests_take_private_names_from_their_defining_module():
    bad = []
    for d in USER_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for mod, private, line in private_uses(path):
                if mod in LIBRARY and private not in top_level_definitions(LIBRARY[mod]):
                    bad.append(f"{path.relative_to(ROOT)}:{line} takes {private} from {mod}, "
                               "which does not define it")
    assert not bad, "\n".join(bad)


def test_private_modules_are_imported_only_inside_their_package():
    bad = []
    for name, path in LIBRARY.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = absolute(path, node)
                targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            for target in targets:
                parts = target.split(".")
                for i, part in enumerate(parts):
                    if is_private(part) and ".".join(parts[: i + 1]) in LIBRARY:
                        owner = ".".join(parts[:i])  # the package holding the private module
                        if not (name == owner or name.startswith(owner + ".")):
                            bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}")
    assert not bad, "private modules imported from outside their package:\n" + "\n".join(bad)


def test_no_reexport_without_all():
    bad = [f"{p.relative_to(ROOT)}:{i}" for p in LIBRARY.values()
           for i, line in enumerate(p.read_text().splitlines(), 1) if "noqa: F401" in line]
    assert not bad, "imports kept only to be re-exported (list the name in __all__): " + str(bad)
