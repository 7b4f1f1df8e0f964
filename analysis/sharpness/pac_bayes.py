"""PAC-Bayes flatness (Jiang et al. 2020, "Fantastic Generalization Measures"): ``1 / sigma'^2``
with ``sigma'`` the noise scale that lowers the training accuracy by ``target``, found by
bracketing and bisection with common random numbers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..checks import check_first_batch
from ..data import Data, DataSource, as_data
from ..evaluation import accuracy_unit, model_mode, progress_bar, resolve_loss
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
from .state import preserved_state

__all__ = ["UndefinedMetricError"]


class UndefinedMetricError(ValueError):
    """The metric does not exist for this model and data (e.g. PAC-Bayes flatness of a model near
    chance accuracy: no noise level lowers the accuracy by the target). Not a bad argument:
    :func:`analysis.sharpness_report` reports the metric as undefined with this
    message and keeps the others."""


@dataclass(frozen=True, repr=False)
class PacBayesResult(CostedResult):
    """Jiang et al.'s PAC-Bayes flatness ``1 / sigma'^2``.

    Attributes:
        flatness: ``1 / sigma^2`` (larger means flatter).
        sigma: the noise scale found (relative to ``|w_i|`` when magnitude-aware).
        deviation: the mean accuracy drop measured at ``sigma``.
        accuracy: the unperturbed training accuracy (counted per ``accuracy_unit``).
        magnitude_aware, target, draws, seed, mode: the settings used.
        evaluations: number of sigmas tried (bracketing and bisection).
        num_samples, forward_passes, backward_passes, forward_samples, backward_samples: cost.
        accuracy_unit: what the accuracy counts: ``"sample"`` (classification) or ``"token"``
            (the next-token predictions of a language-model loss).
        data_stderr: the data-sampling standard error of ``flatness`` (``None`` when not asked,
            ``nan`` where undefined): the per-unit accuracy drops ``D_u = acc_u(w) - mean_k
            acc_u(w + u_k)`` at the ``sigma`` found (same draws), weighted by the units'
            accuracy counts, through the implicit function ``D(sigma) = target``:
            ``SE(flatness) = 2 SE(D) / (sigma^3 D'(sigma))`` with ``D'`` the secant slope over the
            final bisection bracket (:mod:`analysis.uncertainty`).
        data_sampling: its :class:`~analysis.uncertainty.DataStdError` (units, cost, reason).
    """

    flatness: float
    sigma: float
    deviation: float
    accuracy: float
    magnitude_aware: bool
    target: float
    draws: int
    seed: int
    mode: str | None
    evaluations: int
    num_samples: int
    accuracy_unit: str = "sample"
    data_stderr: float | None = None
    data_sampling: DataStdError | None = None


def pac_bayes_flatness(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    magnitude_aware: bool = False,
    target: float = 0.1,
    draws: int = 10,
    sigma_max: float = 1.0,
    tolerance: float = 0.01,
    max_evaluations: int = 40,
    seed: int = 0,
    mode: str | None = "eval",
    batch_size: int | None = None,
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = False,
    check_deterministic: bool = True,
    data_stderr: bool = True,
    min_units: int = DEFAULT_MIN_UNITS,
) -> PacBayesResult:
    """PAC-Bayes flatness of Jiang et al. (2020): ``1 / sigma'^2``.

    ``sigma'`` is the noise scale at which the mean training accuracy over ``draws`` noisy
    copies drops by ``target`` (default 0.1): ``acc(w) - mean_k acc(w + u_k) ~= target`` with
    ``u_k = sigma z_k`` (plain) or ``u_k,i = sqrt(sigma^2 w_i^2 + 1e-6) z_k,i``
    (``magnitude_aware=True``), ``z_k ~ N(0, I)`` drawn from a private seeded generator and
    reused for every ``sigma`` (common random numbers make the deviation monotone in practice).
    The bracket ``[0, sigma_max]`` is doubled until the deviation exceeds ``target``, then
    bisected until ``|deviation - target| <= tolerance`` or ``max_evaluations``.

    Cost: ``draws`` forward passes over the data per evaluated sigma, plus one; the
    data-sampling standard error ``draws + 1`` more (at ``w`` and the draws at ``sigma``).

    Args:
        model, loss_fn, data: as in :func:`sharpness`; targets must be class indices, or the
            loss a language-model loss (the accuracy is then the token accuracy).
        magnitude_aware: the magnitude-aware variant (default False).
        target: accuracy drop defining ``sigma'`` (default 0.1).
        draws: noise draws per sigma (default 10).
        sigma_max: initial upper end of the bracket (default 1.0; doubled as needed).
        tolerance: accepted ``|deviation - target|`` (default 0.01).
        max_evaluations: cap on evaluated sigmas (default 40).
        seed, mode, batch_size, params, progress: as elsewhere.
        check_deterministic: refuse a random forward (see :func:`sharpness`).
        data_stderr: also the data-sampling standard error (default True).
        min_units: the fewest sampling units of that standard error (default 16).

    Returns:
        :class:`PacBayesResult`.

    Raises:
        ValueError: data without an accuracy (neither class-index targets nor a language-model
            loss), a ``target`` the accuracy cannot drop by: above the accuracy at ``w``, or
            not reached before the loss stops being finite (the noise overflows the model, as
            for a model near chance accuracy, whose accuracy noise cannot lower) or within
            ``max_evaluations``; the message names the accuracy at ``w``, the target and the
            largest sigma tried with its drop.
    """
    check_model(model)
    check_positive("target", target)
    check_positive("draws", draws, integer=True)
    check_positive("sigma_max", sigma_max)
    check_positive("tolerance", tolerance)
    check_positive("max_evaluations", max_evaluations, integer=True)
    if target >= 1:
        raise ValueError(f"the accuracy cannot drop by target={target!r}; target must be < 1")
    check_flag("magnitude_aware", magnitude_aware)
    check_flag("check_deterministic", check_deterministic)
    check_seed(seed)
    check_mode(mode)
    check_stderr_args(data_stderr, min_units)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    source = as_data(data, batch_size=batch_size)
    check_first_batch(model, loss_fn, source, mode, where="pac_bayes_flatness()",
                      deterministic=check_deterministic)
    counter = Counter()
    evaluations = 0
    with preserved_state(model), model_mode(model, mode), autocast_disabled():
        w0 = space.vector()
        ev = Evaluator(model, loss_fn, space, w0, counter)
        _, acc0 = full_loss(ev, source, None, "at the unperturbed weights", accuracy=True)
        if acc0 - target <= 0:
            raise ValueError(
                f"the training accuracy {acc0:.4f} cannot drop by target={target}; "
                "lower the target"
            )
        scale = w0.abs() if magnitude_aware else None

        def noise(sigma: float, k: int) -> torch.Tensor:
            gen = torch.Generator(device=space.device).manual_seed(int(seed) * 1_000_003 + k)
            z = torch.randn(space.numel, generator=gen, device=space.device, dtype=space.dtype)
            if scale is None:
                return sigma * z
            return torch.sqrt(sigma * sigma * scale * scale + 1e-6) * z

        def deviation(sigma: float) -> float:
            nonlocal evaluations
            evaluations += 1
            total = 0.0
            for k in range(int(draws)):
                _, acc = full_loss(ev, source, noise(sigma, k), f"at sigma={sigma:.4g}, draw {k}",
                                    accuracy=True)
                total += acc
            return acc0 - total / int(draws)

        bar = progress_bar(range(int(max_evaluations)), enabled=progress, desc="PAC-Bayes sigma")
        sigma, dev, slope = _find_sigma(deviation, lambda: evaluations, iter(bar), target=target,
                                        sigma_max=float(sigma_max), tolerance=tolerance,
                                        max_evaluations=max_evaluations, accuracy=acc0)
        se = _flatness_stderr(ev, source, [noise(sigma, k) for k in range(int(draws))], sigma,
                              slope, min_units) if data_stderr else None
    return PacBayesResult(
        flatness=1.0 / (sigma * sigma),
        sigma=sigma,
        deviation=dev,
        accuracy=acc0,
        magnitude_aware=bool(magnitude_aware),
        target=float(target),
        draws=int(draws),
        seed=int(seed),
        mode=mode,
        evaluations=evaluations,
        num_samples=global_num_samples(source, space.device),
        **counter.as_dict(),
        accuracy_unit=accuracy_unit(loss_fn),
        data_stderr=None if se is None else se.stderr[0],
        data_sampling=se,
    )


def _flatness_stderr(ev: Evaluator, source: DataSource, deltas: list[torch.Tensor],
                     sigma: float, slope: float, min_units: int) -> DataStdError:
    """The SE of ``1 / sigma^2`` from the units' accuracy drops at ``sigma`` (``draws + 1``
    forward passes; see :class:`PacBayesResult`)."""
    groups = groups_per_batch(global_num_batches(source, ev.space.device), min_units)
    at_w = unit_losses(ev, source, None, groups, "at the unperturbed weights", accuracy=True)
    drops = [r[2] / r[3] for r in at_w]
    for k, delta in enumerate(deltas):
        rows = unit_losses(ev, source, delta, groups, f"at sigma={sigma:.4g}, draw {k}",
                           accuracy=True)
        drops = [d - r[2] / r[3] / len(deltas) for d, r in zip(drops, rows)]
    counts = [int(r[3]) for r in at_w]
    if not slope > 0:
        se = data_stderr_from_units(counts, [[math.nan]] * len(counts), groups=groups,
                                    forward_passes=len(deltas) + 1)
        return replace(se, stderr=(math.nan,), reason=(
            f"the accuracy drop did not grow over the final bracket (slope {slope:.3g}), so "
            "the noise scale's sensitivity to the data is undefined"))
    factor = -2.0 / (sigma ** 3 * slope)  # d(1/sigma^2)/dD through D(sigma) = target
    return data_stderr_from_units(counts, [factor * d for d in drops], groups=groups,
                                  forward_passes=len(deltas) + 1)


def _unreachable(target: float, accuracy: float, dev: float, sigma: float, why: str,
                 advice: str = "lower the target") -> UndefinedMetricError:
    """The one-line error of a bracket that never reached an accuracy drop of ``target``."""
    return UndefinedMetricError(
        f"pac_bayes_flatness(): the accuracy {accuracy:.4f} at w never dropped by target={target} "
        f"(a drop of {dev:.4f} at sigma={sigma:.4g}, the largest sigma evaluated; {why}): the "
        "flatness is undefined where noise cannot lower the accuracy by the target, e.g. for a "
        f"model near chance accuracy; {advice}"
    )


def _find_sigma(deviation: Callable[[float], float], evaluations: Callable[[], int],
                bar_iter: Iterator, *, target: float, sigma_max: float, tolerance: float,
                max_evaluations: int, accuracy: float) -> tuple[float, float, float]:
    """``(sigma, deviation(sigma))`` with the deviation within ``tolerance`` of ``target``: the
    bracket ``[0, sigma_max]`` doubled until the deviation exceeds ``target``, then bisected
    until ``|deviation - target| <= tolerance`` or ``max_evaluations`` sigmas were tried
    (``evaluations()`` counts them, ``bar_iter`` advances a progress bar). A bracket that hits
    ``max_evaluations`` or a non-finite loss (the noise overflowed the model) before the drop
    reached ``target`` raises :func:`_unreachable` (``accuracy``: the accuracy at ``w``).
    The third number is the secant slope of the deviation over the final bracket."""
    lo, hi = 0.0, sigma_max
    dev_lo = 0.0
    dev_hi: float | None = None
    while dev_hi is None or dev_hi < target:
        if dev_hi is not None:
            if evaluations() >= max_evaluations:
                raise _unreachable(target, accuracy, dev_hi, hi,
                                   f"max_evaluations={max_evaluations} reached",
                                   "lower the target or raise sigma_max or max_evaluations")
            lo, dev_lo = hi, dev_hi
            hi = 2 * hi
        next(bar_iter, None)
        try:
            dev_new = deviation(hi)
        except FloatingPointError as err:
            if dev_hi is None:
                raise ValueError(
                    f"pac_bayes_flatness(): the loss is not finite at sigma=sigma_max={hi:.4g}, "
                    "the first sigma tried (the noise overflows the model); lower sigma_max"
                ) from err
            raise _unreachable(target, accuracy, dev_hi, lo,
                               f"the loss is not finite at sigma={hi:.4g}") from err
        dev_hi = dev_new
    sigma, dev = hi, dev_hi
    while abs(dev - target) > tolerance and evaluations() < max_evaluations:
        mid = 0.5 * (lo + hi)
        next(bar_iter, None)
        d_mid = deviation(mid)
        sigma, dev = mid, d_mid
        if d_mid > target:
            hi, dev_hi = mid, d_mid
        else:
            lo, dev_lo = mid, d_mid
    return sigma, dev, (dev_hi - dev_lo) / (hi - lo)
