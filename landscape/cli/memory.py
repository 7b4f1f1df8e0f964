"""The memory check of the analysis commands: the estimate against the memory available, before
the first data pass.

The peak extra memory of a command is estimated as

    peak = max_a memory_bytes(a) + products

with ``memory_bytes(a)`` the formula of each planned analysis (:mod:`landscape.cli.estimate`:
the Krylov basis of Lanczos, the SLQ runs, the trace sketch, the slice directions) and
``products`` the working memory of the Hessian-vector products, which the formulas leave out:

* ``A``: the bytes of the tensors the autograd graph of the first batch's loss saves for
  backward (measured with one forward pass under ``torch.autograd.graph.saved_tensors_hooks``,
  :func:`analysis.operators.auto.saved_bytes`; parameters, buffers and inputs left out);
* ``method="auto"``'s calibration, which times every product method on the first batch while
  holding the graph it may keep: :data:`CALIBRATION_FACTOR` ``* A`` (the peak resident growth of
  a first ``"auto"`` product measured 10 A on a GPT-2 of 4 blocks of width 256 and 20 A on a
  tanh MLP, CPU, ``benchmarks/mixed_claims.py``; a single double-backward product 10 A);
* the cached graphs of all batches when ``"auto"`` would keep them (in-memory data of several
  batches whose graphs fit :func:`analysis.operators.auto.cache_budget`): ``2 A`` per batch,
  scaled by its loss terms (the estimate ``"auto"`` itself makes).

Commands without products count ``A`` for a backward pass (sharpness) and nothing for forward
passes alone (slices). The estimate is compared with :func:`analysis.operators.auto.available_bytes`
(CUDA's free memory, the host's ``MemAvailable``); a command whose estimate exceeds it stops with
a :class:`~landscape.cli._common.CLIError` naming both numbers before any analysis starts, unless
``--no-memory-check``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis import Data, LossSpec

__all__ = ["CALIBRATION_FACTOR", "GRAPH_FACTOR", "MemoryCheck", "ProductMemory", "check_memory",
           "product_memory"]

#: Peak working memory of the first ``"auto"`` product, in units of the first batch's saved
#: activations ``A`` (measured 10-20, see the module docstring).
CALIBRATION_FACTOR = 20

#: Bytes of one cached first-order graph (``create_graph=True``) in units of ``A``.
GRAPH_FACTOR = 2


@dataclass(frozen=True)
class ProductMemory:
    """The working memory of Hessian-vector products on a model and its data (bytes).

    Attributes:
        activation_bytes: ``A``, the tensors the first batch's graph saves for backward.
        calibration_bytes: ``CALIBRATION_FACTOR * A``, the first ``"auto"`` product.
        cached_graph_bytes: the graphs of all batches ``"auto"`` would keep (0 when it would
            not cache them: a DataLoader, one batch, or more than the cache budget).
        total_bytes: ``calibration_bytes + cached_graph_bytes``.
    """

    activation_bytes: int
    calibration_bytes: int
    cached_graph_bytes: int
    total_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        return asdict(self)


@dataclass(frozen=True)
class MemoryCheck:
    """The estimate of a command against the memory available.

    Attributes:
        peak_bytes: the estimated peak extra memory (largest analysis + products).
        analyses_bytes: the largest ``memory_bytes`` of the planned analyses.
        products: the products' working memory (None for a command without products).
        available_bytes: memory available on the device (None where it cannot be read).
        device: the device checked.
        fits: ``peak_bytes <= available_bytes`` (True when the availability is unknown).
    """

    peak_bytes: int
    analyses_bytes: int
    products: ProductMemory | None
    available_bytes: int | None
    device: str
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        d = asdict(self)
        d["products"] = self.products.to_dict() if self.products is not None else None
        return d


def product_memory(model: Any, loss_fn: LossSpec, data: Data) -> ProductMemory:
    """Measure ``A`` on the first batch of ``data`` (one forward pass with autograd on, eval
    mode, the math attention kernels the products use) and estimate the products' working
    memory from it (see the module docstring). The model is left as it was."""
    import torch

    from analysis.attention import second_order_attention
    from analysis.data import DataSource, as_data, to_device
    from analysis.evaluation import forward, model_device_dtype, model_mode, resolve_loss
    from analysis.losses import loss_terms
    from analysis.operators.auto import cache_budget, saved_bytes, tensors_of

    source = as_data(data)
    if source.shard:  # the estimate is per rank, from the first batch of the whole data
        source = DataSource(source.data, batch_size=source.batch_size,
                            max_samples=source.max_samples)
    loss_fn = resolve_loss(loss_fn)
    device, dtype = model_device_dtype(model)
    first = next(iter(source))
    x = to_device(first.inputs, device, dtype)
    y = to_device(first.targets, device, dtype)
    exclude = [*model.parameters(), *model.buffers(), *tensors_of(x), *tensors_of(y)]
    with model_mode(model, "eval"), torch.enable_grad(), second_order_attention():
        _, act = saved_bytes(lambda: loss_fn(forward(model, x), y), exclude)
    cached = 0
    if source.in_memory:
        terms = [loss_terms(loss_fn, b.inputs, b.targets, b.size) for b in source]
        total = int(GRAPH_FACTOR * act * sum(terms) / max(1, terms[0]))
        if len(terms) > 1 and total <= cache_budget(device):
            cached = total
    calib = CALIBRATION_FACTOR * act
    return ProductMemory(int(act), int(calib), cached, int(calib + cached))


def check_memory(costs: list, model: Any, loss_fn: LossSpec, data: Data, *, log: Any,
                 ignore: bool = False, available: int | None = None) -> MemoryCheck:
    """Estimate the peak of ``costs`` (a list of :class:`~landscape.cli.estimate.Cost`) plus the
    products' working memory on ``model`` and ``data``, log it and compare it with the memory
    available on the model's device (``available`` overrides the reading, for tests). Under
    ``torch.distributed`` the ranks compare the largest peak with the least available memory,
    so that they all go on or all stop. A model whose graph cannot be probed counts the analyses
    alone (with a warning).

    Raises:
        CLIError: the estimate exceeds the available memory and ``ignore`` is False; the message
            names both numbers, the largest part and ``--no-memory-check``.
    """
    from analysis import distributed as dist
    from analysis.evaluation import model_device_dtype
    from analysis.operators.auto import available_bytes

    from ._common import CLIError
    from .estimate import format_bytes

    def _fmt(b: int | None) -> str:
        return "unknown" if b is None else format_bytes(b)

    device, _ = model_device_dtype(model)
    analyses = max((c.memory_bytes or 0 for c in costs), default=0)
    products = None
    extra = 0
    hvps, backward = any(c.hvps for c in costs), any(c.backward_passes for c in costs)
    if hvps or backward:
        try:
            products = product_memory(model, loss_fn, data)
        except Exception as exc:  # a forward the graph probe cannot take: the analyses only
            log(f"warning: memory check: the products' memory was not measured "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
    if products is not None and hvps:
        extra = products.total_bytes
        log(f"memory estimate: Hessian-vector products: {_fmt(products.total_bytes)} "
            f"({CALIBRATION_FACTOR} x the first batch's {_fmt(products.activation_bytes)} of saved "
            f"activations for method='auto''s calibration"
            + (f", {_fmt(products.cached_graph_bytes)} of cached graphs" if products.cached_graph_bytes
               else "") + ")")
    elif products is not None:
        extra = products.activation_bytes
    avail = available_bytes(device) if available is None else int(available)
    peak = analyses + extra
    if dist.is_distributed():  # every rank decides alike: the largest peak, the least memory
        both = dist.all_gather_object((avail, peak))
        known = [a for a, _ in both if a is not None]
        avail, peak = (min(known) if known else None), max(p for _, p in both)
    fits = avail is None or peak <= avail
    check = MemoryCheck(int(peak), int(analyses), products, avail, str(device), fits)
    log(f"memory check: estimated peak extra memory {_fmt(peak)} (largest analysis "
        f"{_fmt(analyses)} + products {_fmt(extra)}), available on {device}: {_fmt(avail)}")
    if not fits and not ignore:
        part = "the products' working memory" if extra > analyses else "the largest analysis"
        raise CLIError(
            f"the estimated peak extra memory {_fmt(peak)} exceeds the {_fmt(avail)} available on "
            f"{device} (mostly {part}); use smaller batches or analyses (--batch-size, "
            "--max-samples, --top-k, --density-runs), or pass --no-memory-check to start anyway")
    return check
