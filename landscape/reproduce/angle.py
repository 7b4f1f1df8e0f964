"""Experiment 4: angle of g_MSAM to g_SAM and its zero crossing (Fig. 3)."""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from .config import ReproConfig
from .optimizers import optimizer_specs
from .problems import Problem, digits_problem
from .results import COLORS, ExperimentResult, finish, new_figure, save_figure
from .runs import RunCache
from .stats import format_pm, verdict_of

RULE = ("reproduced if the mean angle (over batches and seeds) crosses zero at a positive rho_0 and rho_0 is within "
        "a factor 3 of the best rho of the sweep; not reproduced if it never crosses or is "
        "off by more than that; inconclusive without a sweep.")
"""The verdict rule, as quoted in the report."""


def zero_crossing(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """First ``x`` where ``ys`` goes from positive to <= 0, linearly interpolated (or ``None``)."""
    xs, ys = list(map(float, xs)), list(map(float, ys))
    if len(xs) != len(ys):
        raise ValueError(f"xs and ys differ in length ({len(xs)} vs {len(ys)})")
    for i in range(1, len(xs)):
        y0, y1 = ys[i - 1], ys[i]
        if y0 > 0 >= y1:
            return xs[i - 1] + (xs[i] - xs[i - 1]) * y0 / (y0 - y1)
    return None


def decide(rho_0: float | None, best_rho: float | None) -> str:
    """The verdict (:data:`RULE`) from the zero crossing ``rho_0`` of the mean angle curve
    (``None``: no crossing) and the best positive rho of the sweep (``None``: no sweep)."""
    if rho_0 is None:
        return "not reproduced"
    if best_rho is None or best_rho <= 0:
        return "inconclusive"
    return verdict_of(best_rho / 3 <= rho_0 <= best_rho * 3)


def run_angle(config: ReproConfig | None = None, *, problem: Problem | None = None,
              out: str | os.PathLike | None = None, cache: RunCache | None = None,
              best_rho: float | None = None, progress: bool = False) -> ExperimentResult:
    """Angle of ``g_MSAM(rho)`` to ``g_SAM`` and the radius ``rho_0`` where it crosses zero.

    During SGD training (each seed), on ``config.angle_batches`` consecutive steps from
    mid-training, at the weights ``w`` and momentum ``v`` of the step and on its batch:
    ``g_SGD = grad L_B(w)``, ``g_SAM = grad L_B(w + rho_SAM g_SGD / ||g_SGD||)`` and
    ``g_MSAM(rho) = grad L_B(w - rho v / ||v||)``, the signed angle of ``g_MSAM`` projected into
    the plane {g_SAM, g_SGD} to ``g_SAM`` (:meth:`analysis.MechanismProbe.angles`).
    ``rho_0`` is the zero crossing of the mean angle curve (:func:`zero_crossing`); the per-batch
    crossings (refined by bisection) give its spread.

    Paper (Fig. 3): the angle crosses zero at ``rho_0 ~ 3``, about the best rho of WRN-16-4.
    ``best_rho`` (default: read from ``out/rho-sweep.json`` if present) is the comparison.
    """
    t0 = time.perf_counter()
    config = config if config is not None else ReproConfig()
    problem = problem if problem is not None else digits_problem(config)
    cache = cache if cache is not None else RunCache(problem, config, progress=progress)
    spec = optimizer_specs(config)["SGD"]
    per_seed = []
    rhos: list[float] = sorted(float(r) for r in config.angle_rhos)
    for seed in config.seed_list():
        rows = cache.get(spec, seed, angles=True).history["angles"]
        if not rows:
            continue
        curve = np.mean([r["angles_deg"] for r in rows], axis=0)
        per_seed.append({"seed": seed, "mean_angle": curve.tolist(),
                         "rho_0": zero_crossing(rhos, curve.tolist()),
                         "batch_rho_0": [r["rho_zero"] for r in rows],
                         "angle_sgd_sam_deg": [r["angle_sgd_sam_deg"] for r in rows],
                         "in_plane": [r["in_plane"] for r in rows]})
    if not per_seed:
        raise ValueError("no angle measurements: the runs are shorter than two steps")
    curve = np.mean([p["mean_angle"] for p in per_seed], axis=0)
    rho0 = zero_crossing(rhos, curve.tolist())
    batch_r0 = [r for p in per_seed for r in p["batch_rho_0"]]
    crossed = [r for r in batch_r0 if r is not None]
    if best_rho is None and out is not None:
        sweep = pathlib.Path(out) / "rho-sweep.json"
        if sweep.exists():
            best_rho = json.loads(sweep.read_text())["data"].get("best_positive_rho")
    verdict = decide(rho0, best_rho)
    ours = (f"rho_0 = {rho0:.2f} (per batch {format_pm(crossed, 1, 2)}, {len(crossed)}/{len(batch_r0)} "
            f"batches cross)" if rho0 is not None else f"no zero crossing up to rho = {rhos[-1]:g}")
    ours += f"; best rho of the sweep {best_rho:g}" if best_rho is not None else ""
    data = {"rhos": rhos, "mean_angle": curve.tolist(), "rho_0": rho0, "per_seed": per_seed,
            "best_rho": best_rho, "rho_sam": config.rho_sam}

    def figure(out_dir: pathlib.Path) -> list[pathlib.Path]:
        fig, axes = new_figure(1, 1, (6.0, 3.8))
        ax = axes[0, 0]
        for p in per_seed:
            ax.plot(rhos, p["mean_angle"], color=COLORS["MSAM"], alpha=0.35, lw=1)
        ax.plot(rhos, curve, color=COLORS["MSAM"], marker="o", label="mean over seeds")
        ax.axhline(0.0, color="k", lw=0.5)
        if rho0 is not None:
            ax.axvline(rho0, color="k", ls="--", lw=1, label=f"rho_0 = {rho0:.2f}")
        if best_rho is not None:
            ax.axvline(best_rho, color=COLORS["SAM"], ls=":", lw=1, label=f"best rho {best_rho:g}")
        ax.set_xscale("symlog", linthresh=0.1)
        ax.set_xlabel("MSAM rho")
        ax.set_ylabel("angle to g_SAM in plane {g_SAM, g_SGD} (deg)")
        ax.set_title(f"Fig. 3 (rho_SAM = {config.rho_sam:g}, mid-training SGD)")
        ax.legend(fontsize=8)
        return [save_figure(fig, out_dir / "angle.png")]

    return finish("angle", "Angle of g_MSAM to g_SAM and its zero crossing (Fig. 3)",
                  "the angle crosses zero at rho_0 ~ 3, about the best MSAM rho (WRN-16-4)",
                  ours, verdict, RULE, data, config, problem, out, figure, t0)
