"""Spectral density of the Hessian by stochastic Lanczos quadrature (SLQ).

For a unit random vector ``v`` and the Lanczos tridiagonal ``T_m = S diag(theta) S^T`` of ``H``
started at ``v``, the Gauss quadrature rule with nodes ``theta_j`` and weights
``tau_j = S[0, j]^2`` (which sum to 1) approximates the spectral measure of ``H`` seen from
``v``, ``sum_i (v^T u_i)^2 delta(t - lambda_i)``, whose expectation over ``v`` is the eigenvalue
density ``(1/n) sum_i delta(t - lambda_i)``. Averaging ``num_runs`` rules and smoothing each node
with a Gaussian of width ``sigma`` gives

    phi(t) = (1 / num_runs) sum_runs sum_j tau_j N(t; theta_j, sigma^2),

which integrates to 1 (Lin, Saad & Yang, SIAM Review 2016; Ghorbani, Krishnan & Xiao, ICML
2019; PyHessian, Yao et al. 2020).

Example:
    >>> import torch
    >>> from analysis import spectral_density
    >>> A = torch.diag(torch.cat([torch.zeros(90), torch.full((10,), 5.0)]).double())
    >>> d = spectral_density(A, num_iter=20, num_runs=4)
    >>> abs(d.integral() - 1) < 1e-3
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .checks import check_seed
from .data import Data
from .evaluation import progress_bar
from .krylov import lanczos_tridiagonals
from .losses import LossSpec
from .operators.adapters import as_linear_operator
from .operators.protocol import LinearOperator
from .precision import autocast_disabled
from .results import Result


@dataclass(frozen=True, repr=False)
class SpectralDensity(Result):
    """A smoothed eigenvalue density from stochastic Lanczos quadrature.

    Attributes:
        grid: ``(g,)`` numpy array of eigenvalue positions ``t``.
        density: ``(g,)`` numpy array, ``phi(t)`` on the grid (integrates to 1 over the real
            line; on the default grid up to the tails beyond 5 sigma).
        nodes: ``(num_runs, m)`` numpy array of Ritz values per run (padded with the run's last
            node and weight 0 when a run ended early).
        weights: ``(num_runs, m)`` numpy array of quadrature weights, each row summing to 1.
        sigma: the Gaussian kernel width.
        num_matvecs: matvecs used.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    sigma: float
    num_matvecs: int

    def integral(self) -> float:
        """Trapezoid integral of :attr:`density` over :attr:`grid` (about 1)."""
        return float(np.trapezoid(self.density, self.grid)) if hasattr(np, "trapezoid") else \
            float(np.trapz(self.density, self.grid))  # numpy < 2

    def evaluate(self, t: Any) -> np.ndarray:
        """``phi(t)`` at arbitrary points (the same kernel sum as :attr:`density`)."""
        return _smooth(np.asarray(t, dtype=np.float64), self.nodes, self.weights, self.sigma)


def _smooth(t: np.ndarray, nodes: np.ndarray, weights: np.ndarray, sigma: float) -> np.ndarray:
    t = np.atleast_1d(t)
    z = (t[:, None] - nodes.reshape(-1)[None, :]) / sigma
    k = np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))
    return (k @ weights.reshape(-1)) / nodes.shape[0]


