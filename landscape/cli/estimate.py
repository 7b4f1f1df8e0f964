"""What an analysis will cost, predicted from its options before the first data pass.

Every function here is a pure formula (no model, no data): the number of Hessian-vector products
(HVPs) or forward passes, the passes over the data, and the peak extra memory in bytes, taken from
the docstrings of the routines the commands call (``n`` trainable parameters of ``itemsize``
bytes, ``N`` samples):

* :func:`lanczos_cost`: :func:`analysis.top_eigenpairs`, at most ``max_iter`` products
  (default ``min(max(300, 30 k), 10 n)``; it usually stops far earlier, so an upper bound) and
  ``(max_basis + 3) * n * itemsize`` bytes (default ``max_basis = min(n, max(2k + 1, 20))``;
  a half-precision model gets a float32 basis);
* :func:`trace_cost`: :func:`analysis.hessian_trace`, exact counts: Hutchinson
  ``num_matvecs`` products and ``3 * block_size * n * itemsize`` bytes; Hutch++ ``3 s``
  products with ``s = min(num_matvecs // 3, n)`` (``2 n`` when ``s = n``) and
  ``(s + 4 * block_size) * n * itemsize`` bytes; one data pass per block of products;
* :func:`density_cost`: :func:`analysis.spectral_density` (SLQ), ``num_runs * m``
  products with ``m = min(num_iter, n)`` (fewer only if a run breaks down on an invariant
  subspace) and at most ``(m + 5) * n * itemsize`` bytes per run held at once (``block_size``);
* :func:`m_sharpness_cost`: :func:`analysis.sharpness`, exact: per batch of ``m``
  samples (``min(N, n_eval) // m`` batches) ``1 + (steps + 1)`` forward and ``steps`` backward
  passes for the worst case (one forward less with ``init="zero"``, ``steps + 1`` more per
  restart), ``1 + samples`` forward passes for the average;
* :func:`slice_cost`: :mod:`landscape.slices`, one forward pass over the data per grid point
  (``steps ** dims``, plus one at the origin), the saved weights and the directions
  (``(dims + 1) * n * itemsize`` bytes; the model is not copied).

The commands print one line per analysis (:func:`describe`) on stderr, rank 0 only, unless
``--quiet``, and add the list (:meth:`Cost.to_dict`) to the JSON document under ``"estimate"``.

So that an estimate can be checked against the run, a :class:`Meter` prints after each analysis
what it used (:func:`describe_used`: the products counted by the operator and the seconds), and
records it in the JSON beside the estimate (``estimate[i]["used"]``). ``landscape hessian``
times one product before its first analysis (after ``method="auto"``'s calibration, which it
reports apart; :func:`landscape.cli.hessian.first_product`), so Lanczos gets a time estimate too;
once an analysis has run, its seconds per product give a time estimate of each later one before
it starts (:func:`describe_time`, "about X s"), the latest analysis's rate, since the first one's
includes the one-time start-up. Before any of it, :mod:`landscape.cli.memory` checks the
estimated peak memory (these formulas plus the products' working memory) against the memory
available.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

__all__ = ["Cost", "Meter", "announce", "format_bytes", "describe_time", "describe_used", "defaults_of", "density_cost", "describe", "lanczos_cost", "m_sharpness_cost",
           "slice_cost", "trace_cost", "trace_defaults", "unknown_cost"]


@dataclass(frozen=True)
class Cost:
    """The predicted cost of one analysis.

    Attributes:
        analysis: what is computed, e.g. ``"lambda_max (Lanczos, k=1)"``.
        hvps: Hessian-vector products (0 when the analysis needs none).
        forward_passes: forward passes (over the data, or over batches of ``m`` samples for
            m-sharpness); 0 when the analysis is all products.
        backward_passes: backward passes outside the products.
        data_passes: passes over the data (a block of batched products is one pass).
        memory_bytes: peak extra memory outside the model and one product's working memory;
            ``None`` where no formula is documented.
        exact: the counts are exact (``False``: upper bounds).
        unit: what ``forward_passes`` counts (``"data"`` or ``"batches of m samples"``).
        note: printed after the counts, e.g. why a bound is loose.
    """

    analysis: str
    hvps: int | None = 0
    forward_passes: int | None = 0
    backward_passes: int | None = 0
    data_passes: int | None = 0
    memory_bytes: int | None = None
    exact: bool = True
    unit: str = "data"
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        return dataclasses.asdict(self)


def defaults_of(fn: Any) -> dict[str, Any]:
    """The keyword defaults of ``fn`` (the estimates follow the library's own defaults)."""
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.default is not inspect.Parameter.empty}


