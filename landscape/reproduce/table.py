"""Experiment 1: test accuracy and speed (Table 1) and the ablation ladder (A.2)."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .config import ReproConfig
from .optimizers import OPTIMIZERS, optimizer_specs
from .problems import Problem, digits_problem
from .results import COLORS, ExperimentResult, finish, new_figure, save_figure
from .runs import RunCache
from .stats import combine_verdicts, compare, format_pm, mean_std, verdict_of

RULE = ("accuracy: MSAM above SGD and NAG by more than the standard error of the difference "
        "of means (reproduced), below SGD by that much (not reproduced), else inconclusive; "
        "speed: MSAM >= 0.85x SGD and SAM <= 0.67x SGD; ladder: lr-scaled below MSAM. "
        "Overall 'partly reproduced' when the parts disagree.")
"""The verdict rule, as quoted in the report."""


def decide(rows: dict[str, dict[str, Any]]) -> tuple[str, dict[str, str]]:
    """The verdict (:data:`RULE`) and its parts from the table's rows.

    Args:
        rows: optimizer name -> ``{"test_acc": [per seed], "speed_vs_sgd": float}``; a part is
            decided only when its optimizers are present.

    Returns:
        ``(overall, parts)``: ``parts`` maps ``"accuracy"``, ``"speed"``, ``"ladder"`` to
        ``"reproduced"``, ``"not reproduced"`` or ``"inconclusive"``; ``overall`` combines
        them (:func:`landscape.reproduce.stats.combine_verdicts`).
    """
    verdicts = {}
    if {"SGD", "NAG", "MSAM"} <= rows.keys():
        c_sgd = compare(rows["MSAM"]["test_acc"], rows["SGD"]["test_acc"])
        c_nag = compare(rows["MSAM"]["test_acc"], rows["NAG"]["test_acc"])
        verdicts["accuracy"] = verdict_of(True if (c_sgd > 0 and c_nag > 0) else
                                          (False if c_sgd < 0 else None))
    if {"SGD", "SAM", "MSAM"} <= rows.keys():
        ok = rows["MSAM"]["speed_vs_sgd"] >= 0.85 and rows["SAM"]["speed_vs_sgd"] <= 1 / 1.5
        verdicts["speed"] = verdict_of(ok)
    if {"MSAM", "MSAM-lr-scaled"} <= rows.keys():
        c = compare(rows["MSAM-lr-scaled"]["test_acc"], rows["MSAM"]["test_acc"])
        verdicts["ladder"] = verdict_of(True if c < 0 else (False if c > 0 else None))
    return combine_verdicts(list(verdicts.values())), verdicts


def run_table(config: ReproConfig | None = None, *, problem: Problem | None = None,
              out: str | os.PathLike | None = None, cache: RunCache | None = None,
              optimizers: Sequence[str] = OPTIMIZERS, progress: bool = False) -> ExperimentResult:
    """Test accuracy and time per epoch of each optimizer, mean ± std over seeds.

    Paper (CIFAR-100, WRN-16-4): SGD 76.90, NAG 77.09, SAM 79.25, MSAM 79.11; speed relative to
    SGD: NAG 0.99, SAM 0.52, MSAM 0.99. A.2: dropping the normalization only shifts the best
    rho; scaling the perturbation by the lr raises train and lowers test accuracy; rho = mu is NAG.

    Verdict rules (difference counted when larger than the standard error of the difference of
    means): accuracy reproduced if MSAM beats SGD and NAG; not reproduced if it is below SGD;
    speed reproduced if MSAM's time per epoch is within 15 % of SGD's and SAM's is at least 1.5x;
    ladder reproduced if MSAM-lr-scaled has a lower test accuracy than MSAM.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = cache if cache is not None else RunCache(problem, config, progress=progress)
    specs = optimizer_specs(config)
    unknown = [o for o in optimizers if o not in specs]
    if unknown:
        raise ValueError(f"unknown optimizer(s) {unknown}; choose from {list(OPTIMIZERS)}")
    rows: dict[str, dict[str, Any]] = {}
    for name in optimizers:
        runs = [cache.get(specs[name], s) for s in config.seed_list()]
        rows[name] = {
            "rho": specs[name].rho,
            "test_acc": [r.final["test_acc"] for r in runs],
            "train_acc": [r.final["train_acc"] for r in runs],
            "seconds_per_epoch": [r.final["seconds_per_epoch"] for r in runs],
        }
    base_t = mean_std(rows["SGD"]["seconds_per_epoch"])[0] if "SGD" in rows else float("nan")
    for r in rows.values():
        r["speed_vs_sgd"] = base_t / mean_std(r["seconds_per_epoch"])[0]
    overall, verdicts = decide(rows)
    ours = "; ".join(
        f"{n} {format_pm(r['test_acc'], 100)} % (speed {r['speed_vs_sgd']:.2f})" for n, r in rows.items())
    data = {"rows": rows, "verdicts": verdicts, "seeds": config.seed_list()}

    def figure(out_dir: pathlib.Path) -> list[pathlib.Path]:
        fig, axes = new_figure(1, 2)
        names = list(rows)
        xs = np.arange(len(names))
        for ax, key, label, scale in ((axes[0, 0], "test_acc", "test accuracy (%)", 100),
                                      (axes[0, 1], "seconds_per_epoch", "seconds per epoch", 1)):
            means = [mean_std(rows[n][key])[0] * scale for n in names]
            stds = [mean_std(rows[n][key])[1] * scale for n in names]
            ax.bar(xs, means, yerr=stds, color=[COLORS.get(n, "k") for n in names], capsize=3)
            for i, n in enumerate(names):
                ax.scatter(np.full(len(rows[n][key]), i), np.asarray(rows[n][key]) * scale,
                           color="k", s=8, zorder=3)
            ax.set_xticks(xs, names, rotation=30, ha="right")
            ax.set_ylabel(label)
        lo = min(min(rows[n]["test_acc"]) for n in names) * 100
        axes[0, 0].set_ylim(max(0.0, lo - 5), 100)
        axes[0, 0].set_title(f"test accuracy, {len(config.seed_list())} seeds")
        axes[0, 1].set_title("time per epoch (step only)")
        return [save_figure(fig, out_dir / "table.png")]

    return finish("table", "Test accuracy and speed (Table 1), ablation ladder (A.2)",
                  "CIFAR-100 WRN-16-4: SGD 76.90, NAG 77.09, SAM 79.25, MSAM 79.11 % test accuracy; "
                  "speed vs SGD: NAG 0.99, SAM 0.52, MSAM 0.99; lr-scaled perturbation hurts test "
                  "accuracy (A.2)",
                  ours, overall, RULE, data, config, problem, out, figure, t0)
