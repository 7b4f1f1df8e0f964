"""Data-sampling standard errors: how far a number computed on ``N`` samples would move on
another draw of ``N`` samples.

Every dataset quantity of the toolkit is a weighted mean over the data (:mod:`analysis.data`),

    L(w) = sum_u (N_u / N) L_u(w),        H = sum_u (N_u / N) H_u,

for any partition of the samples into **sampling units** ``u`` with ``N_u`` loss terms each
(samples, or the counted tokens of a language-model loss). An estimate ``theta`` that is a smooth
function of the data is, to first order, the weighted mean of per-unit values ``x_u`` at the
found solution (its influence function evaluated per unit):

* an eigenvalue (Rayleigh quotient of its converged eigenvector ``v``, first-order perturbation
  theory, ``d lambda = v^T dH v``): ``x_u = v^T H_u v``;
* the trace (linear in ``H``): ``x_u`` the same stochastic estimator applied to ``H_u`` with the
  same probes;
* a loss difference at a found perturbation ``delta*`` (the maximum of a max over ``delta`` moves
  like the objective at the maximizer, Danskin's theorem): ``x_u = L_u(w + delta*) - L_u(w)``.

The standard error is that of a ratio (weighted) mean over ``U`` units (cluster sampling,
Cochran 1977, Sec. 6.9 and 9A; the unequal-weight form of ``s / sqrt(U)``)::

    xbar = sum_u N_u x_u / N,     SE^2 = U / (U - 1) * sum_u (N_u / N)^2 (x_u - xbar)^2,

the usual ``s / sqrt(U)`` when every unit has the same ``N_u``. The sampling unit of the data
model is the **sample** (samples assumed exchangeable draws from one distribution); samples are
grouped into units because per-unit products cost one pass over the data however the samples
are grouped. The units are the data's batches when there are at least ``min_units`` of them
(default :data:`DEFAULT_MIN_UNITS`, 16); otherwise every batch is split into ``g = ceil(min_units
/ B)`` contiguous groups of near-equal size (``torch.tensor_split``: the first ``n mod g`` one
sample larger; at most one group per sample), so a single batch still gives ``min(16, N)``
units. Splitting assumes the batch loss is the term-weighted mean of per-sample losses (true for
the built-in losses; a loss that couples samples, e.g. contrastive, is not split correctly).
Fewer than 2 units (one sample) leave the SE undefined (``nan``, with the reason).

Costs (each estimate's docstring has the details; ``data_stderr=False`` turns an SE off):
eigenvalues ``k`` products in one pass; the trace none (its quadratic forms' products are taken
per unit; by default only when the units are the batches, since a split runs them per group);
directional sharpness none; epsilon-sharpness two forward passes; PAC-Bayes ``draws + 1``; the
m-sharpness metrics none (their batches of ``m`` are the units, ``SharpnessResult.stderr``).
``benchmarks/data_stderr.py`` measures the time.

With ``U`` units the SE has about ``U - 1`` degrees of freedom: ``value +- 2 SE`` covers the
full-population value with probability about ``P(|t_{U-1}| < 2)``, 0.94 for 16 units. Units that
are not exchangeable (data sorted by class, batches from different sources) inflate the SE, which
stays conservative. Being first order, the SE misses the bias of a nonlinear estimate: the top
eigenvalue of a sample Hessian overestimates the population one when the gap to the next
eigenvalue is comparable to the SE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from . import distributed as dist
from .krylov import dot64
from .results import Result

__all__ = ["DEFAULT_MIN_UNITS", "DataStdError", "weighted_mean_stderr", "groups_per_batch",
           "split_samples", "gather_units", "data_stderr_from_units", "eigenvalue_data_stderr",
           "check_stderr_args", "UnitForms", "no_data_stderr", "headline_stderr",
           "with_eigen_stderr"]

#: The fewest sampling units a standard error is computed from (batches split into groups below).
DEFAULT_MIN_UNITS = 16


@dataclass(frozen=True, repr=False)
class DataStdError(Result):
    """The data-sampling standard error of one or more estimates (see the module docstring).

    Attributes:
        stderr: one standard error per estimate (``nan`` where undefined).
        units: the number of sampling units ``U``.
        unit: ``"batch"`` (the data's batches) or ``"group"`` (contiguous groups of samples, each
            batch split into ``groups_per_batch``).
        groups_per_batch: ``g``, 1 when the units are the batches.
        matvecs: curvature products spent on the SE beyond the estimate's own.
        forward_passes: passes over the data (forward only) spent on the SE beyond the estimate's.
        reason: why the SE is undefined (``None`` when it is defined).
        unit_terms: ``N_u`` of each unit.
        unit_values: the per-unit values ``x_u``, one tuple per unit (one entry per estimate).
    """

    stderr: tuple[float, ...]
    units: int
    unit: str
    groups_per_batch: int
    matvecs: int = 0
    forward_passes: int = 0
    reason: str | None = None
    unit_terms: tuple[int, ...] = ()
    unit_values: tuple[tuple[float, ...], ...] = ()


def weighted_mean_stderr(values: Any, weights: Sequence[float]) -> torch.Tensor:
    """``SE^2 = U / (U - 1) * sum_u (w_u / W)^2 (x_u - xbar)^2``, ``xbar = sum_u w_u x_u / W``.

    Args:
        values: ``(U,)`` or ``(U, k)`` per-unit values ``x_u`` (one column per estimate).
        weights: ``(U,)`` nonnegative weights ``w_u`` (the units' loss terms), ``W`` their sum.

    Returns:
        ``(k,)`` float64 tensor (a 0-d tensor for ``(U,)`` values); ``nan`` for ``U < 2``.

    Raises:
        ValueError: for values and weights of different lengths, or weights that are negative,
            not finite or sum to zero.
    """
    x = torch.as_tensor(values, dtype=torch.float64)
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if x.shape[0] != w.numel():
        raise ValueError(f"{x.shape[0]} values but {w.numel()} weights")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"weights must be finite, >= 0 and not all zero, got {w.tolist()}")
    col = x.dim() == 1
    x = x.reshape(x.shape[0], -1)
    u = x.shape[0]
    if u < 2:
        out = torch.full((x.shape[1],), math.nan, dtype=torch.float64)
        return out[0] if col else out
    p = (w / w.sum())[:, None]
    mean = (p * x).sum(0)
    var = u / (u - 1) * (p * p * (x - mean) ** 2).sum(0)
    out = var.clamp_min(0.0).sqrt()
    return out[0] if col else out


def groups_per_batch(num_batches: int, min_units: int = DEFAULT_MIN_UNITS) -> int:
    """``g = ceil(min_units / B)``: 1 when the ``B`` batches are units enough.

    Raises:
        ValueError: for ``min_units`` that is not an integer >= 2.
    """
    if isinstance(min_units, bool) or not isinstance(min_units, int) or min_units < 2:
        raise ValueError(f"min_units must be an integer >= 2, got {min_units!r}")
    return max(1, math.ceil(min_units / max(1, int(num_batches))))


def check_stderr_args(data_stderr: Any, min_units: Any) -> None:
    """TypeError / ValueError for a ``data_stderr`` flag that is not a bool or a ``min_units``
    that is not an integer >= 2 (made before any computation)."""
    if not isinstance(data_stderr, bool):
        raise TypeError(f"data_stderr must be True or False, got {data_stderr!r}")
    groups_per_batch(1, min_units)


def _slice(obj: Any, start: int, stop: int) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj[start:stop]
    if isinstance(obj, Mapping):
        return {k: _slice(v, start, stop) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(_slice(v, start, stop) for v in obj)
    return obj


def split_samples(inputs: Any, targets: Any, samples: int, groups: int) -> list[tuple[Any, Any, int]]:
    """``[(inputs_g, targets_g, samples_g)]``: one batch split into ``min(groups, samples)``
    contiguous groups of near-equal size (``torch.tensor_split``: the first ``samples mod g``
    one sample larger). A batch that is its own target (a dict batch) stays so per group."""
    g = max(1, min(int(groups), int(samples)))
    if g == 1:
        return [(inputs, targets, int(samples))]
    base, extra = divmod(int(samples), g)
    out, start = [], 0
    for i in range(g):
        stop = start + base + (1 if i < extra else 0)
        xi = _slice(inputs, start, stop)
        out.append((xi, xi if targets is inputs else _slice(targets, start, stop), stop - start))
        start = stop
    return out


def gather_units(terms: list[int], values: list[Any], shard: bool) -> tuple[list[int], list[Any]]:
    """Every rank's units, in rank order, when the data is sharded (the lists as given
    otherwise)."""
    if not shard:
        return terms, values
    parts = dist.all_gather_object((list(terms), list(values)))
    return [t for p in parts for t in p[0]], [v for p in parts for v in p[1]]


def data_stderr_from_units(terms: Sequence[int], values: Any, *, groups: int,
                           matvecs: int = 0, forward_passes: int = 0) -> DataStdError:
    """The :class:`DataStdError` of per-unit values ``values`` (``(U,)`` or ``(U, k)``) with
    loss terms ``terms``; undefined (``nan``, with the reason) for fewer than two units."""
    x = torch.as_tensor(values, dtype=torch.float64)
    x = x.reshape(x.shape[0], -1) if x.numel() else x.reshape(0, 1)
    kept = [i for i, t in enumerate(terms) if t > 0]  # units without loss terms weigh nothing
    x, t = x[kept], [int(terms[i]) for i in kept]
    reason = None
    bad = [i for i, row in enumerate(x.tolist()) if not all(math.isfinite(v) for v in row)]
    if len(t) < 2:
        se = [math.nan] * x.shape[1]
        reason = (f"{len(t)} sampling unit{'s' * (len(t) != 1)} with loss terms: a standard error "
                  "needs at least 2 (a single sample cannot be split)")
    elif bad:
        se = [math.nan] * x.shape[1]
        reason = (f"the value of {len(bad)} of the {len(t)} sampling units is not finite (the "
                  f"first: unit {bad[0]}), so the spread over units is undefined")
    else:
        se = weighted_mean_stderr(x, t).tolist()
    return DataStdError(
        stderr=tuple(float(s) for s in se), units=len(t), unit="group" if groups > 1 else "batch",
        groups_per_batch=int(groups), matvecs=int(matvecs), forward_passes=int(forward_passes),
        reason=reason, unit_terms=tuple(t), unit_values=tuple(tuple(r) for r in x.tolist()))


def headline_stderr(result: Any) -> float | None:
    """The data-sampling standard error of a result's headline number: ``data_stderr`` (its
    first entry for eigenvalues and directional values) or, for m-sharpness, ``stderr`` (over
    its batches of ``m``); ``None`` when the result has none."""
    se = getattr(result, "data_stderr", None)
    if se is None:
        se = getattr(result, "stderr", None)
    if isinstance(se, torch.Tensor):
        se = se.reshape(-1)[0] if se.numel() else None
    elif isinstance(se, (tuple, list)):
        se = se[0] if se else None
    return None if se is None else float(se)


def no_data_stderr(k: int, what: str) -> DataStdError:
    """``k`` undefined standard errors of an operator without data (``what`` names it)."""
    return DataStdError(stderr=(math.nan,) * k, units=0, unit="none", groups_per_batch=0,
                        reason=f"the operator is {what}, not a curvature operator of a dataset "
                               "loss: there are no data to resample")


def eigenvalue_data_stderr(op: Any, eigenvectors: torch.Tensor, *,
                           min_units: int = DEFAULT_MIN_UNITS) -> DataStdError:
    """The data-sampling SE of eigenvalues from the per-unit Rayleigh quotients of their
    eigenvectors, ``x_{u,i} = v_i^T H_u v_i`` (``sum_u (N_u / N) x_{u,i} = v_i^T H v_i``, the
    Ritz value up to ``r_i^2``); see the module docstring for the units and the formula.

    Cost: ``k`` products in one pass over the data (``k`` the number of eigenvectors).

    Args:
        op: a curvature operator (:class:`~analysis.operators.curvature.CurvatureOperator`); for
            any other operator the SE is undefined (``nan``, with the reason).
        eigenvectors: ``(k, n)`` rows of unit norm.
        min_units: the fewest sampling units (default 16).
    """
    k = int(eigenvectors.shape[0])
    check_stderr_args(True, min_units)
    if not hasattr(op, "unit_products"):
        return no_data_stderr(k, f"a {type(op).__name__}")
    groups = groups_per_batch(op.num_batches(), min_units)
    V = eigenvectors.to(device=op.device, dtype=op.dtype).T.contiguous()

    def forms(terms: int, HV: torch.Tensor) -> list[float]:
        return [dot64(V[:, i], HV[:, i]) for i in range(k)]

    rows = op.unit_products(V, lambda t, HV: (t, forms(t, HV)), groups=groups)
    terms, values = gather_units([r[0] for r in rows], [r[1] for r in rows], op.source.shard)
    return data_stderr_from_units(terms, values, groups=groups, matvecs=k)


def with_eigen_stderr(result: Any, op: Any, data_stderr: bool = True,
                      min_units: int = DEFAULT_MIN_UNITS) -> Any:
    """An :class:`~analysis.lanczos.EigenResult` with its ``data_stderr`` (``(k,)`` float64,
    ``nan`` where undefined) and ``data_sampling`` filled in by
    :func:`eigenvalue_data_stderr` and the ``k`` products counted in ``num_matvecs``; the result
    as it is when ``data_stderr`` is False (what :func:`analysis.lanczos.top_eigenpairs` returns).
    """
    if not data_stderr:
        return result
    se = eigenvalue_data_stderr(op, result.eigenvectors, min_units=min_units)
    return replace(result, data_stderr=torch.tensor(se.stderr, dtype=torch.float64),
                   data_sampling=se, num_matvecs=result.num_matvecs + se.matvecs)


class UnitForms:
    """``C V`` computed unit by unit (:meth:`CurvatureOperator.unit_products`), recording every
    unit's quadratic forms ``V[:, i]^T C_u V[:, i]``: a stochastic estimator's products split by
    sampling unit at no extra product (used by :func:`analysis.trace.hessian_trace`).

    Call it like ``op @ V``; :meth:`unit_values` then gives each unit's quadratic forms of all
    the calls so far, ``(U, columns)``. The products of a unit loop over the columns (no batched
    ``vmap``), and batches split into groups do not reuse cached graphs, so a call can take
    longer than ``op.matmat(V)``; a product that is not finite is recomputed by ``op.matmat``,
    which names the batch.
    """

    def __init__(self, op: Any, min_units: int = DEFAULT_MIN_UNITS):
        check_stderr_args(True, min_units)
        self.op = op
        self.groups = groups_per_batch(op.num_batches(), min_units)
        self.terms: list[int] | None = None
        self.forms: list[torch.Tensor] = []

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        op = self.op
        acc = torch.zeros(V.shape, device=op.device, dtype=op.dtype)

        def reduce(terms: int, HV: torch.Tensor) -> tuple[int, list[float]]:
            acc.add_(HV, alpha=float(terms))
            return terms, [dot64(V[:, i], HV[:, i]) for i in range(V.shape[1])]

        rows = op.unit_products(V, reduce, groups=self.groups)
        total = torch.tensor([float(sum(r[0] for r in rows))], dtype=torch.float64, device=op.device)
        if op.source.shard:
            dist.all_reduce_sum(acc)
            dist.all_reduce_sum(total)
        out = acc.div_(float(total))
        if not bool(torch.isfinite(out).all()):
            return op.matmat(V)  # raises, naming the first batch whose product is not finite
        self.terms = [r[0] for r in rows]
        self.forms.append(torch.tensor([r[1] for r in rows], dtype=torch.float64)
                          .reshape(len(rows), V.shape[1]))
        return out

    def unit_values(self) -> torch.Tensor:
        """``(U, columns)`` float64: every recorded column's quadratic form per local unit."""
        if not self.forms:
            return torch.zeros(len(self.terms or ()), 0, dtype=torch.float64)
        return torch.cat(self.forms, 1)
