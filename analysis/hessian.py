"""Curvature as linear operators: Hessian- and Gauss-Newton-vector products over the dataset loss.

The old import path of :mod:`analysis.operators` (where the code lives, one concept per module):
:class:`HessianOperator` computes ``H v`` over the model's trainable parameters by
forward-over-reverse differentiation, double backward or a cached first-order graph
(``method="auto"``, the default, times them and keeps the fastest); :class:`GGNOperator` computes
the generalized Gauss-Newton product ``G v = J^T H_out J v``. The dataset loss is the exactly
weighted mean of batch-mean losses, ``L(w) = sum_b (n_b / N) L_b(w)``, so
``H v = sum_b (n_b / N) H_b v`` (:class:`~analysis.operators.EmpiricalRisk`).

Both are square linear operators of the :class:`~analysis.operators.LinearOperator` protocol:
``op @ v``, ``op.matvec(v)``, ``op @ V`` for an ``(n, k)`` matrix of columns, ``op.to_scipy()``
for ``scipy.sparse.linalg``. They refuse nondeterministic setups (active dropout, train-mode
BatchNorm, a shuffling DataLoader) unless ``check_deterministic=False``, because Lanczos and the
trace estimators need the *same* matrix at every product.

Example:
    >>> import torch
    >>> from analysis.hessian import HessianOperator, directional_curvature
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> H = HessianOperator(model, "cross_entropy", (x, y))
    >>> v = torch.randn(H.shape[0])
    >>> Hv = H @ v
    >>> c = directional_curvature(H, v)      # v^T H v / ||v||^2 (paper A.4)
"""

from .operators.curvature import (  # noqa: F401  (BLOCK_BYTES: imported by tests)
    BLOCK_BYTES,
    CurvatureOperator,
    GGNOperator,
    default_block_size,
    directional_curvature,
)
from .operators.empirical_risk import (  # noqa: F401  (private names: imported by analysis.reference)
    _BATCHNORM,
    _DROPOUT,
    _call,
    _first_tensor,
    check_deterministic_setup,
)
from .operators.hessian import HessianOperator

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "directional_curvature",
    "check_deterministic_setup",
    "default_block_size",
]