def trace_defaults() -> dict[str, Any]:
    """``num_matvecs``, ``method`` and ``block_size`` of :func:`analysis.hessian_trace`."""
    from analysis.trace import hessian_trace

    d = defaults_of(hessian_trace)
    return {k: d[k] for k in ("num_matvecs", "method", "block_size")}


def lanczos_cost(n: int, k: int, itemsize: int, *, max_iter: int | None = None,
                 max_basis: int | None = None, label: str | None = None,
                 data_stderr: bool = True) -> Cost:
    """Upper bounds for :func:`analysis.top_eigenpairs` on an ``n x n`` Hessian.

    Products: ``max_iter`` (default ``min(max(300, 30 k), 10 n)``), one data pass each, plus one
    for the gradient start vector, plus ``k`` in one pass for the data-sampling standard errors
    (``data_stderr``, :func:`analysis.uncertainty.eigenvalue_data_stderr`). Memory: ``(max_basis + 3) * n * itemsize`` with the default
    ``max_basis = min(n, max(2 k + 1, 20))`` (:func:`analysis.krylov.default_max_basis`; the
    Hessian guide, "Memory you can predict"; ``EigenResult.memory_bound_bytes``).
    """
    from analysis.cost import planned_products, vectors_bytes

    hvps, _ = planned_products("lanczos", n, k=k, max_iter=max_iter, data_stderr=data_stderr)
    cap = hvps - (k if data_stderr else 0)
    return Cost(label or f"top-{k} eigenvalues (Lanczos)", hvps=hvps,
                data_passes=cap + 1 + int(bool(data_stderr)),
                memory_bytes=vectors_bytes("lanczos", n, itemsize, k=k, max_basis=max_basis),
                exact=False,
                note="the max_iter cap; it stops at the tolerance, usually far earlier")


def _block_size(n: int, itemsize: int, block_size: int | None) -> int:
    if block_size is not None:
        return block_size
    from analysis.operators.curvature import default_block_size

    return default_block_size(n, itemsize)


def trace_cost(n: int, itemsize: int, *, num_matvecs: int = 99, method: str = "hutch++",
               block_size: int | None = None, label: str | None = None) -> Cost:
    """Exact counts for :func:`analysis.hessian_trace` (module docstring of
    :mod:`analysis.trace`; ``TraceResult.memory_bound_bytes``).

    Hutchinson: ``num_matvecs`` products in ``ceil(num_matvecs / b)`` passes, memory
    ``3 b n itemsize``. Hutch++: sketch size ``s = min(num_matvecs // 3, n)``; ``s`` products for
    the sketch, ``s`` for ``tr(Q^T H Q)`` and ``s`` for the deflated Hutchinson part (skipped when
    ``s = n``), each stage in ``ceil(s / b)`` passes; memory ``(s + 4 b) n itemsize``. ``b`` is
    ``block_size`` (default :func:`analysis.operators.default_block_size`). The data-sampling
    standard error adds no product and no pass (the quadratic forms' blocks are taken per
    sampling unit, :class:`analysis.uncertainty.UnitForms`).
    """
    from analysis.trace import trace_plan

    name = label or f"trace ({'Hutch++' if method == 'hutch++' else 'Hutchinson'}, {num_matvecs} products)"
    plan = trace_plan(n, num_matvecs, method, itemsize,
                      block_size=_block_size(n, itemsize, block_size))
    return Cost(name, hvps=plan.products, data_passes=plan.passes,
                memory_bytes=plan.memory_bound_bytes)


