"""Curvature as linear operators: the protocol, the empirical risk, the Hessian and the GGN.

Layout (one concept per module, in the spirit of curvlinops' ``_torch_base.py`` /
``_empirical_risk.py`` split):

* :mod:`~analysis.operators.protocol`: :class:`LinearOperator`, the structural type every
  algorithm takes (``shape``, ``dtype``, ``device``, ``num_matvecs``, ``matvec``, ``matmat``,
  ``@``, ``to_scipy``), and :class:`TorchOperator`, its implementation over one ``_apply``;
* :mod:`~analysis.operators.empirical_risk`: :class:`EmpiricalRisk`, the dataset loss
  ``sum_b (n_b / N) L_b``: data caching, weighting by loss terms, all-reduce, mode, the
  determinism and finiteness checks;
* :mod:`~analysis.operators.curvature`: :class:`CurvatureOperator` (the two joined; a subclass
  says how to multiply one batch) and :class:`GGNOperator`;
* :mod:`~analysis.operators.hessian`: :class:`HessianOperator` and its product methods;
* :mod:`~analysis.operators.auto`: ``method="auto"``, the timed choice of the product method;
* :mod:`~analysis.operators.adapters`: :func:`as_linear_operator` (tensors, callables, and a
  model + loss + data with an explicit keyword list).
"""

from .adapters import OPERATOR_KEYWORDS, as_linear_operator
from .auto import CACHE_BYTES, AutoChoice, cache_budget, choose_method
from .curvature import (
    BLOCK_BYTES,
    CurvatureOperator,
    GGNOperator,
    default_block_size,
    directional_curvature,
)
from .empirical_risk import EmpiricalRisk, check_deterministic_setup
from .hessian import HessianOperator
from .protocol import LinearOperator, TorchOperator, to_scipy_operator

__all__ = [
    "LinearOperator", "TorchOperator", "to_scipy_operator",
    "EmpiricalRisk", "check_deterministic_setup",
    "CurvatureOperator", "GGNOperator", "HessianOperator", "directional_curvature",
    "default_block_size", "BLOCK_BYTES",
    "AutoChoice", "choose_method", "cache_budget", "CACHE_BYTES",
    "as_linear_operator", "OPERATOR_KEYWORDS",
]
