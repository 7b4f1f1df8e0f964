"""Experiment 2: accuracy against a signed rho (Fig. 2A/B)."""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import numpy as np

from .config import ReproConfig
from .optimizers import msam_spec, optimizer_specs
from .problems import Problem, digits_problem
from .results import COLORS, ExperimentResult, finish, new_figure, save_figure
from .runs import RunCache
from .stats import compare, format_pm, mean_std

RULE = ("positive side: the best positive rho beats rho = 0 (SGD) by more than the "
        "standard error; negative side: the most negative rho is below rho = 0 by more "
        "than the standard error. Reproduced if both hold, not reproduced if the "
        "negative side is at least as good as rho = 0 or the positive side does not help.")
"""The verdict rule, as quoted in the report."""


def _landmarks(points: list[dict[str, Any]]) -> tuple[dict, dict | None, dict | None]:
    """The ``rho = 0`` point, the best positive rho (by mean test accuracy) and the most
    negative rho (``None`` when the grid has no such side)."""
    zero = next(p for p in points if p["rho"] == 0.0)
    pos = [p for p in points if p["rho"] > 0]
    neg = [p for p in points if p["rho"] < 0]
    best_pos = max(pos, key=lambda p: mean_std(p["test_acc"])[0]) if pos else None
    most_neg = min(neg, key=lambda p: p["rho"]) if neg else None
    return zero, best_pos, most_neg


def decide(points: list[dict[str, Any]]) -> str:
    """The verdict (:data:`RULE`) from the sweep's points ``{"rho", "test_acc": [per seed]}``
    (one of them at ``rho = 0``)."""
    zero, best_pos, most_neg = _landmarks(points)
    helps = compare(best_pos["test_acc"], zero["test_acc"]) if best_pos else 0
    hurts = compare(most_neg["test_acc"], zero["test_acc"]) if most_neg else 0
    if helps > 0 and hurts < 0:
        return "reproduced"
    if (most_neg is not None and mean_std(most_neg["test_acc"])[0] >= mean_std(zero["test_acc"])[0]) \
            or helps <= 0:
        return "not reproduced"
    return "inconclusive"


def run_rho_sweep(config: ReproConfig | None = None, *, problem: Problem | None = None,
                  out: str | os.PathLike | None = None, cache: RunCache | None = None,
                  progress: bool = False) -> ExperimentResult:
    """Train and test accuracy of MSAM against a signed rho, with SGD and NAG as references.

    Paper (Fig. 2A/B): positive rho (perturbing along ``-v``) improves test accuracy by more than
    2 points over SGD; negative rho hurts quickly. ``rho = 0`` is SGD (reused). Verdict rule: see
    ``_RULES["rho-sweep"]``.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = cache if cache is not None else RunCache(problem, config, progress=progress)
    specs = optimizer_specs(config)
    seeds = config.seed_list()[:config.sweep_seeds]
    grid = sorted(set(float(r) for r in config.rho_grid) | {0.0})
    points = []
    for rho in grid:
        spec = specs["SGD"] if rho == 0.0 else msam_spec(rho)
        runs = [cache.get(spec, s) for s in seeds]
        points.append({"rho": rho, "test_acc": [r.final["test_acc"] for r in runs],
                       "train_acc": [r.final["train_acc"] for r in runs]})
    refs = {}
    for name in ("SGD", "NAG"):
        runs = [cache.get(specs[name], s) for s in seeds]
        refs[name] = {"test_acc": [r.final["test_acc"] for r in runs],
                      "train_acc": [r.final["train_acc"] for r in runs]}
    zero, best_pos, most_neg = _landmarks(points)
    best = max(points, key=lambda p: mean_std(p["test_acc"])[0])
    verdict = decide(points)
    gain = (mean_std(best_pos["test_acc"])[0] - mean_std(zero["test_acc"])[0]) * 100 if best_pos else float("nan")
    ours = (f"best rho {best['rho']:g}: test {format_pm(best['test_acc'], 100)} % vs SGD "
            f"{format_pm(zero['test_acc'], 100)} % (best positive rho {best_pos['rho']:g}: {gain:+.1f} points)"
            if best_pos else "no positive rho in the grid")
    if most_neg is not None:
        ours += f"; rho {most_neg['rho']:g}: {format_pm(most_neg['test_acc'], 100)} %"
    data = {"points": points, "references": refs, "seeds": seeds, "best_rho": best["rho"],
            "best_positive_rho": best_pos["rho"] if best_pos else None,
            "gain_points": gain}

    def figure(out_dir: pathlib.Path) -> list[pathlib.Path]:
        fig, axes = new_figure(1, 2)
        rhos = [p["rho"] for p in points]
        for ax, key, title in ((axes[0, 0], "test_acc", "test accuracy (Fig. 2A)"),
                               (axes[0, 1], "train_acc", "train accuracy, noisy labels (Fig. 2B)")):
            m = np.array([mean_std(p[key])[0] for p in points]) * 100
            s = np.array([mean_std(p[key])[1] for p in points]) * 100
            ax.errorbar(rhos, m, yerr=s, marker="o", color=COLORS["MSAM"], label="MSAM", capsize=3)
            for name, ls in (("SGD", "--"), ("NAG", ":")):
                ax.axhline(mean_std(refs[name][key])[0] * 100, color=COLORS[name], ls=ls, label=name)
            ax.axvline(0.0, color="k", lw=0.5)
            ax.set_xscale("symlog", linthresh=0.2)
            ax.set_xlabel("rho (signed; > 0 perturbs along -v)")
            ax.set_ylabel("accuracy (%)")
            ax.set_title(title)
            ax.legend(fontsize=8)
        return [save_figure(fig, out_dir / "rho-sweep.png")]

    return finish("rho-sweep", "Accuracy against a signed rho (Fig. 2A/B)",
                  "positive rho improves test accuracy by > 2 points over SGD; negative rho "
                  "hurts quickly", ours, verdict, RULE, data, config, problem,
                  out, figure, t0)
