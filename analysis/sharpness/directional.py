"""Directional sharpness (MSAM paper, Fig. 4): the loss along a direction, ``L(w + r d / ||d||)
- L(w)`` for each radius ``r``; :func:`loss_along_line` is the loop every "loss along a line"
of the toolkit shares (directional sharpness, the probes' loss profiles)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checks import check_first_batch
from ..data import Data, as_data
from ..directions import as_direction
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
    full_loss,
    global_num_batches,
    global_num_samples,
    unit_losses,
)
from .state import preserved_state

#: ``loss_at(delta, where)``: the loss at ``w + delta`` (``delta=None``: at ``w``), ``where``
#: naming the point in error messages.
LossAt = Callable[[torch.Tensor | None, str], float]


def as_flat_direction(direction: Any, space: ParameterSpace, what: str = "direction") -> torch.Tensor:
    """:func:`analysis.directions.as_direction` (the name this module used to have for it)."""
    return as_direction(direction, space, what)


def loss_along_line(
    loss_at: LossAt,
    direction: torch.Tensor,
    radii: Iterable[float],
    *,
    normalize: bool = True,
    origin: float | None = None,
    what: str = "direction",
) -> tuple[float, list[float], float]:
    """The loss along the line ``w + r u``: ``L(w)`` and ``L(w + r u)`` for each ``r``.

    ``u = d / ||d||`` (``normalize=True``, default) or ``u = d``. The one loop behind
    :func:`directional_sharpness` (the whole data set) and
    :meth:`analysis.MechanismProbe.profiles` (one batch); ``loss_at`` says how a point
    is evaluated.

    Args:
        loss_at: ``loss_at(delta, where)``, the loss at ``w + delta`` (``None``: at ``w``).
        direction: the flat direction ``d`` (nonzero).
        radii: the coefficients ``r``, evaluated in order (a progress bar may be passed).
        normalize: divide ``d`` by its norm first.
        origin: ``L(w)`` when already known (then ``loss_at(None, ...)`` is not called).
        what: the direction's name in error messages.

    Returns:
        ``(L(w), [L(w + r u) for r in radii], ||d||)``.

    Raises:
        ValueError: ``d`` has zero norm.
    """
    dn = float(torch.linalg.vector_norm(direction))
    if not dn > 0:
        raise ValueError(f"the {what} has zero norm; the loss along it is undefined")
    step = direction / dn if normalize else direction
    l0 = loss_at(None, "at the unperturbed weights") if origin is None else origin
    losses = [loss_at(r * step, f"at radius {r:g} along the {what}") for r in radii]
    return l0, losses, dn


@dataclass(frozen=True, repr=False)
class DirectionalSharpnessResult(CostedResult):
    """``L(w + r d / ||d||) - L(w)`` for each radius (MSAM paper, Fig. 4).

    Attributes:
        radii: the radii ``r``; values: the loss differences; losses: ``L(w + r d / ||d||)``.
        loss: ``L(w)``; direction_norm: ``||d||`` of the direction given.
        mode, num_samples, forward_passes, backward_passes, forward_samples, backward_samples:
            the evaluation mode, the samples used and the passes spent.
        data_stderr: per radius, the data-sampling standard error of ``values`` (per-unit
            differences ``L_u(w + r d / ||d||) - L_u(w)``, :mod:`analysis.uncertainty`; ``None``
            when not asked, ``nan`` where undefined).
        data_sampling: its :class:`~analysis.uncertainty.DataStdError` (units, cost, reason).
    """

    radii: tuple[float, ...]
    values: tuple[float, ...]
    losses: tuple[float, ...]
    loss: float
    direction_norm: float
    mode: str | None
    num_samples: int
    data_stderr: tuple[float, ...] | None = None
    data_sampling: DataStdError | None = None


def directional_sharpness(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    direction: Any,
    radii: Sequence[float] | torch.Tensor | np.ndarray,
    *,
    normalize: bool = True,
    mode: str | None = "eval",
    batch_size: int | None = None,
    params: Sequence[str | nn.Parameter] | None = None,
    progress: bool = False,
    check_deterministic: bool = True,
    data_stderr: bool = True,
    min_units: int = DEFAULT_MIN_UNITS,
) -> DirectionalSharpnessResult:
    """``L(w + r d / ||d||) - L(w)`` for each radius ``r`` (MSAM paper, Fig. 4).

    ``L`` is the sample-weighted loss over all of ``data``. Negative radii go along ``-d``
    (e.g. the MSAM perturbation ``-v / ||v||`` for ``d = v`` the momentum). With
    ``normalize=False`` the radii multiply ``d`` itself: ``L(w + r d) - L(w)``, the 1-D slice
    of Goodfellow et al. (2015) along an unnormalized (e.g. filter-normalized) direction.

    Cost: ``len(radii) + 1`` forward passes over the data; the data-sampling standard error
    adds none (the passes evaluate each sampling unit apart: more, smaller forward calls when
    the batches are split into groups).

    Args:
        model, loss_fn, data: as in :func:`sharpness`.
        direction: a flat tensor over the trainable parameters (see
            :mod:`analysis.directions`), a list of per-parameter tensors or a name->tensor dict.
        radii: the distances ``r``.
        normalize: use ``d / ||d||`` (default True) or ``d``.
        mode, batch_size, params, progress: as elsewhere.
        check_deterministic: refuse a random forward (see :func:`sharpness`).
        data_stderr: also the data-sampling standard error of each value (default True).
        min_units: the fewest sampling units of that standard error (default 16).

    Returns:
        :class:`DirectionalSharpnessResult`.

    Raises:
        ValueError: a direction of the wrong shape or with zero norm, empty or non-finite radii.
    """
    check_model(model)
    check_mode(mode)
    check_flag("normalize", normalize)
    check_flag("check_deterministic", check_deterministic)
    check_stderr_args(data_stderr, min_units)
    loss_fn = resolve_loss(loss_fn)
    space = ParameterSpace(model, params)
    d = as_direction(direction, space, nonzero="directional sharpness is undefined")
    r = np.asarray(radii.detach().cpu() if isinstance(radii, torch.Tensor) else radii,
                   dtype=np.float64).reshape(-1)
    if r.size == 0 or not np.isfinite(r).all():
        raise ValueError(f"radii must be a non-empty sequence of finite numbers, got {radii!r}")
    source = as_data(data, batch_size=batch_size)
    check_first_batch(model, loss_fn, source, mode, where="directional_sharpness()",
                      deterministic=check_deterministic)
    counter = Counter()
    with preserved_state(model), model_mode(model, mode), autocast_disabled():
        ev = Evaluator(model, loss_fn, space, space.vector(), counter)
        groups = groups_per_batch(global_num_batches(source, space.device), min_units) \
            if data_stderr else 0
        units: list[list[tuple]] = []  # per point (w first, then the radii): the units' rows

        def loss_at(delta: torch.Tensor | None, where: str) -> float:
            if not data_stderr:
                return full_loss(ev, source, delta, where)
            units.append(unit_losses(ev, source, delta, groups, where))
            return sum(t * v for t, v, _, _ in units[-1]) / sum(t for t, _, _, _ in units[-1])

        bar = progress_bar(r.tolist(), enabled=progress, desc="directional sharpness")
        l0, losses, dn = loss_along_line(loss_at, d, bar, normalize=bool(normalize))
    se = None
    if data_stderr:
        diffs = [[units[j + 1][u][1] - units[0][u][1] for j in range(len(losses))]
                 for u in range(len(units[0]))]
        se = data_stderr_from_units([t for t, _, _, _ in units[0]], diffs, groups=groups)
    return DirectionalSharpnessResult(
        radii=tuple(r.tolist()),
        values=tuple(li - l0 for li in losses),
        losses=tuple(losses),
        loss=l0,
        direction_norm=dn,
        mode=mode,
        num_samples=global_num_samples(source, space.device),
        **counter.as_dict(),
        data_stderr=None if se is None else se.stderr,
        data_sampling=se,
    )
