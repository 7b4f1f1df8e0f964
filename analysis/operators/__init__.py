"""Curvature as linear operators: the protocol, the empirical risk, the Hessian and the GGN.

The operators users build are imported from :mod:`analysis` (``HessianOperator``,
``GGNOperator``, ``LinearOperator``, ``as_linear_operator``, ``directional_curvature``); this
package exports the machinery behind them.

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
  model + loss + data with an explicit keyword list);
* :mod:`~analysis.operators.sharded`: :class:`ShardedHessianOperator`, the Hessian of an
  FSDP2-sharded model on this rank's shards (``HessianOperator`` builds it for DTensor
  parameters).
"""

from .adapters import OPERATOR_KEYWORDS
from .auto import CACHE_BYTES, AutoChoice, cache_budget, choose_method
from .curvature import BLOCK_BYTES, CurvatureOperator, default_block_size
from .empirical_risk import EmpiricalRisk, check_deterministic_setup
from .protocol import TorchOperator, to_scipy_operator
from .sharded import ShardedHessianOperator

__all__ = [
    # the pieces of an operator
    "TorchOperator", "to_scipy_operator", "EmpiricalRisk", "CurvatureOperator",
    "check_deterministic_setup",
    # block sizes and the timed choice of the product method
    "default_block_size", "BLOCK_BYTES", "AutoChoice", "choose_method", "cache_budget",
    "CACHE_BYTES",
    # the keywords as_linear_operator passes on
    "OPERATOR_KEYWORDS",
    # the Hessian of an FSDP2-sharded model (built by HessianOperator for DTensor parameters)
    "ShardedHessianOperator",
]
