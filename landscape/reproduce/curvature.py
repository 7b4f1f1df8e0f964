"""Experiment 7: directional curvature during training (A.4)."""

from __future__ import annotations

import math
import os
import pathlib
import time

import numpy as np

from .config import ReproConfig
from .optimizers import optimizer_specs
from .problems import Problem, digits_problem
from .results import COLORS, ExperimentResult, finish, new_figure, save_figure
from .runs import RunCache
from .stats import verdict_of

RULE = ("reproduced if, averaged over training, the curvature along the momentum "
        "exceeds the curvature along a random direction for SGD, and MSAM's momentum "
        "curvature is below SGD's.")
"""The verdict rule, as quoted in the report."""


def decide(mean: dict[str, dict[str, float]]) -> str:
    """The verdict (:data:`RULE`) from the curvature averaged over training,
    ``mean[optimizer][direction]`` (directions ``"momentum"``, ``"random"``; optimizers
    ``"SGD"``, ``"MSAM"``); inconclusive when a momentum curvature is not finite."""
    if not all(math.isfinite(mean[n]["momentum"]) for n in mean):
        return "inconclusive"
    ok_a = mean["SGD"]["momentum"] > mean["SGD"]["random"]
    ok_b = mean["MSAM"]["momentum"] < mean["SGD"]["momentum"]
    return verdict_of(ok_a and ok_b)


def run_curvature(config: ReproConfig | None = None, *, problem: Problem | None = None,
                  out: str | os.PathLike | None = None, cache: RunCache | None = None,
                  progress: bool = False) -> ExperimentResult:
    """``d^T H d / ||d||^2`` along the momentum, the gradient and a random direction during
    training of SGD, SAM and MSAM (first seed; every ``config.curvature_every`` steps, probe set,
    eval mode, at the unperturbed weights).

    PAPER.md records no number for A.4; the mechanism implies (a) much higher curvature along
    the momentum than along a random direction (why the step overshoots and cos(v, g) < 0) and
    (b) MSAM flattening the loss along its own perturbation direction.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = cache if cache is not None else RunCache(problem, config, progress=progress)
    specs = optimizer_specs(config)
    names = ("SGD", "SAM", "MSAM")
    seed = config.seed_list()[0]
    rows = {n: cache.get(specs[n], seed, curvature=True).history["curvature"] for n in names}
    summary = {}
    for n in names:
        a = np.asarray(rows[n], dtype=float)
        summary[n] = {k: float(np.nanmean(a[:, i + 1])) for i, k in
                      enumerate(("momentum", "gradient", "random"))}
    verdict = decide(summary)
    ours = "; ".join(f"{n}: momentum {s['momentum']:.3g}, gradient {s['gradient']:.3g}, random "
                     f"{s['random']:.3g}" for n, s in summary.items()) + " (mean over training, 1 seed)"
    data = {"rows": {n: rows[n] for n in names}, "columns": ["step", "momentum", "gradient", "random"],
            "mean": summary, "seed": seed, "every": config.curvature_every}

    def figure(out_dir: pathlib.Path) -> list[pathlib.Path]:
        fig, axes = new_figure(1, 3, (4.2, 3.4))
        for ax, (i, key) in zip(axes[0], enumerate(("momentum", "gradient", "random"))):
            for n in names:
                a = np.asarray(rows[n], dtype=float)
                ax.plot(a[:, 0], a[:, i + 1], color=COLORS[n], marker=".", label=n)
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_xlabel("step")
            ax.set_ylabel("d^T H d / ||d||^2")
            ax.set_title(f"along {key}")
            ax.legend(fontsize=8)
        return [save_figure(fig, out_dir / "curvature.png")]

    return finish("curvature", "Directional curvature during training (A.4)",
                  "no number in PAPER.md; implied: curvature along the momentum >> random, and "
                  "MSAM lowers it", ours, verdict, RULE, data, config, problem,
                  out, figure, t0)
