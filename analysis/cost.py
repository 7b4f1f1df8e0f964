"""The peak memory and the products of an analysis, predicted before it runs.

:func:`estimate_peak_bytes` adds up, for a model, a loss and data,

    peak = baseline + vectors + product

* ``baseline``: the resident memory of the process now (the model, the data, the runtime);
* ``vectors``: the analysis's own vectors, by the bounds its module documents and tests:
  Lanczos ``(max_basis + 3) n s`` (:func:`analysis.krylov.memory_bound_bytes`; a top-1 run
  at ``tol=1e-2`` with a small ``max_basis`` fills it), with a narrower ``basis_dtype``
  ``max_basis n s_basis + max(3, k) n s``, with the basis on disk ``max(4, k) n s`` plus
  the slab buffers (:func:`analysis.disk_basis.disk_memory_bound_bytes`), Hutch++ ``(s + 4 b) n s``
  (:func:`analysis.trace.trace_memory_bound_bytes`);
* ``product``: one product's working memory, by method
  (:func:`analysis.operators.estimate.estimate_product_bytes`: one forward pass of the first
  batch measures its saved activations, the only computation the estimate makes).

The products: Lanczos at most ``max_iter`` (:func:`analysis.krylov.default_max_iter`; it stops
at the tolerance, usually far earlier) plus ``k`` for the data-sampling standard errors (one
gradient for the start vector is not counted); Hutch++ exactly ``3 s`` (``2 n`` when ``s = n``). These are the formulas of the command line's cost lines
(``landscape.cli.estimate``), which ``landscape estimate CKPT`` prints with this estimate.
Measured against the peak resident memory of the run: within 25% on GPT-2 small
(``benchmarks/llm_scale.py``) and on a 1.3M-parameter MLP (``tests/analysis/test_estimate.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .data import Data
from .disk_basis import check_basis_device, disk_memory_bound_bytes
from .host_memory import resident_bytes
from .krylov import basis_dtypes, default_max_basis, default_max_iter, memory_bound_bytes
from .losses import LossSpec
from .operators.estimate import estimate_product_bytes
from .results import Result
from .trace import sketch_size, trace_memory_bound_bytes

__all__ = ["ANALYSES", "PeakEstimate", "estimate_peak_bytes", "vectors_bytes", "planned_products"]

#: The analyses the estimate knows: Lanczos (:func:`analysis.top_eigenpairs`) and the Hutch++
#: trace (:func:`analysis.hessian_trace`).
ANALYSES = ("lanczos", "trace")

#: The operator dtype of each itemsize (half precision: float32 working vectors either way).
_FLOAT_OF_SIZE = {2: torch.float16, 4: torch.float32, 8: torch.float64}


@dataclass(frozen=True, repr=False)
class PeakEstimate(Result):
    """The predicted peak resident memory of an analysis (bytes) and its products.

    Attributes:
        peak_bytes: ``baseline + vectors + product``.
        baseline_bytes: the process's resident memory when the estimate was made.
        vectors_bytes: the analysis's own vectors (the Krylov basis, probes).
        product_bytes: one product's working memory (:mod:`analysis.operators.estimate`).
        activation_bytes: the first batch's saved activations (measured).
        method: the product method the estimate is for (``"auto"``: the one it would keep).
        validated: ``True`` for the methods whose factors were checked against a measured peak
            (:data:`~analysis.operators.estimate.VALIDATED_METHODS`).
        analysis: ``"lanczos"`` or ``"trace"``.
        products: the products planned (Lanczos: the ``max_iter`` cap, an upper bound).
        products_exact: ``products`` is exact (``False``: an upper bound).
        num_params: ``n``.
    """

    peak_bytes: int
    baseline_bytes: int
    vectors_bytes: int
    product_bytes: int
    activation_bytes: int
    method: str
    validated: bool
    analysis: str = "lanczos"
    products: int = 0
    products_exact: bool = False
    num_params: int = 0

    @property
    def extra_bytes(self) -> int:
        """``vectors + product``: the memory the analysis adds to the process."""
        return self.vectors_bytes + self.product_bytes


def _check_analysis(analysis: str) -> None:
    if analysis not in ANALYSES:
        raise ValueError(f"analysis must be 'lanczos' or 'trace', got {analysis!r}")


def vectors_bytes(analysis: str, n: int, itemsize: int, *, k: int = 1,
                  max_basis: int | None = None, num_matvecs: int = 99,
                  block_size: int = 1, basis_dtype: Any = None,
                  basis_device: Any = None) -> int:
    """The analysis's own vectors: Lanczos :func:`~analysis.krylov.memory_bound_bytes` (default
    ``max_basis = min(n, max(2k + 1, 20))``, float32 vectors for half precision, the basis in
    ``basis_dtype``; ``basis_device="disk"``: the working vectors and the slab buffers only),
    Hutch++ ``(s + 4 b) n s``.

    Raises:
        ValueError: for an unknown ``analysis`` or a bad ``basis_dtype``
            (:func:`~analysis.krylov.basis_dtypes`).
    """
    _check_analysis(analysis)
    if analysis == "lanczos":
        rows = min(n, default_max_basis(n, k) if max_basis is None else max_basis)
        if int(itemsize) not in _FLOAT_OF_SIZE:
            raise ValueError(f"itemsize must be 2, 4 or 8 (a floating operator), got {itemsize!r}")
        work, store = basis_dtypes(_FLOAT_OF_SIZE[int(itemsize)], basis_dtype)
        if check_basis_device(basis_device):
            return disk_memory_bound_bytes(n, work.itemsize, k)
        return memory_bound_bytes(n, rows, work.itemsize, store.itemsize, k)
    return trace_memory_bound_bytes(n, num_matvecs, "hutch++", block_size, itemsize)


def planned_products(analysis: str, n: int, *, k: int = 1, max_iter: int | None = None,
                     num_matvecs: int = 99, data_stderr: bool = True) -> tuple[int, bool]:
    """``(products, exact)``: Lanczos's cap ``max_iter`` (default
    :func:`~analysis.krylov.default_max_iter`) plus ``k`` with ``data_stderr``, an upper bound;
    Hutch++ ``3 s`` (``2 n`` when the sketch ``s`` reaches ``n``), exact.

    Raises:
        ValueError: for an unknown ``analysis``.
    """
    _check_analysis(analysis)
    if analysis == "lanczos":
        cap = default_max_iter(n, k) if max_iter is None else int(max_iter)
        return cap + (k if data_stderr else 0), False
    s = sketch_size(n, num_matvecs)
    return (2 if s >= n else 3) * s, True


def estimate_peak_bytes(model: Any, loss_fn: LossSpec, data: Data, *, analysis: str = "lanczos",
                        max_basis: int | None = None, k: int = 1, max_iter: int | None = None,
                        num_matvecs: int = 99, method: str = "auto", basis_dtype: Any = None,
                        basis_device: Any = None,
                        **operator_kwargs: Any) -> PeakEstimate:
    """Predict the peak resident memory and the products of ``analysis`` on ``model`` (see the
    module docstring).

    Args:
        model, loss_fn, data: as for :class:`~analysis.HessianOperator`.
        analysis: ``"lanczos"`` (:func:`~analysis.lanczos.top_eigenpairs` with ``k``,
            ``max_basis`` and ``max_iter``) or ``"trace"`` (Hutch++ with ``num_matvecs``
            products, one probe per pass).
        method: the product method (``"auto"`` or one of
            :data:`~analysis.operators.estimate.PRODUCT_FACTORS`).
        basis_dtype: the Lanczos basis's dtype (``top_eigenpairs(basis_dtype=)``).
        basis_device: ``"disk"`` for a basis on disk (``top_eigenpairs(basis_device=)``); other
            devices hold the rows in memory (counted as such).
        **operator_kwargs: ``params``, ``batch_size``, ``microbatch_size``, ... of the operator.

    Returns:
        :class:`PeakEstimate` (one forward pass of the first batch was made).

    Raises:
        ValueError: for an unknown ``analysis`` or ``method``, or a bad ``basis_dtype``.
    """
    _check_analysis(analysis)
    baseline = resident_bytes()
    prod = estimate_product_bytes(model, loss_fn, data, method=method, **operator_kwargs)
    n, s = prod.num_params, prod.itemsize
    vectors = vectors_bytes(analysis, n, s, k=k, max_basis=max_basis, num_matvecs=num_matvecs,
                            basis_dtype=basis_dtype, basis_device=basis_device)
    products, exact = planned_products(analysis, n, k=k, max_iter=max_iter,
                                       num_matvecs=num_matvecs)
    return PeakEstimate(peak_bytes=int(baseline + vectors + prod.product_bytes),
                        baseline_bytes=baseline, vectors_bytes=int(vectors),
                        product_bytes=prod.product_bytes, activation_bytes=prod.activation_bytes,
                        method=prod.chosen, validated=prod.validated, analysis=analysis,
                        products=products, products_exact=exact, num_params=n)
