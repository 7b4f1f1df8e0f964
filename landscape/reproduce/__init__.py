"""The MSAM paper's experiments at any scale: a small-scale reproduction on the bundled digits.

Becker, Altrock, Risse, "Momentum-SAM: Sharpness Aware Minimization without Computational
Overhead" (arXiv:2401.12033, 2024). Each experiment is a plain function that trains what it
needs, measures, writes ``<out>/<name>.json`` and ``<out>/<name>.png`` and returns an
:class:`ExperimentResult` holding the numbers, the paper's claim and a verdict decided by a
rule fixed in this file before the runs (never by looking at the seeds):

=============  ===============================================================================
``table``      test accuracy and time per epoch of SGD, NAG, SAM, MSAM and the ablation ladder
               MSAM -> no normalization -> lr-scaled -> NAG (Table 1, A.2)
``rho-sweep``  train/test accuracy of MSAM against a SIGNED rho (Fig. 2A/B)
``cosine``     ``cos(v_{t-1}, g_t)`` during SGD training (Fig. 2C)
``angle``      angle of ``g_MSAM(rho)`` to ``g_SAM`` in the plane {g_SAM, g_SGD} and its zero
               crossing ``rho_0`` (Fig. 3)
``directions`` ``L(w + r d) - L(w)`` along the gradient, +-momentum and random filter-normalized
               directions, plus 2-D surfaces, for SGD-, SAM- and MSAM-trained models (Fig. 4,
               A.13)
``eigenvalues`` top-5 Hessian eigenvalues per optimizer (Table A.5)
``curvature``  directional curvature ``d^T H d / ||d||^2`` along momentum, gradient and a random
               direction during training (A.4)
=============  ===============================================================================

The small-scale setting (:meth:`ReproConfig.full`, the default): the bundled 8x8 digits with 20 %
of the training labels flipped to another class (clean test labels; without noise every optimizer
reaches about 97 % and nothing is measurable), a ``digits_cnn(width=16)`` with BatchNorm, SGD
momentum 0.9, batch 64, peak lr 0.1 with a per-step cosine schedule, weight decay 5e-4, 30 epochs.
BatchNorm statistics of every final model are recomputed at its unperturbed weights
(:func:`msam.recalibrate_batchnorm`), as the MSAM authors do.

The same functions take a user's model and data (:class:`Problem`) for full scale, e.g. CIFAR-100
with a WRN-16-4 (see docs/REPRODUCTION.md for the recipe with the paper's hyperparameters).

The package, one concept per module: :mod:`~landscape.reproduce.config` (:class:`ReproConfig`),
:mod:`~landscape.reproduce.problems` (:class:`Problem`, :func:`digits_problem`),
:mod:`~landscape.reproduce.optimizers` (:class:`OptimizerSpec`, :func:`build_optimizer`),
:mod:`~landscape.reproduce.runs` (:func:`train_run`, :class:`RunCache`),
:mod:`~landscape.reproduce.stats` (the statistics behind the verdicts), one module per
experiment with its verdict rule next to it (``table``, ``rho_sweep``, ``cosine``, ``angle``,
``directions``, ``eigenvalues``, ``curvature``), :mod:`~landscape.reproduce.driver`
(:func:`run_experiment`, :func:`run_all`) and :mod:`~landscape.reproduce.markdown` (the report).
The command line (``landscape reproduce``) lives in :mod:`landscape.cli.reproduce`.

Example:
    >>> from landscape.reproduce import ReproConfig, run_experiment   # doctest: +SKIP
    >>> res = run_experiment("cosine", ReproConfig.quick(), out="repro_out")   # doctest: +SKIP
    >>> res.verdict                                                    # doctest: +SKIP
"""

from __future__ import annotations

from .angle import RULE as _RULE_ANGLE
from .angle import run_angle, zero_crossing
from .config import ReproConfig
from .cosine import RULE as _RULE_COSINE
from .cosine import run_cosine
from .curvature import RULE as _RULE_CURVATURE
from .curvature import run_curvature
from .directions import RULE as _RULE_DIRECTIONS
from .directions import run_directions
from .driver import EXPERIMENTS, run_all, run_experiment
from .eigenvalues import RULE as _RULE_EIGENVALUES
from .eigenvalues import run_eigenvalues
from .markdown import load_results, render_markdown, write_report
from .optimizers import OPTIMIZERS, OptimizerSpec, build_optimizer, optimizer_specs
from .problems import Problem, digits_problem
from .results import ExperimentResult
from .rho_sweep import RULE as _RULE_RHO_SWEEP
from .rho_sweep import run_rho_sweep
from .runs import RunCache, TrainedRun, train_run
from .table import RULE as _RULE_TABLE
from .table import run_table

__all__ = [
    "EXPERIMENTS",
    "OPTIMIZERS",
    "ReproConfig",
    "Problem",
    "OptimizerSpec",
    "TrainedRun",
    "RunCache",
    "ExperimentResult",
    "digits_problem",
    "optimizer_specs",
    "build_optimizer",
    "train_run",
    "run_table",
    "run_rho_sweep",
    "run_cosine",
    "run_angle",
    "run_directions",
    "run_eigenvalues",
    "run_curvature",
    "run_experiment",
    "run_all",
    "render_markdown",
    "write_report",
    "load_results",
    "zero_crossing",
]

_RULES = {
    "table": _RULE_TABLE,
    "rho-sweep": _RULE_RHO_SWEEP,
    "cosine": _RULE_COSINE,
    "angle": _RULE_ANGLE,
    "directions": _RULE_DIRECTIONS,
    "eigenvalues": _RULE_EIGENVALUES,
    "curvature": _RULE_CURVATURE,
}
"""Experiment name -> its verdict rule (each defined next to its experiment)."""
