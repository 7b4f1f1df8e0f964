"""Running experiments by name: :data:`EXPERIMENTS`, :func:`run_experiment`, :func:`run_all`."""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable

from .._atomic import atomic_write
from .angle import run_angle
from .config import ReproConfig
from .cosine import run_cosine
from .curvature import run_curvature
from .directions import run_directions
from .eigenvalues import run_eigenvalues
from .markdown import render_markdown
from .problems import Problem, digits_problem
from .results import ExperimentResult
from .rho_sweep import run_rho_sweep
from .runs import RunCache
from .table import run_table

EXPERIMENTS: dict[str, Callable[..., ExperimentResult]] = {
    "table": run_table,
    "rho-sweep": run_rho_sweep,
    "cosine": run_cosine,
    "angle": run_angle,
    "directions": run_directions,
    "eigenvalues": run_eigenvalues,
    "curvature": run_curvature,
}
"""Experiment name -> function ``f(config, *, problem, out, cache, progress)``."""

_ORDER = ("curvature", "table", "cosine", "rho-sweep", "angle", "directions", "eigenvalues")


def run_experiment(name: str, config: ReproConfig | None = None, *, problem: Problem | None = None,
                   out: str | os.PathLike | None = None, cache: RunCache | None = None,
                   progress: bool = False) -> ExperimentResult:
    """Run one experiment by name (see :data:`EXPERIMENTS`)."""
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {name!r}; choose from {sorted(EXPERIMENTS)} or 'all'")
    return EXPERIMENTS[name](config, problem=problem, out=out, cache=cache, progress=progress)


def run_all(config: ReproConfig | None = None, *, problem: Problem | None = None,
            out: str | os.PathLike | None = None, progress: bool = False,
            log: Callable[[str], None] | None = None) -> list[ExperimentResult]:
    """Every experiment, sharing trained runs; writes ``summary.md`` into ``out`` too."""
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = RunCache(problem, config, progress=progress, eager_probes=True)
    results = []
    for name in _ORDER:
        res = EXPERIMENTS[name](config, problem=problem, out=out, cache=cache, progress=progress)
        if log is not None:
            log(f"{name}: {res.verdict} ({res.seconds:.0f} s)")
        results.append(res)
    if out is not None:
        with atomic_write(pathlib.Path(out) / "summary.md") as fh:
            fh.write(render_markdown(results))
    return results
