"""One table of defaults shared by the Python API and the ``landscape`` command line.

Every CLI option whose value has a Python counterpart takes its default from :data:`DEFAULTS`,
and each row names the Python function and parameter that have the same default;
``tests/landscape/test_cli.py`` checks both (the parser's default and the function signature's),
so the two cannot drift apart. docs/cli.md shows the same table (``tests/test_docs.py`` checks it).
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any

__all__ = ["Default", "DEFAULTS", "cli_default", "python_default"]


@dataclass(frozen=True)
class Default:
    """One shared default.

    Attributes:
        command: the ``landscape`` subcommand (``"*"`` for options every analysis command has).
        option: the CLI option, e.g. ``"--tol"``.
        value: the default value (for ``--range`` the pair ``(min, max)``).
        function: the Python function with the same default, ``"module:name"``.
        parameter: its parameter (for ``--range``: ``"lo,hi"``).
        note: how the CLI applies it, where that needs saying.
    """

    command: str
    option: str
    value: Any
    function: str
    parameter: str
    note: str = ""


#: The table (docs/cli.md shows it).
DEFAULTS: tuple[Default, ...] = (
    Default("sharpness", "--m", 128, "analysis:sharpness", "m",
            "capped at the number of samples N (the CLI says so when it caps)"),
    Default("hessian", "--top-k", 5, "analysis:top_eigenpairs", "k"),
    Default("hessian", "--tol", 1e-3, "analysis:top_eigenpairs", "tol"),
    Default("hessian", "--density-iter", 80, "analysis:spectral_density", "num_iter"),
    Default("hessian", "--density-runs", 10, "analysis:spectral_density", "num_runs"),
    Default("slice", "--steps", 41, "landscape.report:compute_slice", "steps"),
    Default("slice", "--range", (-1.0, 1.0), "landscape.report:compute_slice", "lo,hi"),
    Default("slice", "--direction", "random", "landscape.report:compute_slice", "direction"),
    Default("slice", "--normalization", "filter", "analysis:random_direction",
            "normalization"),
    Default("report", "--steps-1d", 41, "landscape:analyze_checkpoint", "steps_1d"),
    Default("report", "--steps-2d", 21, "landscape:analyze_checkpoint", "steps_2d"),
    Default("report", "--radius", 1.0, "landscape:analyze_checkpoint", "radius"),
    Default("report", "--title", "Loss landscape report", "landscape:report_html", "title"),
    Default("*", "--seed", 0, "landscape:analyze_checkpoint", "seed"),
)


def cli_default(command: str, option: str) -> Any:
    """The default of ``landscape COMMAND OPTION`` from :data:`DEFAULTS` (``KeyError`` if absent)."""
    for d in DEFAULTS:
        if d.option == option and d.command in (command, "*"):
            return list(d.value) if isinstance(d.value, tuple) else d.value
    raise KeyError(f"no shared default for {command} {option}")


def python_default(row: Default) -> Any:
    """The default of ``row``'s Python parameter, read from the function's signature."""
    module, _, name = row.function.partition(":")
    fn = getattr(importlib.import_module(module), name)
    params = inspect.signature(fn).parameters
    values = tuple(params[p].default for p in row.parameter.split(","))
    return values if len(values) > 1 else values[0]
