"""Experiment 5: sharpness along gradient, momentum and random directions (Fig. 4, A.13)."""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.data import Data
from analysis.directions import gradient_direction, momentum_direction, random_direction

from .config import ReproConfig
from .optimizers import optimizer_specs
from .problems import Problem, digits_problem
from .results import COLORS, ExperimentResult, finish, new_figure, save_figure
from .runs import RunCache, TrainedRun
from .stats import compare, format_pm

RULE = ("reproduced if MSAM's and SAM's sharpness L(w + r d) - L(w) at r = R along "
        "-momentum and along the random filter-normalized direction are below SGD's "
        "(by more than the standard error); not reproduced if either is above SGD's.")
"""The verdict rule, as quoted in the report."""


def _slice_loss(model: nn.Module, loss_fn: Any, data: Data, d: torch.Tensor,
                alphas: Sequence[float]) -> list[float]:
    """``L(w + alpha d)`` for each alpha (eval mode; weights restored exactly)."""
    from ..slices import slice_1d

    res = slice_1d(model, loss_fn, data, d, list(alphas), metrics=("loss",), batch_size=512,
                   progress=False)
    return [float(v) for v in res.loss]


NAMES = ("SGD", "SAM", "MSAM")
"""The optimizers compared."""


def decide(sharp: dict[str, dict[str, list[float]]]) -> str:
    """The verdict (:data:`RULE`) from the per-seed sharpness ``sharp[optimizer][key]``.

    Compares SAM and MSAM with SGD along ``"-momentum"`` and ``"random"``
    (:func:`landscape.reproduce.stats.compare`): reproduced if all four are lower, not
    reproduced if any is higher, else inconclusive.
    """
    checks = [compare(sharp[name][key], sharp["SGD"][key])
              for name in ("SAM", "MSAM") for key in ("-momentum", "random")]
    if all(c < 0 for c in checks):
        return "reproduced"
    if any(c > 0 for c in checks):
        return "not reproduced"
    return "inconclusive"


