"""The peak memory of a curvature analysis, predicted before it runs.

:func:`estimate_peak_bytes` adds up, for a model, a loss and data:

* ``baseline``: the resident memory of the process now (the model, the data, the runtime);
* ``activations``: the bytes the first batch's forward pass saves for its backward pass,
  measured by one forward pass under ``torch.autograd.graph.saved_tensors_hooks`` (parameters
  and inputs left out: they are held anyway), the only computation the estimate makes;
* one product's working memory, by method (``n`` parameters of ``s`` bytes, ``A`` the
  activations): finite differences ``A + 3 n s`` (the shifted parameters and two gradients),
  forward-over-reverse ``2 A + 3 n s`` (the tangents double the activations), double backward
  ``3 A + 2 n s`` (the graph of the gradient holds the forward's and the backward's tensors),
  the cached graph ``3 A`` per batch, scaled to all batches by their loss terms, plus ``2 n s``;
* the analysis's own vectors: Lanczos ``(max_basis + 3) n s_basis`` (the documented bound of
  :func:`~analysis.lanczos.top_eigenpairs`, which a top-1 run at ``tol=1e-2`` with a small
  ``max_basis`` fills), Hutch++ ``(s + 4 b) n s`` (:mod:`analysis.trace`).

The finite-difference estimate was checked against the measured peak RSS on GPT-2 small
(``benchmarks/llm_scale.py``, table in ``docs/notes/llm.md``); the factors of the other methods
are rough (documented as such in :class:`PeakEstimate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data import Data
from ..losses import LossSpec
from ..results import Result
from .auto import proc_kib, saved_bytes, tensors_of
from .hessian import HessianOperator

__all__ = ["PeakEstimate", "estimate_peak_bytes", "process_rss_bytes"]


@dataclass(frozen=True, repr=False)
class PeakEstimate(Result):
    """The predicted peak resident memory of an analysis (bytes).

    Attributes:
        peak_bytes: ``baseline + vectors + product``.
        baseline_bytes: the process's resident memory when the estimate was made.
        vectors_bytes: the analysis's own vectors (the Krylov basis, probes).
        product_bytes: one product's working memory (see the module docstring).
        activation_bytes: the first batch's saved activations (measured).
        method: the product method the estimate is for.
        validated: ``True`` for the method whose factors were checked against a measured peak
            (``"finite-difference"``), ``False`` for the rough ones.
    """

    peak_bytes: int
    baseline_bytes: int
    vectors_bytes: int
    product_bytes: int
    activation_bytes: int
    method: str
    validated: bool


def process_rss_bytes() -> int:
    """The resident memory of this process (Linux ``VmRSS``; 0 where it cannot be read)."""
    kib = proc_kib("/proc/self/status", "VmRSS")
    return 0 if kib is None else kib * 1024


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


def estimate_peak_bytes(model: Any, loss_fn: LossSpec, data: Data, *, analysis: str = "lanczos",
                        max_basis: int | None = None, k: int = 1, num_matvecs: int = 99,
                        method: str = "auto", **operator_kwargs: Any) -> PeakEstimate:
    """Predict the peak resident memory of ``analysis`` on ``model`` (see the module docstring).

    Args:
        model, loss_fn, data: as for :class:`~analysis.hessian.HessianOperator`.
        analysis: ``"lanczos"`` (:func:`~analysis.lanczos.top_eigenpairs` with ``k`` and
            ``max_basis``, default ``min(n, max(2k + 1, 20))``) or ``"trace"`` (Hutch++ with
            ``num_matvecs`` products, one probe per pass).
        method: the product method (``"auto"``: the cached graph when the data is in memory,
            else double backward, the larger of the two it usually picks).
        **operator_kwargs: ``params``, ``batch_size``, ``microbatch_size``, ... of the operator.

    Returns:
        :class:`PeakEstimate` (one forward pass of the first batch was made).

    Raises:
        ValueError: for an unknown ``analysis`` or ``method``.
    """
    if analysis not in ("lanczos", "trace"):
        raise ValueError(f"analysis must be 'lanczos' or 'trace', got {analysis!r}")
    baseline = process_rss_bytes()
    op = HessianOperator(model, loss_fn, data, method=method, **operator_kwargs)
    n, s = op.shape[0], torch.empty((), dtype=op.dtype).element_size()
    first_a, all_a = _activations(op)
    if method == "auto":
        method = "cached-graph" if op._cached is not None and op.microbatch_size is None \
            else "double-backward"
    product = {
        "finite-difference": first_a + 3 * n * s,
        "forward-over-reverse": 2 * first_a + 3 * n * s,
        "double-backward": 3 * first_a + 2 * n * s,
        "cached-graph": 3 * all_a + 2 * n * s,
    }[method]
    sb = max(4, s)  # a half-precision operator gets a float32 basis
    if analysis == "lanczos":
        rows = max_basis if max_basis is not None else min(n, max(2 * k + 1, 20))
        vectors = (rows + 3) * n * sb
    else:
        sketch = min(num_matvecs // 3, n)
        vectors = (sketch + 4) * n * s
    return PeakEstimate(peak_bytes=int(baseline + vectors + product), baseline_bytes=baseline,
                        vectors_bytes=int(vectors), product_bytes=int(product),
                        activation_bytes=first_a, method=method,
                        validated=method == "finite-difference")
