"""Forward-difference products with their two kept vectors on disk (``offload="disk"``).

A forward-difference product ``H v ~ (g(w + h v) - g(w)) / h``
(:class:`~analysis.operators.hessian.HessianOperator`, ``method="forward-difference"``) holds,
beside the model and one gradient's working memory, two vectors of ``n`` numbers: the kept
dataset gradient ``g(w)`` and the shifted parameters ``w + h v`` (``functional_call`` at a
copy). With ``offload="disk"`` neither stays in memory:

* ``g(w)`` is written to an unlinked temporary file once (per state of the weights) and
  subtracted from each product slab by slab (:meth:`analysis.disk_basis.DiskBasis.add_row`);
* the model's own parameters are shifted in place, ``p <- p + (h v_p)`` (the same rounding as the
  copy ``p + h v_p``), for the product's gradients, and restored **bit for bit** from a copy of
  ``w`` on disk (written once per state of the weights), also when the gradient raises.

Memory saved: two vectors (1.0 GB on GPT-2 small, 2.8 GB on medium); cost: a write of ``w`` and of
``g(w)`` once, and per product a read of each (from the page cache when memory is free). The
products are the same numbers as without offloading (``tests/analysis/test_offload.py``). The
model is modified during a product (not during the other methods' products), so it must not be
used concurrently; the weights are back, bit for bit, when the product returns or raises.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from ..disk_basis import DiskBasis

__all__ = ["OFFLOADS", "ForwardDifferenceOffload", "check_offload"]

_SLAB = 1 << 20  # entries per slab of the in-place shift
_BUFFER_BYTES = 8 * 2**20  # the file's slab buffers (row-wise streaming only)

#: The values of ``HessianOperator(offload=)``: ``None`` (in memory) or ``"disk"``.
OFFLOADS = (None, "disk")


def check_offload(offload: Any, method: str, sharded: bool = False) -> None:
    """Raise ``ValueError`` unless ``offload`` is ``None`` or ``"disk"`` with
    ``method="forward-difference"`` on an unsharded model."""
    if offload not in OFFLOADS:
        raise ValueError(f"offload must be None or 'disk', got {offload!r}")
    if offload is not None and method != "forward-difference":
        raise ValueError(f"offload={offload!r} keeps g(w) and the weights of forward differences "
                         f"on disk: it needs method='forward-difference', got method={method!r}")
    if offload is not None and sharded:
        raise ValueError("offload='disk' is for unsharded models (an FSDP2 model's products "
                         "shift its shards through analysis.operators.sharded)")


class ForwardDifferenceOffload:
    """``g(w)`` and ``w`` of forward-difference products in an unlinked temporary file.

    Args:
        params: the operator's parameter tensors (one device and dtype, in its order).
    """

    def __init__(self, params: list[torch.Tensor]):
        self.params = params
        p0 = params[0]
        if p0.device.type != "cpu":
            raise ValueError(f"offload='disk' needs parameters on the CPU, got {p0.device}")
        n = sum(p.numel() for p in params)
        # row 0: g(w), row 1: w; small buffers (only row-wise streaming is used)
        self.file = DiskBasis(n, 2, p0.dtype, p0.device, buffer_bytes=_BUFFER_BYTES)
        self.base_state: Any = None  # the weights' signature of the stored g(w)
        self.w_state: Any = None  # the weights' signature of the stored w

    def store_base(self, base: torch.Tensor, state: Any) -> None:
        """Keep ``g(w)`` (flat) on disk for the weights of signature ``state``."""
        self.file.set_row(0, base)
        self.base_state = state

    def subtract_base(self, out: torch.Tensor) -> torch.Tensor:
        """``out - g(w)`` in place, streamed from the file."""
        return self.file.add_row(out, 0, -1.0)

    @contextlib.contextmanager
    def shifted(self, parts: list[torch.Tensor], h: float, state: Any) -> Iterator[None]:
        """The parameters at ``w + h v`` (``parts``: ``v`` per parameter) inside the block,
        restored bit for bit from the copy of ``w`` on disk after it (written first unless the
        stored copy is of the weights' signature ``state``)."""
        if self.w_state != state:
            self.w_state = None
            self.file.write_tensors(1, self.params)
        try:
            with torch.no_grad():  # slab by slab: no temporary of a whole parameter
                for p, d in zip(self.params, parts):
                    flat, dv = p.view(-1), d.reshape(-1)
                    for a in range(0, flat.numel(), _SLAB):
                        flat[a:a + _SLAB].add_(h * dv[a:a + _SLAB].to(p.dtype))
            yield
        finally:
            with torch.no_grad():
                self.file.read_tensors(1, self.params)
            self.w_state = state

    def restored_state(self, state_before: Any, state_after: Any) -> None:
        """After a shift and its bitwise restore the weights are those of ``state_before`` under
        new version counters ``state_after``: the stored copies stay valid."""
        if self.base_state == state_before:
            self.base_state = state_after
        if self.w_state == state_before:
            self.w_state = state_after

    def close(self) -> None:
        self.file.close()