def _seed_curves(run: TrainedRun, problem: Problem, seed: int, radii: list[float],
                 alphas: list[float]) -> dict[str, list[float]]:
    """``L(w + r d) - L(w)`` of one trained run along the unit gradient and momentum (over
    ``radii``) and a random filter-normalized direction (over ``alphas``)."""
    model = run.model
    train_eval = problem.full_train()
    g = gradient_direction(model, problem.loss, train_eval, mode="eval", batch_size=512)
    v = momentum_direction(run.optimizer, model)
    rd = random_direction(model, seed=1000 + seed)
    out = {}
    for key, d, xs in (("gradient", g, radii), ("momentum", v, radii), ("random", rd, alphas)):
        if key != "random":
            d = d / torch.linalg.vector_norm(d)
        losses = _slice_loss(model, problem.loss, train_eval, d, xs)
        l0 = losses[len(xs) // 2]
        out[key] = [li - l0 for li in losses]
    return out


def _surface(run: TrainedRun, problem: Problem, config: ReproConfig) -> dict[str, Any]:
    """The probe-set loss over two random filter-normalized directions (seeds 5000, 5001)."""
    from ..slices import slice_2d

    d1 = random_direction(run.model, seed=5000)
    d2 = random_direction(run.model, seed=5001, orthogonal_to=d1)
    grid = np.linspace(-1.0, 1.0, config.surface_points).tolist()
    s2 = slice_2d(run.model, problem.loss, problem.probe_data(config), d1, d2, grid, grid,
                  metrics=("loss",), batch_size=512, progress=False)
    return {"xs": grid, "ys": grid, "loss": np.asarray(s2.loss).tolist(),
            "loss_at_origin": s2.loss_at_origin}


def _figures(out_dir: pathlib.Path, curves: dict, surfaces: dict, radii: list[float],
             alphas: list[float]) -> list[pathlib.Path]:
    fig, axes = new_figure(1, 3, (4.2, 3.4))
    titles = {"gradient": "(A) gradient (unit)", "momentum": "(B) momentum v (unit)",
              "random": "(C) random, filter-normalized"}
    for ax, key in zip(axes[0], ("gradient", "momentum", "random")):
        xs = alphas if key == "random" else radii
        for n in NAMES:
            arr = np.asarray(curves[n][key])
            m, s = arr.mean(0), arr.std(0)
            ax.plot(xs, m, color=COLORS[n], label=n)
            ax.fill_between(xs, m - s, m + s, color=COLORS[n], alpha=0.2)
        ax.set_title(titles[key])
        ax.set_xlabel("r" if key != "random" else "alpha")
        ax.set_ylabel("L(w + r d) - L(w)")
        ax.legend(fontsize=8)
    p1 = save_figure(fig, out_dir / "directions.png")
    fig2, axes2 = new_figure(1, 3, (3.8, 3.4))
    vmax = max(float(np.nanmax(surfaces[n]["loss"])) for n in NAMES)
    vmin = min(float(np.nanmin(surfaces[n]["loss"])) for n in NAMES)
    levels = np.linspace(vmin, vmax, 15) if vmax > vmin else 15
    for ax, n in zip(axes2[0], NAMES):
        z = np.asarray(surfaces[n]["loss"], dtype=float)
        cs = ax.contourf(surfaces[n]["xs"], surfaces[n]["ys"], z.T, levels=levels, cmap="viridis")
        ax.plot([0], [0], "r+")
        ax.set_title(f"{n}: loss on the probe set")
        ax.set_xlabel("d1")
        ax.set_ylabel("d2")
    fig2.colorbar(cs, ax=axes2[0].tolist(), shrink=0.8)
    p2 = save_figure(fig2, out_dir / "directions-2d.png")
    return [p1, p2]


def run_directions(config: ReproConfig | None = None, *, problem: Problem | None = None,
                   out: str | os.PathLike | None = None, cache: RunCache | None = None,
                   progress: bool = False) -> ExperimentResult:
    """``L(w + r d) - L(w)`` of SGD-, SAM- and MSAM-trained models along several directions.

    Directions at the final (unperturbed) weights: the training-set gradient and the momentum
    ``v`` as unit vectors, ``r`` in ``[-R, R]`` (negative ``r`` along the momentum is MSAM's
    perturbation direction ``-v``); a random filter-normalized direction (Li et al. 2018, biases
    and BatchNorm zeroed) with ``r`` in ``[-1, 1]``. Losses on the (noisy) training set in eval
    mode. Plus a 2-D surface over two random filter-normalized directions for the first seed.

    Paper (Fig. 4): SAM- and MSAM-trained models are flatter than SGD's along these directions.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = cache if cache is not None else RunCache(problem, config, progress=progress)
    specs = optimizer_specs(config)
    R = config.slice_radius
    radii = np.linspace(-R, R, config.slice_points).tolist()
    alphas = np.linspace(-1.0, 1.0, config.slice_points).tolist()
    curves: dict[str, dict[str, list[list[float]]]] = {n: {"gradient": [], "momentum": [],
                                                          "random": []} for n in NAMES}
    sharp: dict[str, dict[str, list[float]]] = {n: {"+gradient": [], "+momentum": [],
                                                    "-momentum": [], "random": []} for n in NAMES}
    surfaces: dict[str, Any] = {}
    for name in NAMES:
        for seed in config.seed_list():
            c = _seed_curves(cache.get(specs[name], seed), problem, seed, radii, alphas)
            for key in curves[name]:
                curves[name][key].append(c[key])
            sharp[name]["+gradient"].append(c["gradient"][-1])
            sharp[name]["+momentum"].append(c["momentum"][-1])
            sharp[name]["-momentum"].append(c["momentum"][0])
            sharp[name]["random"].append(0.5 * (c["random"][0] + c["random"][-1]))
        surfaces[name] = _surface(cache.get(specs[name], config.seed_list()[0]), problem, config)
    verdict = decide(sharp)
    ours = "; ".join(
        f"{key} (r={'±1' if key == 'random' else ('-' if key[0] == '-' else '+') + format(R, 'g')}): "
        + ", ".join(f"{n} {format_pm(sharp[n][key], 1, 3)}" for n in NAMES)
        for key in ("-momentum", "+momentum", "+gradient", "random"))
    data = {"radii": radii, "alphas": alphas, "curves": curves, "sharpness": sharp,
            "surfaces": surfaces, "radius": R}

    def figure(out_dir: pathlib.Path) -> list[pathlib.Path]:
        return _figures(out_dir, curves, surfaces, radii, alphas)

    return finish("directions", "Sharpness along gradient, momentum and random directions "
                  "(Fig. 4, A.13)",
                  "SAM- and MSAM-trained models are flatter than SGD-trained ones along the "
                  "gradient, +-momentum and random filter-normalized directions",
                  ours, verdict, RULE, data, config, problem, out, figure, t0)