def density_cost(n: int, itemsize: int, *, num_iter: int = 80, num_runs: int = 10,
                 block_size: int | None = None, label: str | None = None) -> Cost:
    """Counts for :func:`analysis.spectral_density` (stochastic Lanczos quadrature).

    ``m = min(num_iter, n)`` steps per run, ``num_runs * m`` products (exact unless a run breaks
    down early), ``ceil(num_runs / b) * m`` data passes with ``b = min(block_size or 1,
    num_runs)`` runs in lockstep, and at most ``(m + 5) * n * itemsize`` bytes per run held at once
    (measured bound, docstring of ``spectral_density`` and tests/analysis/test_memory.py).
    """
    m = min(num_iter, n)
    b = min(block_size or 1, num_runs)
    return Cost(label or f"spectral density (SLQ, {num_runs} runs x {m} steps)", hvps=num_runs * m,
                data_passes=math.ceil(num_runs / b) * m, memory_bytes=b * (m + 5) * n * itemsize)


def m_sharpness_cost(num_samples: int, *, kind: str, m: int, n_eval: int | None = 1024,
                     steps: int = 20, samples: int = 64, init: str = "random", restarts: int = 0,
                     label: str | None = None) -> Cost:
    """Exact counts for :func:`analysis.sharpness` (its "Cost" paragraph).

    ``B = min(N, n_eval) // m`` batches of ``m`` samples (the incomplete last batch is dropped).
    Worst case: ``B (1 + steps + 1)`` forward passes (one fewer per batch with ``init="zero"``)
    and ``B steps`` backward passes, plus ``B (steps + 1)`` forward and ``B steps`` backward
    passes per restart. Average: ``B (1 + samples)`` forward passes. Counted in batches of ``m``
    samples, as ``SharpnessResult.forward_passes``; no memory formula is documented.
    """
    used = num_samples if n_eval is None else min(num_samples, n_eval)
    batches = used // m
    name = label or f"{kind} m-sharpness (m={m})"
    if kind == "average":
        fwd, bwd = batches * (1 + samples), 0
    else:
        fwd = batches * (1 + steps + (0 if init == "zero" else 1) + restarts * (steps + 1))
        bwd = batches * steps * (1 + restarts)
    passes = math.ceil(fwd / batches) if batches else 0
    return Cost(name, hvps=0, forward_passes=fwd, backward_passes=bwd, data_passes=passes,
                unit="batches of m samples")


def slice_cost(n: int, itemsize: int, *, dims: int, steps: int, label: str | None = None,
               rows_done: int = 0) -> Cost:
    """Counts for a slice of :mod:`landscape.slices`: ``steps ** dims`` grid points and the origin
    ``w``, one forward pass over the data each (``(steps - rows_done) * steps + 1`` when a 2-D
    ``--store`` resumes ``rows_done`` finished rows; the determinism check's two forward passes
    of the first batch are not counted); memory ``(dims + 1) * n * itemsize`` (the saved weights
    ``w`` and the directions; parameters are set in place to ``w + x d1 + y d2``, the model is
    not copied)."""
    passes = (steps - rows_done) * steps ** (dims - 1) + 1
    name = label or f"{dims}-D slice ({steps}{'x' + str(steps) if dims == 2 else ''} points)"
    if rows_done:
        name += f", {steps - rows_done} of {steps} rows left"
    return Cost(name, forward_passes=passes, data_passes=passes, memory_bytes=(dims + 1) * n * itemsize)


def unknown_cost(analysis: str) -> Cost:
    """An analysis whose cost depends on the data (an optimizer's iterations): not predicted."""
    return Cost(analysis, hvps=None, forward_passes=None, backward_passes=None, data_passes=None,
                exact=False)


def format_bytes(b: int) -> str:
    """``"12.3 MB"`` (MiB), or ``"N bytes"`` below 0.1 MB."""
    return f"{b / 2**20:.1f} MB" if b >= 2**20 / 10 else f"{b} bytes"


