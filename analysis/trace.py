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

Example:
    >>> import torch
    >>> from analysis.trace import hessian_trace
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

from .evaluation import progress_bar
from .lanczos import as_linear_operator
from .results import Result

__all__ = ["TraceResult", "hessian_trace"]


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
    """

    estimate: float
    std_error: float
    num_matvecs: int
    method: str
    samples: list
    low_rank_part: float


def _rademacher(n: int, k: int, gen: torch.Generator, device, dtype) -> torch.Tensor:
    z = torch.randint(0, 2, (k, n), generator=gen, dtype=torch.int8)
    return (z.to(dtype) * 2 - 1).to(device)


def hessian_trace(
    op: Any,
    loss_fn: Any = None,
    data: Any = None,
    *,
    num_matvecs: int = 99,
    method: str = "hutch++",
    seed: int = 0,
    progress: bool = False,
    **operator_kwargs: Any,
) -> TraceResult:
    """Estimate ``tr(H)`` from ``num_matvecs`` Hessian-vector products.

    Args:
        op: a curvature operator (e.g. :class:`~analysis.hessian.HessianOperator`), a model
            (then ``loss_fn`` and ``data`` build a Hessian operator with ``operator_kwargs``), a
            square tensor, or any object with ``shape`` and ``matvec``.
        loss_fn, data: with a model; see :mod:`analysis.data`.
        num_matvecs: the budget (default 99). Hutch++ uses ``3 * (num_matvecs // 3)``, at least
            3, and only ``2n`` when that covers the whole space (the result is then exact);
            Hutchinson at least 2 (for a standard error).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        seed: seed of the Rademacher vectors (drawn on the CPU, so devices agree).
        progress: show a tqdm bar.

    Returns:
        :class:`TraceResult` with ``estimate`` and ``std_error``.

    Raises:
        ValueError: for an unknown method or too small a budget.
    """
    if method not in ("hutch++", "hutchinson"):
        raise ValueError(f"method must be 'hutch++' or 'hutchinson', got {method!r}")
    if not isinstance(num_matvecs, int) or isinstance(num_matvecs, bool):
        raise TypeError(f"num_matvecs must be an int, got {type(num_matvecs).__name__}")
    minimum = 3 if method == "hutch++" else 2
    if num_matvecs < minimum:
        raise ValueError(f"num_matvecs must be >= {minimum} for {method}, got {num_matvecs}")
    op = as_linear_operator(op, loss_fn, data, **operator_kwargs)
    n = int(op.shape[0])
    device, dtype = op.device, op.dtype
    gen = torch.Generator().manual_seed(seed)
    start = op.num_matvecs
    bar = progress_bar(range(num_matvecs), enabled=progress, desc="trace", unit="matvec")
    it = iter(bar)

    def apply(v: torch.Tensor) -> torch.Tensor:
        next(it, None)
        return op.matvec(v)

    low = 0.0
    if method == "hutchinson":
        Z = _rademacher(n, num_matvecs, gen, device, dtype)
        samples = torch.stack([torch.dot(z, apply(z)) for z in Z]).double().cpu()
    else:
        k = min(num_matvecs // 3, n)  # more than n sketch vectors add nothing
        S = _rademacher(n, k, gen, device, dtype)
        HS = torch.stack([apply(s) for s in S], dim=1)  # (n, k)
        Q, _ = torch.linalg.qr(HS)  # (n, k), orthonormal columns
        HQ = torch.stack([apply(Q[:, i].contiguous()) for i in range(k)], dim=1)
        low = float(torch.einsum("ij,ij->", Q, HQ))
        if k >= n:  # Q spans everything: the low-rank part is the exact trace (2n matvecs)
            samples = torch.zeros(k, dtype=torch.float64)
        else:
            G = _rademacher(n, k, gen, device, dtype)
            G = G - (G @ Q) @ Q.T  # (I - QQ^T) g
            samples = torch.stack([torch.dot(g, apply(g.contiguous())) for g in G]).double().cpu()
    if hasattr(bar, "close"):
        bar.close()
    m = samples.numel()
    mean = float(samples.mean())
    se = float(samples.std(unbiased=True)) / math.sqrt(m) if m > 1 else math.inf
    return TraceResult(
        estimate=low + mean,
        std_error=se,
        num_matvecs=op.num_matvecs - start,
        method=method,
        samples=samples.tolist(),
        low_rank_part=low,
    )
