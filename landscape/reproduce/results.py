""":class:`ExperimentResult` and writing one experiment's JSON and figures."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from analysis.results import Result, to_jsonable

from .._atomic import atomic_path, atomic_write
from .config import ReproConfig
from .problems import Problem

EXPERIMENT_NAMES = ("table", "rho-sweep", "cosine", "angle", "directions", "eigenvalues", "curvature")
"""The experiments' names, in the order of :data:`landscape.reproduce.EXPERIMENTS`."""


@dataclass(frozen=True, repr=False)
class ExperimentResult(Result):
    """One experiment's outcome.

    Attributes:
        experiment: its name (see :data:`EXPERIMENTS`).
        title: what it measures, with the paper's figure/table.
        paper: the paper's number or claim.
        ours: our number with its spread (one line of markdown).
        verdict: ``"reproduced"``, ``"not reproduced"`` or ``"inconclusive"``.
        rule: the rule that decided the verdict.
        data: every measured number (JSON-safe).
        config: the :class:`ReproConfig` used; problem: its description.
        files: the JSON and figure(s) written.
        seconds: wall time of the experiment (including training it triggered).
        command: the command that regenerates it.
    """

    experiment: str
    title: str
    paper: str
    ours: str
    verdict: str
    rule: str
    data: dict
    config: dict
    problem: str
    files: tuple
    seconds: float
    command: str


def _command(name: str, config: ReproConfig, out: str | os.PathLike | None) -> str:
    parts = ["landscape reproduce", name]
    if config.smoke:
        parts.append("--quick")
    if out is not None:
        parts.append(f"--out {out}")
    if config.seeds != (1 if config.smoke else ReproConfig().seeds):
        parts.append(f"--seeds {config.seeds}")
    if config.device != "cpu":
        parts.append(f"--device {config.device}")
    return " ".join(parts)


def finish(name: str, title: str, paper: str, ours: str, verdict: str, rule: str, data: dict,
           config: ReproConfig, problem: Problem, out: str | os.PathLike | None,
           figure: Callable[[pathlib.Path], list[pathlib.Path]], t0: float,
           command: str | None = None) -> ExperimentResult:
    """The :class:`ExperimentResult` of an experiment; with ``out``, its figures (drawn by
    ``figure(out_dir)``) and ``<out>/<name>.json`` are written there too."""
    files: list[str] = []
    out_dir = None
    if out is not None:
        out_dir = pathlib.Path(out)
        out_dir.mkdir(parents=True, exist_ok=True)
        files = [str(p) for p in figure(out_dir)]
        files.insert(0, str(out_dir / f"{name}.json"))
    res = ExperimentResult(
        experiment=name, title=title, paper=paper, ours=ours, verdict=verdict, rule=rule,
        data=to_jsonable(data), config=to_jsonable(dataclasses.asdict(config)),
        problem=problem.description or problem.name, files=tuple(files),
        seconds=time.perf_counter() - t0, command=command or _command(name, config, out))
    if out_dir is not None:
        text = json.dumps(res.to_dict(), indent=1, allow_nan=False)
        with atomic_write(out_dir / f"{name}.json") as fh:
            fh.write(text + "\n")
    return res


def new_figure(nrows: int = 1, ncols: int = 1, size: tuple[float, float] = (5.0, 3.6)):
    """A constrained-layout matplotlib ``Figure`` (not pyplot's) with an ``(nrows, ncols)`` array
    of axes, each panel ``size`` inches."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def save_figure(fig: Any, path: pathlib.Path) -> pathlib.Path:
    """Write ``fig`` to ``path`` atomically (format from the suffix, 90 dpi); returns ``path``."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format=path.suffix.lstrip(".") or "png")
    return path


COLORS = {"SGD": "tab:gray", "NAG": "tab:blue", "SAM": "tab:green", "MSAM": "tab:red",
          "MSAM-unnormalized": "tab:orange", "MSAM-lr-scaled": "tab:purple"}