def describe(cost: Cost, suffix: str = "") -> str:
    """One line for stderr, e.g. ``cost estimate: trace (Hutch++, 99 products): 99 Hessian-vector
    products, 21 data passes, peak extra memory 3.1 MB``."""
    if cost.data_passes is None:
        return (f"cost estimate: {cost.analysis}: not predicted (its iterations depend on the "
                f"data){suffix}")
    le = "" if cost.exact else "<= "
    parts = []
    if cost.hvps:
        parts.append(f"{le}{cost.hvps} Hessian-vector products")
    if cost.forward_passes:
        unit = "" if cost.unit == "data" else f" ({cost.unit})"
        parts.append(f"{le}{cost.forward_passes} forward{unit}")
    if cost.backward_passes:
        parts.append(f"{le}{cost.backward_passes} backward")
    parts.append(f"{le}{cost.data_passes} data pass{'' if cost.data_passes == 1 else 'es'}")
    if cost.memory_bytes is not None:
        parts.append(f"peak extra memory {le}{format_bytes(cost.memory_bytes)}")
    note = f" ({cost.note})" if cost.note else ""
    return f"cost estimate: {cost.analysis}: " + ", ".join(parts) + note + suffix


def describe_used(cost: Cost, hvps: int | None, seconds: float, forward: int | None = None) -> str:
    """The line printed after an analysis, beside its estimate, e.g. ``used: top-1 eigenvalues
    (Lanczos): 31 Hessian-vector products (estimate <= 300), 2.1 s``."""
    le = "" if cost.exact else "<= "
    parts = []
    if hvps is not None and (hvps or cost.hvps):
        parts.append(f"{hvps} Hessian-vector products (estimate {le}{cost.hvps})")
    if forward is not None:
        parts.append(f"{forward} forward (estimate {le}{cost.forward_passes})")
    parts.append(f"{seconds:.3g} s")
    return f"used: {cost.analysis}: " + ", ".join(parts)


def describe_time(cost: Cost, seconds_per_product: float) -> str | None:
    """``time estimate: ...: about X s`` from the seconds per product measured so far (``None``
    when the analysis has no products)."""
    if not cost.hvps:
        return None
    le = "at most " if not cost.exact else "about "
    return (f"time estimate: {cost.analysis}: {le}{cost.hvps * seconds_per_product:.3g} s "
            f"({cost.hvps} products at {seconds_per_product:.3g} s each, as measured so far)")


class Meter:
    """Prints and records what each analysis used, beside its estimate (see the module docstring).

    ``run(cost, fn)`` prints the time estimate (when a product time is known), runs ``fn()``,
    which returns ``(result, hvps)``, prints :func:`describe_used` and keeps
    ``{"hvps", "seconds"}`` for :meth:`annotate`.
    """

    def __init__(self, log: Any):
        self.log = log
        self.used: dict[str, dict[str, Any]] = {}
        self.seconds_per_product: float | None = None

    def run(self, cost: Cost, fn: Any) -> Any:
        import time

        self.estimate_time(cost)
        t0 = time.perf_counter()
        result, hvps = fn()
        self.record(cost, hvps, time.perf_counter() - t0)
        return result

    def estimate_time(self, cost: Cost) -> None:
        """Print :func:`describe_time` for ``cost`` once a product has been timed."""
        line = describe_time(cost, self.seconds_per_product) if self.seconds_per_product else None
        if line:
            self.log(line)

    def record(self, cost: Cost, hvps: int | None, seconds: float, forward: int | None = None) -> None:
        """Print and keep what ``cost``'s analysis used."""
        self.used[cost.analysis] = {"hvps": hvps, "forward_passes": forward, "seconds": seconds}
        self.log(describe_used(cost, hvps, seconds, forward))
        if hvps:  # the latest rate: the first includes one-time start-up (kernels, caches)
            self.seconds_per_product = seconds / hvps

    def annotate(self, costs: list[Cost]) -> list[dict[str, Any]]:
        """The estimates as JSON, each with ``"used"`` (``None`` where it did not run)."""
        return [{**c.to_dict(), "used": self.used.get(c.analysis)} for c in costs]


def announce(costs: list[Cost], log: Any, *, checkpoints: int = 1) -> None:
    """Pass one :func:`describe` line per cost to ``log`` (the commands' rank-0, not-``--quiet``
    stderr logger), noting when each line holds for each of several checkpoints."""
    each = f" (each of {checkpoints} checkpoints)" if checkpoints > 1 else ""
    for cost in costs:
        log(describe(cost, each))
