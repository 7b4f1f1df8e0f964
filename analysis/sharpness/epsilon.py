"""Keskar et al. (2017) epsilon-sharpness: the largest relative loss increase in a box around
the weights, maximized by L-BFGS-B (as Keskar et al.) or APGD."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..checks import check_first_batch
from ..data import Data, DataSource, as_data
from ..evaluation import model_mode, progress_bar, resolve_loss
from ..losses import LossSpec
from ..params import ParameterSpace
from ..precision import autocast_disabled
from ..results import CostedResult
from ..uncertainty import (
    DEFAULT_MIN_UNITS,
    DataStdError,
    check_stderr_args,
    data_stderr_from_units,
    groups_per_batch,
)
from ._common import (
    Counter,
    Evaluator,
    check_flag,
    check_mode,
    check_model,
    check_positive,
    check_seed,
    full_loss,
    global_num_batches,
    global_num_samples,
    unit_losses,
)
from .apgd import apgd
from .state import preserved_state


@dataclass(frozen=True, repr=False)
class EpsilonSharpnessResult(CostedResult):
    """Keskar et al.'s epsilon-sharpness, in percent.

    Attributes:
        value: ``100 * (L_max - L) / (1 + L)``.
        loss: ``L(w)`` on the data; max_loss: ``L_max`` the largest loss found in the box.
        epsilon, method, steps, seed, mode: the settings used.
        num_samples: samples in the data.
        forward_passes, backward_passes, forward_samples, backward_samples: the cost.
        data_stderr: the data-sampling standard error of ``value`` (``None`` when not asked,
            ``nan`` where undefined): the per-unit losses ``a_u = L_u(w)``, ``b_u = L_u(w +
            z*)`` at the box point ``z*`` found (Danskin: the maximum moves with the data like
            the loss at its maximizer), linearized through ``f(a, b) = 100 (b - a) / (1 + a)``:
            ``x_u = 100 (b_u - a_u) / (1 + a) - 100 (b - a) (a_u - a) / (1 + a)^2``; see
            :mod:`analysis.uncertainty`.
        data_sampling: its :class:`~analysis.uncertainty.DataStdError` (units, cost, reason).
    """

    value: float
    loss: float
    max_loss: float
    epsilon: float
    method: str
    steps: int
    seed: int
    mode: str | None
    num_samples: int
    data_stderr: float | None = None
    data_sampling: DataStdError | None = None


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    epsilon: float = 1e-3,
    method: str = "lbfgsb",
    steps: int = 10,
    seed: int = 0,
    mode: str | None = "eval",
    batch_size: int | None = None,
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = False,
    check_deterministic: bool = True,
    data_stderr: bool = True,
    min_units: int = DEFAULT_MIN_UNITS,
) -> EpsilonSharpnessResult:
    """Keskar et al. (2017) epsilon-sharpness, in percent.

    ``100 * (max_{z in C} L(w + z) - L(w)) / (1 + L(w))`` with the box
    ``C = {z : |z_i| <= epsilon (|w_i| + 1)}`` (the full-space variant, ``A = I``), ``L`` the
    sample-weighted loss over all of ``data``. The inner maximum is approximated from below by
    ``method="lbfgsb"`` (default, as Keskar et al.: scipy's L-BFGS-B on ``-L`` with the box as
    bounds, ``steps`` iterations (default 10), started at a tiny seeded random point) or
    ``method="apgd"`` (projected ascent in the L-inf box, ``steps`` iterations, on device; no
    CPU round trips of the weights). Keskar et al. report ``epsilon`` in ``{1e-3, 5e-4}``.

    Cost: one forward+backward pass over the data per function evaluation (L-BFGS-B: about
    ``steps`` to ``2 steps`` evaluations; APGD: ``steps`` + 1), plus one forward pass; the
    data-sampling standard error two more forward passes (at ``w`` and at ``w + z*``).

    Args:
        model, loss_fn, data: as in :func:`sharpness`.
        epsilon: relative box size (> 0, default 1e-3).
        method: ``"lbfgsb"`` (default) or ``"apgd"``.
        steps: iterations of the maximizer (default 10).
        seed: seed of the start point.
        mode: ``"eval"`` (default), ``"train"`` or ``None``.
        batch_size: batch size to split an ``(X, y)`` pair.
        params: restrict the perturbed parameters.
        progress: show a progress bar over function evaluations.
        check_deterministic: refuse a random forward (see :func:`sharpness`).
        data_stderr: also the data-sampling standard error (default True).
        min_units: the fewest sampling units of that standard error (default 16).

    Returns:
        :class:`EpsilonSharpnessResult`.
    """
    check_model(model)
    check_positive("epsilon", epsilon)
    check_positive("steps", steps, integer=True)
    if method not in ("lbfgsb", "apgd"):
        raise ValueError(f"method must be 'lbfgsb' or 'apgd', got {method!r}")
    check_seed(seed)
    check_flag("check_deterministic", check_deterministic)
    check_mode(mode)
    check_stderr_args(data_stderr, min_units)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    source = as_data(data, batch_size=batch_size)
    check_first_batch(model, loss_fn, source, mode, where="epsilon_sharpness()",
                      deterministic=check_deterministic)
    counter = Counter()
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    eps = float(epsilon)
    with preserved_state(model), model_mode(model, mode), autocast_disabled():
        w0 = space.vector()
        ev = Evaluator(model, loss_fn, space, w0, counter)
        l0 = full_loss(ev, source, None, "at the unperturbed weights")
        bar = progress_bar(range(int(steps)), enabled=progress, desc="epsilon sharpness")
        maximize = _apgd_max if method == "apgd" else _lbfgsb_max
        best, z = maximize(ev, source, w0, eps, int(steps), gen, iter(bar))
        if best <= l0:
            best, z = l0, None
        se = _epsilon_stderr(ev, source, z, l0, best, min_units) if data_stderr else None
    return EpsilonSharpnessResult(
        value=100.0 * (best - l0) / (1.0 + l0),
        loss=l0,
        max_loss=best,
        epsilon=eps,
        method=method,
        steps=int(steps),
        seed=int(seed),
        mode=mode,
        num_samples=global_num_samples(source, space.device),
        **counter.as_dict(),
        data_stderr=None if se is None else se.stderr[0],
        data_sampling=se,
    )


def _epsilon_stderr(ev: Evaluator, source: DataSource, z: torch.Tensor | None, a: float,
                    b: float, min_units: int) -> DataStdError:
    """The SE of ``100 (b - a) / (1 + a)`` from the units' losses at ``w`` and ``w + z``
    (two forward passes; see :class:`EpsilonSharpnessResult`)."""
    groups = groups_per_batch(global_num_batches(source, ev.space.device), min_units)
    at_w = unit_losses(ev, source, None, groups, "at the unperturbed weights")
    at_z = at_w if z is None else unit_losses(ev, source, z, groups, "at the box point found")
    x = [100.0 * (bu[1] - au[1]) / (1.0 + a) - 100.0 * (b - a) * (au[1] - a) / (1.0 + a) ** 2
         for au, bu in zip(at_w, at_z)]
    return data_stderr_from_units([r[0] for r in at_w], x, groups=groups,
                                  forward_passes=1 if z is None else 2)


def _apgd_max(ev: Evaluator, source: DataSource, w0: torch.Tensor, eps: float, steps: int,
              gen: torch.Generator, bar_iter: Iterator) -> tuple[float, torch.Tensor | None]:
    """The largest full-data loss APGD finds in the L-inf box ``|z_i| <= eps (|w_i| + 1)``
    (``u = z / (|w| + 1)``, started at a tiny seeded random point), and the point ``z``."""
    space = ev.space

    def objective(delta, need_grad, where):
        next(bar_iter, None)
        if need_grad:
            return full_loss(ev, source, delta, where, need_grad=True)
        return full_loss(ev, source, delta, where), None

    c = w0.abs() + 1
    u0 = (2 * torch.rand(space.numel, generator=gen, dtype=torch.float64) - 1) * (0.01 * eps)
    return apgd(objective, c, u0.to(space.device, space.dtype), eps, "linf", steps,
                 return_point=True)


def _lbfgsb_max(ev: Evaluator, source: DataSource, w0: torch.Tensor, eps: float, steps: int,
                gen: torch.Generator, bar_iter: Iterator) -> tuple[float, torch.Tensor | None]:
    """The largest full-data loss seen by scipy's L-BFGS-B minimizing ``-L`` with the box
    ``|z_i| <= eps (|w_i| + 1)`` as bounds (Keskar et al. 2017), ``steps`` iterations from a
    tiny seeded random point, and the point ``z`` where it was seen."""
    from scipy.optimize import Bounds, minimize

    space = ev.space
    ub = (eps * (w0.abs() + 1)).detach().cpu().double().numpy()
    best_seen: list = [-math.inf, None]

    def fun(z: np.ndarray) -> tuple[float, np.ndarray]:
        next(bar_iter, None)
        delta = torch.from_numpy(z).to(device=space.device, dtype=space.dtype)
        f, g = full_loss(ev, source, delta, "during L-BFGS-B", need_grad=True)
        if f > best_seen[0]:
            best_seen[:] = [f, delta]
        return -f, -g.detach().cpu().double().numpy()

    x0 = ((2 * torch.rand(space.numel, generator=gen, dtype=torch.float64) - 1).numpy()
          * ub * 0.01)
    minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=Bounds(-ub, ub),
             options={"maxiter": steps})
    return best_seen[0], best_seen[1]
