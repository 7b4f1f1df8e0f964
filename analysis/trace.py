"""Stochastic estimates of the Hessian trace: Hutchinson and Hutch++.

Both only need products ``H v``. With Rademacher vectors ``z`` (entries +-1),
``E[z^T H z] = tr(H)``:

* Hutchinson (1989): ``tr(H) ~ (1/m) sum_i z_i^T H z_i``; standard error ``s / sqrt(m)``
  with ``s`` the sample standard deviation of the ``m`` quadratic forms.
* Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021): with ``m`` matvecs split in three equal
  parts, ``Q = orth(H S)`` for a random ``n x m/3`` sign matrix ``S``; then

      tr(H) ~ tr(Q^T H Q) + (1/l) sum_i g_i^T (I - QQ^T) H (I - QQ^T) g_i,    l = m/3,

  exact on the top of the spectrum that ``Q`` captures and Hutchinson on the rest, so the
  error falls like ``1/m`` instead of ``1/sqrt(m)`` for spectra with a few large eigenvalues
  (Hessians). Its standard error is that of the Hutchinson part (``Q`` held fixed).

Probes are drawn and applied in blocks of ``block_size`` columns (``op @ V``: one batched pass
over the data per block where the operator supports it, see
:meth:`analysis.HessianOperator.matmat`), and the quadratic forms are accumulated in
float64. Peak extra memory (outside the products' own working memory):

* Hutchinson: ``3 * block_size * n * itemsize`` (a block of probes, its products, a slab),
* Hutch++: ``(s + 4 * block_size) * n * itemsize`` with ``s = num_matvecs // 3`` the sketch:
  the sketch ``H S`` is orthonormalized in place, block by block, and ``tr(Q^T H Q)`` and the
  deflated Hutchinson part are computed a block at a time.

``TraceResult.memory_bound_bytes`` reports that bound.

Example:
    >>> import torch
    >>> from analysis import hessian_trace
    >>> A = torch.diag(torch.linspace(0, 1, 50, dtype=torch.float64))
    >>> res = hessian_trace(A, num_matvecs=60)
    >>> abs(res.estimate - 25.0) < 4 * res.std_error + 1e-9
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checks import check_seed
from .data import Data
from .evaluation import progress_bar
from .krylov import dot64
from .losses import LossSpec
from .operators import default_block_size
from .operators.adapters import as_linear_operator
from .operators.protocol import LinearOperator
from .precision import autocast_disabled
from .results import Result
from .uncertainty import (
    DEFAULT_MIN_UNITS,
    DataStdError,
    UnitForms,
    check_stderr_args,
    data_stderr_from_units,
    gather_units,
    no_data_stderr,
)

__all__ = ["sketch_size", "trace_memory_bound_bytes"]


def sketch_size(n: int, num_matvecs: int) -> int:
    """Hutch++'s sketch size ``s = min(num_matvecs // 3, n)`` (more than ``n`` sketch vectors add
    nothing)."""
    return min(num_matvecs // 3, n)


def trace_memory_bound_bytes(n: int, num_matvecs: int, method: str, block_size: int,
                             itemsize: int) -> int:
    """The bound on :func:`hessian_trace`'s peak extra memory outside the products:
    Hutchinson ``3 b n itemsize``, Hutch++ ``(s + 4 b) n itemsize`` (:func:`sketch_size`),
    with ``b`` the block size."""
    if method == "hutchinson":
        return int(3 * block_size * n * itemsize)
    return int((sketch_size(n, num_matvecs) + 4 * block_size) * n * itemsize)


@dataclass(frozen=True, repr=False)
class TraceResult(Result):
    """A stochastic trace estimate.

    Attributes:
        estimate: the trace estimate.
        std_error: its standard error (0 when the low-rank part of Hutch++ is exact, e.g. when
            ``n`` matvecs span the whole space).
        num_matvecs: matvecs used.
        method: ``"hutchinson"`` or ``"hutch++"``.
        samples: the quadratic forms ``z_i^T H z_i`` of the Hutchinson part.
        low_rank_part: ``tr(Q^T H Q)`` for Hutch++ (0 for Hutchinson).
        block_size: probes applied per block.
        memory_bound_bytes: the bound on the peak extra memory outside the products (see the
            module docstring).
        data_stderr: the data-sampling standard error of ``estimate`` (``nan`` where undefined,
            ``None`` when not asked), beside ``std_error``, the probes' error: the same
            estimator applied per sampling unit ``u`` with the same probes and ``Q``,
            ``T_u = tr(Q^T H_u Q) + (1/l) sum_i g_i^T P H_u P g_i`` (Hutchinson: ``(1/m) sum_i
            z_i^T H_u z_i``), ``estimate = sum_u (N_u / N) T_u``; :mod:`analysis.uncertainty`.
        data_sampling: its :class:`~analysis.uncertainty.DataStdError` (units, cost, reason).
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    samples: list
    low_rank_part: float
    block_size: int = 1
    memory_bound_bytes: int = 0
    data_stderr: float | None = None
    data_sampling: DataStdError | None = None


