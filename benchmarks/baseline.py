"""Load a module or package of this repository as it was at a git revision, under another name,
next to the current one: a benchmark then times the baseline and the change in the same process
(same machine load, same warm-up), as the project's benchmarks require.

``load_at("63a6299", "analysis/tracker.py", "analysis.tracker_at_base")`` reads the file with
``git show`` and executes it as a module of the same package (its relative imports resolve to
the current package's other modules); a directory path loads every ``.py`` file of it as a
package of that name (``load_at(rev, "landscape/slices", "landscape.slices_at_base")``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout


def load_at(rev: str, path: str, name: str) -> ModuleType:
    """The module (a ``.py`` path) or package (a directory) ``path`` at ``rev``, as ``name``."""
    if path.endswith(".py"):
        spec = importlib.util.spec_from_loader(name, loader=None)
        module = importlib.util.module_from_spec(spec)
        module.__package__ = name.rpartition(".")[0]
        sys.modules[name] = module
        exec(compile(_git("show", f"{rev}:{path}"), f"{rev}:{path}", "exec"), module.__dict__)
        return module
    folder = Path(tempfile.mkdtemp(prefix="baseline-"))
    for file in _git("ls-tree", "--name-only", f"{rev}:{path}").split():
        if file.endswith(".py"):
            (folder / file).write_text(_git("show", f"{rev}:{path}/{file}"))
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
