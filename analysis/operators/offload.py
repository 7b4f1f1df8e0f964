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
  ``w`` on disk, also when the gradient raises. The copy is written once per state of the
  weights: each product first compares the operator's parameters with it, bit for bit
  (:meth:`ForwardDifferenceOffload.sync`), so one of them changed by any route (``p.data``
  updates bump no version counter) gets ``w`` rewritten and ``g(w)`` recomputed. The other
  parameters (outside ``params=`` or ``restricted``, frozen ones) and the buffers, which ``g(w)``
  depends on too, are watched by their version counters only, as without offloading: after a
  change through ``.data`` there, call ``clear_cache()``.

Memory saved: up to two vectors (measured 0.78 GB of the 1.0 GB on GPT-2 small); cost: writes of
``g(w)`` and ``w`` once per state of the weights, and per product two reads of ``w`` (the
comparison and the restore) and one of ``g(w)``, from the page cache when memory is free (on
GPT-2 small a 0.5 GB write cost about 1.3 s and a read 0.1-0.2 s). CPU parameters only
(contiguous, no two sharing memory: the in-place shifts would add up). The products are the
same numbers as without offloading, at weights changed through version-counted operations
(``tests/analysis/test_offload.py``). The model is modified during a product (not during the
other methods' products), so it must not be used concurrently; the weights are back, bit for
bit, when the product returns or raises (an interrupt during the restore itself can leave it
partly done).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
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
        params: the operator's parameter tensors (contiguous, on the CPU, one dtype, in its
            order).
        model: the module they belong to.
        signature: the operator's signature of the model's state, one ``(version, pointer)``
            entry per tensor of ``[*model.parameters(), *model.buffers()]`` in that order
            (:meth:`HessianOperator._state_signature`): it tells whether the stored ``g(w)`` is
            still that of the weights.

    Raises:
        ValueError: a parameter that is not on the CPU or not contiguous (named).
    """

    def __init__(self, params: list[torch.Tensor], model: Any, signature: Callable[[], tuple]):
        names = {id(p): n for n, p in model.named_parameters()}
        for p in params:
            if p.device.type != "cpu" or not p.is_contiguous():
                where = "on " + str(p.device) if p.device.type != "cpu" else "not contiguous"
                raise ValueError(f"offload='disk' needs contiguous parameters on the CPU; "
                                 f"{names.get(id(p), 'a parameter')!r} is {where}")
        spans = sorted((p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), i)
                       for i, p in enumerate(params) if p.numel())
        for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
            if start < end:  # two parameters over the same memory (tied through .data)
                raise ValueError(f"offload='disk' shifts parameters in place: "
                                 f"{names.get(id(params[a]), 'a parameter')!r} and "
                                 f"{names.get(id(params[b]), 'a parameter')!r} share memory, "
                                 "so their shifts would add up; tie them as one Parameter or "
                                 "use offload=None")
        self.params, self._signature = params, signature
        mine = {id(p) for p in params}  # which entries of a signature the shift bumps
        self._mine = [id(t) in mine for t in [*model.parameters(), *model.buffers()]]
        n = sum(p.numel() for p in params)
        # row 0: g(w), row 1: w; small buffers (only row-wise streaming is used)
        self.file = DiskBasis(n, 2, params[0].dtype, params[0].device,
                              buffer_bytes=_BUFFER_BYTES)
        self._before: Any = None  # the weights' signature when the last product began
        self._w_stored = False  # row 1 holds the parameters' bytes as last compared

    def sync(self) -> bool:
        """Make the file's copy of ``w`` that of the parameters now; True when it had to be
        (re)written: at the first product, or when a parameter changed since, bit for bit, by
        any route (then ``g(w)`` must be recomputed too). Called before every product and
        gradient; the comparison reads ``w`` back (cheaper than writing it)."""
        if self._w_stored and self.file.equal_tensors(1, self.params):
            return False
        self._w_stored = False  # (a write that fails leaves no copy trusted)
        self.file.write_tensors(1, self.params)
        self._w_stored = True
        return True

    def store_base(self, base: torch.Tensor) -> None:
        """Write ``g(w)`` (flat) to the file; returns ``None`` (nothing kept in memory)."""
        self.file.set_row(0, base)

    def subtract_base(self, out: torch.Tensor) -> torch.Tensor:
        """``out - g(w)`` in place, streamed from the file."""
        return self.file.add_row(out, 0, -1.0)

    @contextlib.contextmanager
    def shifted(self, parts: list[torch.Tensor], h: float) -> Iterator[None]:
        """The parameters at ``w + h v`` (``parts``: ``v`` per parameter) inside the block,
        restored bit for bit after it from the file's copy of ``w`` (:meth:`sync` first)."""
        self._before = self._signature()
        if not self._w_stored:
            self.sync()
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

    def still_valid(self, fd_base: Any) -> Any:
        """The operator's ``(signature, None)`` of the stored ``g(w)`` after a product: carried
        to the new version counters of the restored parameters when ``g(w)`` was that of the
        weights the product began with and nothing else (another parameter, a buffer) changed
        meanwhile; ``None`` (recompute) otherwise."""
        before, after = self._before, self._signature()
        if fd_base is None or fd_base[0] != before or len(after) != len(before):
            return None
        others_same = all(a == b for a, b, mine in zip(before, after, self._mine) if not mine)
        return (after, None) if others_same else None

    def close(self) -> None:
        self.file.close()