def _rademacher(n: int, k: int, gen: torch.Generator, device, dtype, shards=None) -> torch.Tensor:
    # sharded vectors (analysis.shards): this rank's columns of the same draw
    z = torch.randint(0, 2, (k, n), generator=gen, dtype=torch.int8) if shards is None \
        else shards.randint(k, gen)
    return (z.to(dtype) * 2 - 1).to(device)


def apply_block(op: Any, V: torch.Tensor) -> torch.Tensor:
    """``op @ V`` for an ``(n, b)`` block: the operator's ``matmat`` if it has one (batched
    products), else ``b`` matvecs."""
    if hasattr(op, "matmat"):
        return op.matmat(V)
    return torch.stack([op.matvec(V[:, i].contiguous()) for i in range(V.shape[1])], dim=1)


def _column_dots(A: torch.Tensor, B: torch.Tensor, shards=None) -> list[float]:
    dots = [dot64(A[:, i], B[:, i]) for i in range(A.shape[1])]
    if shards is None:
        return dots
    return shards.sum(torch.tensor(dots, dtype=torch.float64)).tolist()  # one all-reduce


def _blocks(total: int, b: int):
    for c in range(0, total, b):
        yield c, min(c + b, total)


def _hutchinson(apply, n: int, m: int, b: int, gen, device, dtype, shards=None) -> torch.Tensor:
    """The ``m`` quadratic forms ``z_i^T H z_i`` of Rademacher probes, ``b`` per block."""
    vals: list[float] = []
    for c0, c1 in _blocks(m, b):
        Z = _rademacher(n, c1 - c0, gen, device, dtype, shards).T
        vals += _column_dots(Z, apply(Z), shards)
        del Z
    return torch.tensor(vals, dtype=torch.float64)


def _orthonormalize(Y: torch.Tensor, b: int, gen, shards=None) -> None:
    """``Y <- orth(Y)`` in place, block by block: (project out the previous columns, thin QR)
    twice; the second round acts on unit columns, so a block that is numerically in the span of
    the previous ones (a rank-deficient H) still comes out orthogonal to them. Sharded rows
    (``shards``, :mod:`analysis.shards`): projections and norms summed over the ranks, TSQR."""
    k = Y.shape[1]
    n = Y.shape[0] if shards is None else shards.global_numel
    total = (lambda t: t) if shards is None else shards.sum
    for c0, c1 in _blocks(k, b):
        Yb = Y[:, c0:c1]
        before = _column_norms(Yb, shards)
        for _ in range(2):
            if c0:
                P = Y[:, :c0]
                Yb -= P @ total(P.T @ Yb)
        # columns (numerically) in the span of the previous ones carry nothing new: any
        # unit direction orthogonal to them keeps the estimator unbiased, so take a random one
        lost = _column_norms(Yb, shards) <= 1e3 * torch.finfo(Y.dtype).eps * before
        lost |= before == 0
        if bool(lost.any()):
            R = _rademacher(n, int(lost.sum()), gen, Y.device, Y.dtype, shards).T
            Yb[:, lost] = R
        for _ in range(2):
            if c0:
                P = Y[:, :c0]
                Yb -= P @ total(P.T @ Yb)
            Yb.copy_(_orthonormal(Yb) if shards is None else shards.orthonormal(Yb))


def _column_norms(Y: torch.Tensor, shards=None) -> torch.Tensor:
    """The norms of the columns of ``Y`` (of the global columns for sharded rows)."""
    if shards is None:
        return torch.linalg.vector_norm(Y, dim=0)
    return shards.norms(Y).to(device=Y.device, dtype=Y.dtype)


