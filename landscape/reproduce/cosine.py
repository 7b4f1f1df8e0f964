"""Experiment 3: cos(v_{t-1}, g_t) during training (Fig. 2C)."""

from __future__ import annotations

import math
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from .config import ReproConfig
from .optimizers import optimizer_specs
from .problems import Problem, digits_problem, steps_per_epoch
from .results import COLORS, ExperimentResult, finish, new_figure, save_figure
from .runs import RunCache
from .stats import format_pm, mean_std

RULE = ("reproduced if cos(v_{t-1}, g_t) < 0 on more than half of the steps (mean over "
        "seeds) and |mean cos| over the last 10 % of steps is below |mean cos| over the "
        "first half.")
"""The verdict rule, as quoted in the report."""


def decide(fraction_negative: Sequence[float], mean_first_half: Sequence[float],
           mean_last_10pct: Sequence[float]) -> str:
    """The verdict (:data:`RULE`) from SGD's per-seed fraction of steps with ``cos < 0`` and
    mean ``cos`` over the first half and the last 10 % of the steps; inconclusive when any
    value is not finite (a run too short to have them)."""
    frac, first, last = list(fraction_negative), list(mean_first_half), list(mean_last_10pct)
    if not all(math.isfinite(v) for v in frac + first + last):
        return "inconclusive"
    ok = (mean_std(frac)[0] > 0.5) and (abs(mean_std(last)[0]) < abs(mean_std(first)[0]))
    return "reproduced" if ok else "not reproduced"


def run_cosine(config: ReproConfig | None = None, *, problem: Problem | None = None,
               out: str | os.PathLike | None = None, cache: RunCache | None = None,
               progress: bool = False) -> ExperimentResult:
    """``cos(v_{t-1}, g_t)`` during SGD training, ``g_t`` the new batch's gradient at ``w_t``.

    Paper (Fig. 2C): mostly negative (the last step overshoots along ``v``), going to about 0 as
    the lr decays. MSAM's series (its gradient is taken at the perturbed point) is logged too.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = cache if cache is not None else RunCache(problem, config, progress=progress)
    specs = optimizer_specs(config)
    series: dict[str, list[list[float]]] = {}
    for name in ("SGD", "MSAM"):
        series[name] = [cache.get(specs[name], s).history["cos"] for s in config.seed_list()]
    per_seed = []
    for c in series["SGD"]:
        a = np.asarray(c)
        n = len(a)
        per_seed.append({
            "fraction_negative": float((a < 0).mean()) if n else float("nan"),
            "mean": float(a.mean()) if n else float("nan"),
            "mean_first_half": float(a[: n // 2].mean()) if n >= 2 else float("nan"),
            "mean_last_10pct": float(a[-max(1, n // 10):].mean()) if n else float("nan"),
        })
    frac = [p["fraction_negative"] for p in per_seed]
    first = [p["mean_first_half"] for p in per_seed]
    last = [p["mean_last_10pct"] for p in per_seed]
    verdict = decide(frac, first, last)
    ours = (f"SGD: cos < 0 on {format_pm(frac, 100)} % of steps; mean cos first half "
            f"{format_pm(first, 1, 3)}, last 10 % {format_pm(last, 1, 3)}")
    msam_means = [float(np.mean(c)) if c else float("nan") for c in series["MSAM"]]
    data = {"per_seed": per_seed, "msam_mean_cos": msam_means, "series": series,
            "steps_per_epoch": steps_per_epoch(problem.train, config.batch_size)}

    def figure(out_dir: pathlib.Path) -> list[pathlib.Path]:
        fig, axes = new_figure(1, 1, (7.0, 3.8))
        ax = axes[0, 0]
        for name in ("SGD", "MSAM"):
            for i, c in enumerate(series[name]):
                a = np.asarray(c)
                if a.size == 0:
                    continue
                k = max(1, a.size // 50)
                smooth = np.convolve(a, np.ones(k) / k, mode="valid")
                ax.plot(np.arange(smooth.size) + 1, smooth, color=COLORS[name], lw=1,
                        alpha=0.8, label=name if i == 0 else None)
        ax.axhline(0.0, color="k", lw=0.5)
        ax.set_xlabel("step")
        ax.set_ylabel("cos(v_{t-1}, g_t) (moving average)")
        ax.set_title("Fig. 2C: momentum vs next-batch gradient")
        ax.legend(fontsize=8)
        return [save_figure(fig, out_dir / "cosine.png")]

    return finish("cosine", "cos(v_{t-1}, g_t) during training (Fig. 2C)",
                  "mostly negative, going to ~0 as the lr decays", ours, verdict,
                  RULE, data, config, problem, out, figure, t0)
