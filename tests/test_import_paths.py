"""Import paths (issue 23): what is private stays in its module, and each public name has one path.

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
4. One import path per public name: a name is listed in exactly one ``__all__``. A package's
   ``__init__`` lists the names users take from the package, and the submodule defining such a
   name then does not list it; a submodule's ``__all__`` holds only what no enclosing package
   exports. Every ``from X import name`` of a public library name in the tests, benchmarks,
   examples and docs uses that one path.
"""

from __future__ import annotations

import ast
import importlib
import json
import pathlib
import re
import sys

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


def listings() -> dict[tuple[str, int], list[str]]:
    """``(name, id(object)) -> [modules whose __all__ lists it]`` over every library module."""
    where: dict[tuple[str, int], list[str]] = {}
    for name in LIBRARY:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in PACKAGES:
                raise
            continue  # an integration whose framework is absent: nothing else lists its names
        for public in getattr(mod, "__all__", ()):
            obj = getattr(mod, public)  # AttributeError names a stale __all__ entry
            where.setdefault((public, id(obj)), []).append(name)
    return where


def duplicated(where: dict[tuple[str, int], list[str]]) -> list[str]:
    return [f"{name}: {', '.join(mods)}" for (name, _), mods in sorted(where.items()) if len(mods) > 1]


def test_each_public_name_is_listed_in_one_all():
    dups = duplicated(listings())
    assert not dups, "public names listed in two __all__ (keep one path):\n" + "\n".join(dups)


def test_the_one_path_check_finds_a_planted_duplicate():
    # the checker itself: the same object listed by a package and its submodule is reported
    obj = object()
    where = {("f", id(obj)): ["pkg", "pkg.sub"], ("g", 1): ["pkg"]}
    assert duplicated(where) == ["f: pkg, pkg.sub"]


def canonical_paths() -> dict[tuple[str, str], str]:
    """``(module, name) -> the one module whose __all__ lists that object`` for every module
    from which the listed object is also reachable."""
    out = {}
    for (public, _), mods in listings().items():
        home = mods[0]
        obj = getattr(importlib.import_module(home), public)
        for name in LIBRARY:
            mod = sys.modules.get(name)
            if mod is not None and name != home and getattr(mod, public, None) is obj:
                out[(name, public)] = home
    return out


def docstring_examples(path: pathlib.Path) -> str:
    """The ``>>>`` lines of a library module (its docstring examples), as code."""
    return "\n".join(m.group(1) for m in re.finditer(r"^\s*>>> (.*)$", path.read_text(), re.M))


def user_imports(attributes: bool = False) -> list[tuple[str, int, str, str]]:
    """``(file, line, module, name)`` of every ``from <library module> import name`` in the
    tests, benchmarks, example scripts and notebooks, the docs' Python blocks and the library's
    docstring examples; with ``attributes``, also every ``alias.name`` read through a module
    bound by an import (``ops.HessianOperator`` after ``from analysis import operators as ops``:
    it must exist, but may be the defining module's, which a test spies on)."""
    out = []
    sources = [(p, p.read_text()) for d in USER_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    sources += [(p, docstring_examples(p)) for p in LIBRARY.values()]
    if attributes:  # the library's own reads through module aliases (``D.pca_directions``)
        sources += [(p, p.read_text()) for p in LIBRARY.values()]
    for nb in sorted((ROOT / "examples").glob("*.ipynb")):
        cells = json.loads(nb.read_text())["cells"]
        sources.append((nb, "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")))
    for md in sorted((ROOT / "docs").rglob("*.md")):
        blocks = re.findall(r"```python\n(.*?)```", md.read_text(), flags=re.S)
        sources.append((md, "\n".join(blocks)))
    for path, text in sources:
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a notebook cell with shell magic: only its import lines
            tree = ast.parse("\n".join(line.strip() for line in text.splitlines()
                                       if re.match(r"\s*from \w[\w.]* import [\w, ]+(#.*)?$", line)))
        modules: dict[str, str] = {}  # local name -> the library module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                    and node.module.split(".")[0] in PACKAGES:
                out.extend((str(path.relative_to(ROOT)), node.lineno, node.module, a.name)
                           for a in node.names)
                modules.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                                if f"{node.module}.{a.name}" in LIBRARY})
            elif isinstance(node, ast.Import):
                modules.update({a.asname: a.name for a in node.names
                                if a.asname and a.name in LIBRARY})
        for node in ast.walk(tree) if attributes else ():
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in modules and not node.attr.startswith("_"):
                out.append((str(path.relative_to(ROOT)), node.lineno, modules[node.value.id],
                            node.attr))
    return out


def test_users_import_each_public_name_from_its_one_path():
    canonical = canonical_paths()
    bad = [f"{f}:{line}: from {mod} import {name} -> from {canonical[(mod, name)]} import {name}"
           for f, line, mod, name in user_imports() if (mod, name) in canonical]
    assert not bad, "imports from a second path:\n" + "\n".join(bad)


def test_every_imported_library_name_exists():
    # a name moved out of a package (models out of `landscape`, distributed helpers out of
    # `analysis`) fails here in the notebooks, docs and docstrings too, not only where code runs
    missing = []
    for f, line, mod, name in user_imports(attributes=True):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in PACKAGES:
                missing.append(f"{f}:{line}: no module {mod}")
            continue  # an optional framework that is not installed
        if ROOT not in pathlib.Path(module.__file__).resolve().parents:
            missing.append(f"{f}:{line}: {mod} is not a module of this tree")  # an old install
        elif not hasattr(module, name) and f"{mod}.{name}" not in LIBRARY:
            missing.append(f"{f}:{line}: from {mod} import {name}")
    assert not missing, "imports of names that do not exist:\n" + "\n".join(missing)