def _orthonormal(Y: torch.Tensor) -> torch.Tensor:
    """The Q factor of ``Y``; half precision is factored in float32 (no half QR on the CPU)."""
    if Y.dtype in (torch.float16, torch.bfloat16):
        return torch.linalg.qr(Y.float())[0].to(Y.dtype)
    return torch.linalg.qr(Y)[0]


def _hutchpp(apply, n: int, k: int, b: int, gen, device, dtype, apply_low=None,
             apply_rest=None, shards=None) -> tuple[float, torch.Tensor]:
    """Hutch++ with a sketch of ``k`` columns: ``tr(Q^T H Q)`` and the deflated quadratic forms
    (``apply_low`` / ``apply_rest``, default ``apply``, take the products of those two parts)."""
    apply_low, apply_rest = apply_low or apply, apply_rest or apply
    Y = torch.empty(n if shards is None else shards.local_numel, k, device=device, dtype=dtype)
    for c0, c1 in _blocks(k, b):
        Y[:, c0:c1] = apply(_rademacher(n, c1 - c0, gen, device, dtype, shards).T)
    _orthonormalize(Y, b, gen, shards)
    Q = Y
    low = 0.0
    for c0, c1 in _blocks(k, b):
        Qb = Q[:, c0:c1].contiguous()
        low += sum(_column_dots(Qb, apply_low(Qb), shards))
    if k >= n:  # Q spans everything: the low-rank part is the exact trace (2n matvecs)
        return low, torch.zeros(k, dtype=torch.float64)
    vals = []
    for c0, c1 in _blocks(k, b):
        G = _rademacher(n, c1 - c0, gen, device, dtype, shards).T.contiguous()
        QtG = Q.T @ G
        G -= Q @ (QtG if shards is None else shards.sum(QtG))  # (I - QQ^T) g
        vals += _column_dots(G, apply_rest(G), shards)
        del G
    return low, torch.tensor(vals, dtype=torch.float64)


