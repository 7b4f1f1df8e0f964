"""The memory check of the analysis commands: the estimate against the memory available, before
the first data pass.

The peak extra memory of a command is estimated as

    peak = max_a memory_bytes(a) + product

with ``memory_bytes(a)`` the vectors of each planned analysis (:mod:`landscape.cli.estimate`,
whose formulas are :mod:`analysis.cost`'s: the Krylov basis of Lanczos, the SLQ runs, the trace
sketch, the slice directions) and ``product`` the working memory of one Hessian-vector product
under ``method="auto"``, the one formula of :mod:`analysis.operators.estimate` (one forward pass
of the first batch measures its saved activations ``A``; ``"auto"`` counts the larger of the two
methods it compares at its first product). Commands without products count ``A`` for a
backward pass (sharpness) and nothing for forward passes alone (slices). The estimate is
compared with :func:`analysis.operators.auto.available_bytes` (CUDA's free memory, the host's
``MemAvailable``); a command whose estimate exceeds it stops with a
:class:`~landscape.cli._common.CLIError` naming both numbers before any analysis starts, unless
``--no-memory-check``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from analysis import Data, LossSpec
    from analysis.operators.estimate import ProductEstimate

__all__ = ["MemoryCheck", "check_memory", "product_memory"]


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
    products: ProductEstimate | None
    available_bytes: int | None
    device: str
    fits: bool

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dictionary."""
        d = asdict(self)
        d["products"] = self.products.to_dict() if self.products is not None else None
        return d


def product_memory(model: Any, loss_fn: LossSpec, data: Data, **operator_kwargs: Any) -> ProductEstimate:
    """:func:`analysis.operators.estimate.estimate_product_bytes` on the whole data (under
    ``torch.distributed`` the estimate is per rank, from the first batch of the whole data, so
    no collective runs) with the operator's own first-batch check left to the analyses (the
    model is left as it was)."""
    from analysis.data import DataSource, as_data
    from analysis.operators.estimate import estimate_product_bytes

    source = as_data(data)
    if source.shard:
        source = DataSource(source.data, batch_size=source.batch_size,
                            max_samples=source.max_samples)
    operator_kwargs.setdefault("check_deterministic", False)
    return estimate_product_bytes(model, loss_fn, source, **operator_kwargs)


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
        extra = products.product_bytes
        log(f"memory estimate: Hessian-vector products: {_fmt(products.product_bytes)} "
            f"(method='auto', as {products.chosen}, from the first batch's "
            f"{_fmt(products.activation_bytes)} of saved activations)")
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
