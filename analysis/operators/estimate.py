"""The working memory of one Hessian-vector product, predicted before any product runs.

The one formula, by product method, with ``A`` the bytes the first batch's forward pass saves
for its backward pass and ``n`` parameters of ``s`` bytes (:data:`PRODUCT_FACTORS`,
``a A + b n s``):

* finite differences ``A + 3 n s`` (the shifted parameters and two gradients), forward
  differences ``A + 3 n s`` (the kept ``g(w)``, the shifted parameters and one gradient);
* forward-over-reverse ``2 A + 3 n s`` (the tangents double the activations);
* double backward ``3 A + 2 n s`` (the graph of the gradient holds the forward's and the
  backward's tensors);
* the cached graph ``3 A`` per batch, scaled to all batches by their loss terms, plus ``2 n s``;
* ``"auto"``: the larger of forward-over-reverse (timed once at the first product) and the
  method it times it against, the cached graph when :func:`~analysis.operators.auto.graphs_fit`
  keeps at least one batch's graph (estimated at ``3 A`` per batch; when it keeps only the first
  ``c``, those ``c`` graphs and one rebuilt graph at a time), else double backward.

``A`` is measured by one forward pass of the first batch under
``torch.autograd.graph.saved_tensors_hooks`` (:func:`~analysis.operators.auto.saved_bytes`;
parameters, buffers and inputs left out: they are held anyway), through the operator itself
(its parameter subset, microbatches, mode and math attention kernels): the only computation the
estimate makes. :func:`analysis.cost.estimate_peak_bytes` adds the analysis's vectors and the
process's resident memory; the command line's memory check (``landscape.cli.memory``) and
``landscape estimate`` take their product memory from here.

The factors of finite differences (central and forward) and of the cached graph were checked
against measured peaks on GPT-2 small (``benchmarks/llm_scale.py``, table in
``docs/guides/llm.md``); those of forward-over-reverse and double backward are rough
(``validated=False``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import Data
from ..losses import LossSpec
from ..results import Result
from .auto import graphs_fit, saved_bytes, tensors_of
from .hessian import HessianOperator

__all__ = ["PRODUCT_FACTORS", "VALIDATED_METHODS", "ProductEstimate", "estimate_product_bytes",
           "product_bytes"]

#: ``method: (a, b)``: one product's working memory is ``a A + b n s`` (module docstring); the
#: cached graph's ``A`` is that of all batches.
PRODUCT_FACTORS = {
    "finite-difference": (1, 3),
    "forward-difference": (1, 3),
    "forward-over-reverse": (2, 3),
    "double-backward": (3, 2),
    "cached-graph": (3, 2),
}

#: The methods whose factors were checked against a measured peak resident memory.
VALIDATED_METHODS = ("finite-difference", "forward-difference", "cached-graph")


@dataclass(frozen=True, repr=False)
class ProductEstimate(Result):
    """The predicted working memory of one product (bytes).

    Attributes:
        product_bytes: ``a A + b n s`` of :data:`PRODUCT_FACTORS` for :attr:`method` (for
            ``"auto"`` the larger of its two candidates).
        activation_bytes: ``A``, the first batch's saved activations (measured).
        all_activation_bytes: ``A`` scaled to all batches by their loss terms.
        method: the method asked for (``"auto"`` or one of :data:`PRODUCT_FACTORS`).
        chosen: the method the formula was taken for (``"auto"``: the one it would keep).
        num_params: ``n``; itemsize: ``s``.
        validated: the factors were checked against a measured peak.
    """

    product_bytes: int
    activation_bytes: int
    all_activation_bytes: int
    method: str
    chosen: str
    num_params: int
    itemsize: int
    validated: bool


def product_bytes(method: str, activation_bytes: int, num_params: int, itemsize: int, *,
                  all_activation_bytes: int | None = None) -> int:
    """``a A + b n s`` for ``method`` (:data:`PRODUCT_FACTORS`; the cached graph takes
    ``all_activation_bytes``, default ``activation_bytes``).

    Raises:
        ValueError: for a method not in :data:`PRODUCT_FACTORS`.
    """
    if method not in PRODUCT_FACTORS:
        raise ValueError(f"method must be one of {tuple(PRODUCT_FACTORS)}, got {method!r}")
    a, b = PRODUCT_FACTORS[method]
    act = activation_bytes
    if method == "cached-graph" and all_activation_bytes is not None:
        act = all_activation_bytes
    return int(a * act + b * num_params * itemsize)


def _activations(op: HessianOperator) -> tuple[int, int]:
    """The first batch's saved activations and that scaled to all batches by loss terms."""
    first = op._first_batch()
    if first is None:
        return 0, 0
    x, y, size, _ = first
    with op._context():
        state = op._state()
        leaves = {n: state[n].detach().requires_grad_(True) for n in op._names}
        exclude = [*state.values(), *tensors_of(x), *tensors_of(y)]
        with torch.enable_grad():
            _, nbytes = saved_bytes(lambda: op._batch_loss(leaves, state, x, y, 1.0), exclude)
    total = sum(c[2] for c in op._cached) if op._cached is not None else size
    return int(nbytes), int(nbytes * total / max(1, size))


def estimate_product_bytes(model: Any, loss_fn: LossSpec, data: Data, *, method: str = "auto",
                           **operator_kwargs: Any) -> ProductEstimate:
    """Predict one product's working memory on ``model`` (see the module docstring).

    Args:
        model, loss_fn, data: as for :class:`~analysis.HessianOperator`.
        method: the product method (``"auto"`` or one of :data:`PRODUCT_FACTORS`).
        **operator_kwargs: ``params``, ``batch_size``, ``microbatch_size``, ``mode``, ... of the
            operator.

    Returns:
        :class:`ProductEstimate` (one forward pass of the first batch was made, after the
        operator's own first-batch check).

    Raises:
        ValueError: for an unknown ``method``.
    """
    if method != "auto" and method not in PRODUCT_FACTORS:
        raise ValueError(f"method must be 'auto' or one of {tuple(PRODUCT_FACTORS)}, got {method!r}")
    op = HessianOperator(model, loss_fn, data, method=method, **operator_kwargs)
    n, s = op.shape[0], torch.empty((), dtype=op.dtype).element_size()
    first_a, all_a = _activations(op)
    chosen = method
    if method == "auto":  # the candidate it times forward-over-reverse against
        kept = graphs_fit(op, PRODUCT_FACTORS["cached-graph"][0] * first_a)[0]
        graph = "cached-graph" if kept else "double-backward"
        if kept and op._cached is not None and kept < len(op._cached):
            # a partial cache: the kept graphs, and one rebuilt graph at a time for the others
            terms = [c[2] for c in op._cached]
            all_a = int(first_a * (sum(terms[:kept]) + max(terms[kept:])) / max(1, terms[0]))
        sizes = {m: product_bytes(m, first_a, n, s, all_activation_bytes=all_a)
                 for m in (graph, "forward-over-reverse")}
        chosen = max(sizes, key=sizes.get)
    return ProductEstimate(
        product_bytes=product_bytes(chosen, first_a, n, s, all_activation_bytes=all_a),
        activation_bytes=first_a, all_activation_bytes=all_a, method=method, chosen=chosen,
        num_params=int(n), itemsize=int(s), validated=chosen in VALIDATED_METHODS)