@autocast_disabled()
def hessian_trace(
    op: LinearOperator | nn.Module | torch.Tensor,
    loss_fn: LossSpec = None,
    data: Data = None,
    *,
    num_matvecs: int = 99,
    method: str = "hutch++",
    seed: int = 0,
    block_size: int | None = None,
    progress: bool = False,
    data_stderr: bool | None = None,
    min_units: int = DEFAULT_MIN_UNITS,
    **operator_kwargs: Any,
) -> TraceResult:
    """Estimate ``tr(H)`` from ``num_matvecs`` Hessian-vector products.

    Args:
        op: a curvature operator (e.g. :class:`~analysis.HessianOperator`), a model
            (then ``loss_fn`` and ``data`` build a Hessian operator with ``operator_kwargs``), a
            square tensor, or any object with ``shape`` and ``matvec``.
        loss_fn, data: with a model; see :mod:`analysis.data`.
        num_matvecs: the budget (default 99). Hutch++ uses ``3 * (num_matvecs // 3)``, at least
            3, and only ``2n`` when that covers the whole space (the result is then exact);
            Hutchinson at least 2 (for a standard error).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed: seed of the Rademacher vectors (drawn on the CPU, so devices agree).
        block_size: probes per batched product (default
            :func:`~analysis.operators.default_block_size`, memory-aware: at most 16 and about
            256 MiB of probes). Memory: see the module docstring.
        progress: show a tqdm bar.
        data_stderr: also the data-sampling standard error. No extra product: the products of
            the quadratic forms are taken per sampling unit (:class:`analysis.uncertainty.
            UnitForms`; the sketch ``H S`` stays batched). ``None`` (default): when the data has
            ``min_units`` batches or more (the units are the batches, each product as before);
            not when the batches would be split into groups, where those products run per group
            (measured 1.6-2.9x the time of the estimate, ``benchmarks/data_stderr.py``): ``nan``
            then, with the reason. ``True``: always; ``False``: never. ``nan`` with the reason
            for an operator without data (a tensor).
        min_units: the fewest sampling units of that standard error (default 16).

    Returns:
        :class:`TraceResult` with ``estimate`` and ``std_error``.

    Raises:
        ValueError: for an unknown method, too small a budget or a bad ``block_size``.
    """
    seed = check_seed(seed, "hessian_trace()")
    if method not in ("hutch++", "hutchinson"):
        hint = (" (a product method: pass HessianOperator(model, loss_fn, data, method=...) "
                "as op)" if method in ("auto", "forward-over-reverse", "double-backward",
                                       "cached-graph") else "")
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}{hint}")
    if not isinstance(num_matvecs, int) or isinstance(num_matvecs, bool):
        raise TypeError(f"num_matvecs must be an int, got {type(num_matvecs).__name__}")
    minimum = 3 if method == "hutch++" else 2
    if num_matvecs < minimum:
        raise ValueError(f"num_matvecs must be >= {minimum} for {method}, got {num_matvecs}")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    check_stderr_args(bool(data_stderr) if data_stderr is None else data_stderr, min_units)
    op = as_linear_operator(op, loss_fn, data, **operator_kwargs)
    n = int(op.shape[0])
    shards = getattr(op, "shards", None)  # sharded vectors: this rank's shards (analysis.shards)
    n_local = n if shards is None else shards.local_numel
    device, dtype = op.device, op.dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    b = block_size or default_block_size(n, itemsize)
    gen = torch.Generator().manual_seed(seed)
    start = op.num_matvecs
    bar = progress_bar(range(num_matvecs), enabled=progress, desc="trace", unit="matvec")
    it = iter(bar)

    def apply(V: torch.Tensor) -> torch.Tensor:
        for _ in range(V.shape[1]):
            next(it, None)
        return apply_block(op, V)

    units = [UnitForms(op, min_units) for _ in range(2)] if (
        data_stderr is not False and hasattr(op, "unit_products")) else None
    skipped = None
    if data_stderr is None and units and units[0].groups > 1:  # auto: not when it would split
        skipped, units = units[0].groups, None

    def counted(f):  # a unit-wise product, advancing the bar as ``apply`` does
        def g(V: torch.Tensor) -> torch.Tensor:
            for _ in range(V.shape[1]):
                next(it, None)
            return f(V)
        return None if f is None else g

    low_apply, rest_apply = (units[0], units[1]) if units else (None, None)
    if method == "hutchinson":
        low = 0.0
        samples = _hutchinson(counted(rest_apply) or apply, n, num_matvecs, b, gen, device, dtype,
                              shards)
    else:
        low, samples = _hutchpp(apply, n, sketch_size(n, num_matvecs), b, gen, device, dtype,
                                counted(low_apply), counted(rest_apply), shards)
    bound = trace_memory_bound_bytes(n_local, num_matvecs, method, b, itemsize)
    if hasattr(bar, "close"):
        bar.close()
    m = samples.numel()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.inf
    data = None
    if skipped:
        data = DataStdError(stderr=(math.nan,), units=0, unit="none", groups_per_batch=skipped,
                            reason=f"not computed by default: the data has fewer than "
                                   f"{min_units} batches, each would be split into {skipped} "
                                   "groups and the products taken per group (slower); pass "
                                   "data_stderr=True")
    elif data_stderr is not False:
        data = _unit_traces(op, units) if units else no_data_stderr(1, f"a {type(op).__name__}")
    return TraceResult(
        estimate=low + mean,
        std_error=se,
        num_matvecs=op.num_matvecs - start,
        method=method,
        samples=samples.tolist(),
        low_rank_part=low,
        block_size=b,
        memory_bound_bytes=int(bound),
        data_stderr=None if data is None else data.stderr[0],
        data_sampling=data,
    )


def _unit_traces(op: Any, units: list[UnitForms]) -> DataStdError:
    """The data SE from the per-unit traces ``T_u`` (low-rank part: the sum of the recorded
    forms of ``Q``; Hutchinson part: the mean of the recorded forms of the probes)."""
    low, rest = units
    terms = rest.terms if rest.terms is not None else low.terms
    values = torch.zeros(len(terms), dtype=torch.float64)
    if low.forms:
        values += low.unit_values().sum(1)
    if rest.forms:
        values += rest.unit_values().mean(1)
    terms, values = gather_units(terms, values.tolist(), op.source.shard)
    return data_stderr_from_units(terms, values, groups=low.groups)
