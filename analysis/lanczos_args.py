"""The arguments and the start vector of :func:`analysis.lanczos.top_eigenpairs`."""

from __future__ import annotations

import math
from typing import Any

import torch

from .krylov import default_max_basis, default_max_iter, norm64
from .operators.hessian import HessianOperator


def check_arguments(op: Any, k: Any, which: Any, tol: Any, max_iter: Any, max_basis: Any,
                    look_ahead: Any) -> tuple[int, int, int]:
    """``(n, max_basis, max_iter)`` with the defaults filled in; ValueError for bad values."""
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"which must be 'LA', 'SA' or 'LM', got {which!r}")
    if not (isinstance(tol, (int, float)) and 0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    n = int(op.shape[0])
    if not isinstance(k, int) or isinstance(k, bool) or k < 1 or k > n:
        raise ValueError(f"k must be an integer in [1, n={n}], got {k!r}")
    if max_basis is None:
        max_basis = default_max_basis(n, k)
    if not isinstance(max_basis, int) or max_basis < min(n, k + 2):
        raise ValueError(f"max_basis must be an integer >= k + 2 = {k + 2} (or n), got {max_basis!r}")
    max_basis = min(max_basis, n)
    if max_iter is None:
        max_iter = default_max_iter(n, k)
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}")
    if not isinstance(look_ahead, int) or isinstance(look_ahead, bool) or look_ahead < 0:
        raise ValueError(f"look_ahead must be a non-negative integer, got {look_ahead!r}")
    return n, max_basis, max_iter


def start_vector(op: Any, v0: Any, which: str, run: Any) -> torch.Tensor:
    """The unnormalized start vector on the basis device and dtype (see ``v0``)."""
    if v0 == "auto" or v0 is None:
        hessian = isinstance(op, HessianOperator) or (  # or the sharded one (analysis.shards)
            getattr(op, "shards", None) is not None and hasattr(op, "gradient"))
        v0 = "gradient" if hessian and which == "LA" else "random"
    if isinstance(v0, str):
        if v0 not in ("random", "gradient"):
            raise ValueError(f"v0 must be 'auto', 'random', 'gradient' or a tensor, got {v0!r}")
        if v0 == "gradient" and not hasattr(op, "gradient"):
            raise ValueError("v0='gradient' needs a HessianOperator (or a model), got "
                             f"{type(op).__name__}")
        q = run.random_vector()
        if v0 == "gradient":
            g = op.gradient().to(device=run.bdev, dtype=run.dtype)
            gn = norm64(g, run.reduce)
            q.div_(norm64(q, run.reduce))
            if gn > 0 and math.isfinite(gn):
                q.add_(g, alpha=1.0 / gn)
            del g
        return q
    if not isinstance(v0, torch.Tensor) or v0.shape != (run.local_n,):
        raise ValueError(f"v0 must be a tensor of shape ({run.local_n},), got "
                         f"{tuple(v0.shape) if isinstance(v0, torch.Tensor) else type(v0).__name__}")
    return v0.detach().to(device=run.bdev, dtype=run.dtype).clone()