@autocast_disabled()
def spectral_density(
    op: LinearOperator | nn.Module | torch.Tensor,
    loss_fn: LossSpec = None,
    data: Data = None,
    *,
    num_iter: int = 80,
    num_runs: int = 10,
    grid: Any = None,
    sigma: float | None = None,
    num_points: int = 1000,
    seed: int = 0,
    block_size: int | None = None,
    progress: bool = False,
    basis_dtype: torch.dtype | None = None,
    **operator_kwargs: Any,
) -> SpectralDensity:
    """Eigenvalue density of the Hessian by stochastic Lanczos quadrature.

    Args:
        op: a curvature operator, a model (then ``loss_fn`` and ``data`` build a
            :class:`~analysis.HessianOperator` with ``operator_kwargs``), a square
            tensor, or any object with ``shape`` and ``matvec``.
        loss_fn, data: with a model.
        num_iter: Lanczos steps per run (default 80; at most ``n``). Memory ``num_iter * n``.
        num_runs: independent random start vectors (default 10); cost ``num_iter * num_runs``
            matvecs.
        grid: points where the density is evaluated (default ``num_points`` points spanning
            ``[min node - 5 sigma, max node + 5 sigma]``).
        sigma: Gaussian kernel width (default 1% of the spread of the nodes, or 1e-3 when
            every node coincides).
        num_points: size of the default grid.
        seed: seed of the start vectors (Rademacher, drawn on the CPU).
        block_size: runs advanced in lockstep, their products batched (``op @ V``, one pass
            over the data per step); default 1. Memory: ``block_size`` bases of ``num_iter``
            vectors (``num_iter * n`` numbers per run; a run's basis grows as it goes and is
            freed when it ends), never the whole ``num_iter * num_runs`` budget. Measured peak
            (tests/analysis/test_memory.py): at most ``(num_iter + 5) * n`` numbers per run
            (basis, start vector, product and two temporaries) plus one product's working memory.
        progress: show a tqdm bar over the blocks of runs.
        basis_dtype: the dtype the bases are stored in (default ``None``: the operator's);
            ``torch.bfloat16`` / ``torch.float16`` (``torch.float32`` under float64) keep
            ``num_iter * n`` narrow numbers per run plus two working-dtype vectors
            (:func:`~analysis.krylov.lanczos_tridiagonals`); measured against the default in
            ``docs/guides/llm.md``.

    Returns:
        :class:`SpectralDensity` with ``grid``, ``density``, ``nodes`` and ``weights``.
    """
    seed = check_seed(seed, "spectral_density()")
    if block_size is not None and (not isinstance(block_size, int) or isinstance(block_size, bool)
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    for name, val in (("num_iter", num_iter), ("num_runs", num_runs), ("num_points", num_points)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{name} must be a positive integer, got {val!r}")
    if sigma is not None and not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be positive and finite, got {sigma!r}")
    op = as_linear_operator(op, loss_fn, data, **operator_kwargs)
    n = int(op.shape[0])
    m = min(num_iter, n)
    shards = getattr(op, "shards", None)  # sharded vectors (analysis.shards)
    gen = torch.Generator().manual_seed(seed)
    start = op.num_matvecs
    nodes = np.zeros((num_runs, m))
    weights = np.zeros((num_runs, m))
    b = min(block_size or 1, num_runs)
    for r0 in progress_bar(range(0, num_runs, b), enabled=progress, desc="slq", unit="block"):
        runs = range(r0, min(r0 + b, num_runs))
        V = torch.stack([(torch.randint(0, 2, (n,), generator=gen) if shards is None
                          else shards.randint(1, gen)[0]).to(torch.float64) * 2 - 1
                         for _ in runs], 1)  # sharded: this rank's slice of the same vector
        for r, T in zip(runs, lanczos_tridiagonals(op, V, m, basis_dtype)):
            theta, S = torch.linalg.eigh(T)
            tau = S[0, :] ** 2
            tau = tau / tau.sum()
            j = theta.numel()
            nodes[r, :j] = theta.numpy()
            nodes[r, j:] = theta[-1].item()
            weights[r, :j] = tau.numpy()
        del V
    spread = float(nodes.max() - nodes.min())
    if sigma is None:
        sigma = 0.01 * spread if spread > 0 else 1e-3
    if grid is None:
        grid = np.linspace(nodes.min() - 5 * sigma, nodes.max() + 5 * sigma, num_points)
    else:
        grid = np.asarray(grid.detach().cpu() if isinstance(grid, torch.Tensor) else grid,
                          dtype=np.float64).reshape(-1)
        if grid.size < 2 or not np.all(np.diff(grid) > 0):
            raise ValueError("grid must be an increasing sequence of at least 2 points")
    density = _smooth(grid, nodes, weights, sigma)
    return SpectralDensity(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        sigma=float(sigma),
        num_matvecs=op.num_matvecs - start,
    )
