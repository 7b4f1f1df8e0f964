"""The Hessian of an FSDP2-sharded model as an operator on sharded vectors (finite differences).

A model sharded with ``torch.distributed.fsdp.fully_shard`` holds its parameters as DTensors
split on dim 0: a double backward through them fails, and ``torch.func.functional_call``
bypasses the all-gathers, but a plain ``loss.backward()`` works and FSDP2 reduce-scatters its
gradient into the local shards. The product is therefore the central difference of gradients
of the live, sharded model (:mod:`analysis.operators.finite_difference` has the error model):

    H v  ~  (g(w + h v) - g(w - h v)) / (2 h),      h = r / ||v||,  r = fd_shift or u^(1/3),

where every rank shifts its own shards by ``h v_r`` in place (``||v||`` all-reduced, so ``h``
is the same on every rank), runs forward and backward over its batches, reads the local shard
of the reduce-scattered gradient, and restores its shards bitwise. The vectors are **sharded**:
``v`` and ``H v`` hold this rank's shards of every parameter, concatenated in
``named_parameters()`` order (length ``shards.local_numel``, which may differ per rank), so no
rank ever holds a full vector (:mod:`analysis.shards`).

The interface the Krylov code uses (:func:`~analysis.top_eigenpairs`,
:func:`~analysis.hessian_trace`, :func:`~analysis.spectral_density`):

* ``shape = (n, n)``: the global size, equal on every rank (so every rank takes the same
  decisions);
* :attr:`ShardedHessianOperator.shards`: a :class:`~analysis.shards.VectorShards` (the layout,
  ``sum`` to all-reduce the local parts of dot products and norms, the random draws that equal
  one process's); an operator without this attribute (or with ``None``) has replicated vectors.

Data: the dataset loss ``L = sum_b (t_b / T) L_b`` (:mod:`analysis.data`). With
``as_data(data, shard=True)`` every rank takes its own batches (batch ``i`` on rank ``i % W``,
``T`` all-reduced) and its loss is scaled by ``W`` to undo FSDP2's average over ranks; with
plain data every rank computes the loss of all of it (the same on every rank). A rank with
fewer batches runs zero-weight passes over its first batch, because every forward and backward
of an FSDP2 model is a collective.

Memory per rank: the shifted shards' backup, two gradients and the result (four ``n_r``-vectors)
plus the working memory of one FSDP2 gradient (one unit's full parameters at a time).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import distributed as dist
from ..checks import check_first_batch
from ..data import Data, as_data, microbatches, to_device
from ..evaluation import forward, model_mode, resolve_loss
from ..losses import LossSpec, loss_terms
from ..precision import autocast_disabled
from ..shards import VectorShards
from .empirical_risk import check_operator_settings
from .finite_difference import check_shift, finite_difference_step
from .protocol import TorchOperator


class ShardedHessianOperator(TorchOperator):
    """The Hessian of the dataset loss of an FSDP2-sharded model, on sharded vectors.

    Built by :class:`~analysis.HessianOperator` itself when the model's parameters are
    DTensors (``HessianOperator(fsdp_model, loss_fn, data)``, also through
    :func:`~analysis.top_eigenpairs` and the other algorithms called with a model); every rank
    must build it, with the same arguments, and take every product (they are collectives).

    Args:
        model: the model after ``fully_shard`` (every trainable parameter a DTensor with
            ``Shard(0)`` on one 1-D mesh).
        loss_fn: as for :class:`~analysis.HessianOperator`.
        data: as for :class:`~analysis.HessianOperator`; ``as_data(data, shard=True)`` to give
            every rank its own batches (see the module docstring).
        params: only ``None`` (every trainable parameter).
        mode, check_deterministic, batch_size, microbatch_size: as for
            :class:`~analysis.HessianOperator`.
        method: ``"auto"`` or ``"finite-difference"`` (both give finite differences: the one
            product that works on DTensor parameters).
        fd_shift: ``r = ||h v||`` (``None``: ``u^(1/3)``, ``u`` the unit roundoff).

    Attributes:
        shape: ``(n, n)``, the global size (equal on every rank).
        shards: the :class:`~analysis.shards.VectorShards` of the vectors (length
            ``shards.local_numel`` on this rank).
        device, dtype: those of the local shards; vectors must match them.
        method: ``"finite-difference"``; :attr:`requested_method` what was asked.
        fd_step: the step ``h`` of the last product.
        num_terms, num_samples: ``T`` and the samples over all ranks.

    Raises:
        ValueError: a product method that needs a double backward or forward-mode derivatives
            (``"double-backward"``, ``"forward-over-reverse"``, ``"cached-graph"``), a
            parameter subset, parameters that are not ``Shard(0)`` DTensors, or a rank without
            a batch (sharded data with fewer batches than ranks).
    """

    METHODS = ("auto", "finite-difference")

    def __init__(self, model: nn.Module, loss_fn: LossSpec, data: Data, *,
                 params: Any = None, mode: str | None = "eval", check_deterministic: bool = True,
                 batch_size: int | None = None, method: str = "auto",
                 fd_shift: float | None = None, microbatch_size: int | None = None) -> None:
        if method not in self.METHODS:
            raise ValueError(
                f"method={method!r} cannot run on an FSDP2-sharded model: its parameters are "
                "DTensors, and a double backward (or forward-mode derivative) through FSDP2's "
                "all-gathers is not supported; use method='finite-difference' (or 'auto', "
                f"which picks it): one of {self.METHODS}")
        if params is not None:
            raise ValueError(f"params={params!r}: a parameter subset is not supported on an "
                             "FSDP2-sharded model (pass params=None)")
        check_operator_settings(mode, microbatch_size)
        check_shift(fd_shift)
        self.model, self.mode = model, mode
        self.loss_fn = resolve_loss(loss_fn)
        self.source = as_data(data, batch_size=batch_size)
        self.microbatch_size = microbatch_size
        self._params = [p for _, p in model.named_parameters() if p.requires_grad]
        self.shards = VectorShards.from_parameters(
            [(n, p) for n, p in model.named_parameters() if p.requires_grad])
        local = self._params[0].to_local()
        self.device, self.dtype = local.device, local.dtype
        self.method, self.requested_method = "finite-difference", method
        self.fd_shift, self.fd_step = fd_shift, None
        self.num_matvecs = 0
        self._local = list(self._iterate()) if self.source.in_memory else None
        self._count_batches()
        check_first_batch(model, self.loss_fn, self.source, mode,
                          where="ShardedHessianOperator()", deterministic=check_deterministic)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)`` with ``n`` the global number of parameter entries."""
        return (self.shards.global_numel, self.shards.global_numel)

    def _iterate(self) -> Iterator[tuple[Any, Any, int]]:
        """``(inputs, targets, loss terms)`` of this rank's batches (microbatches), on the
        parameters' device."""
        for b in self.source:
            x = to_device(b.inputs, self.device, self.dtype)
            y = to_device(b.targets, self.device, self.dtype)
            for xm, ym, size in microbatches(x, y, b.size, self.microbatch_size):
                yield xm, ym, loss_terms(self.loss_fn, xm, ym, size)

    def _batches(self) -> Iterator[tuple[Any, Any, int]]:
        return iter(self._local) if self._local is not None else self._iterate()

    def _count_batches(self) -> None:
        """``T``, the samples and the number of passes (equal on every rank), checked."""
        batches = terms = samples = 0
        for b in self.source:
            samples += b.size
        for _, _, t in self._batches():
            batches, terms = batches + 1, terms + t
        per_rank = dist.all_gather_object((batches, terms, samples))
        empty = [r for r, (nb, _, _) in enumerate(per_rank) if nb == 0]
        if empty:
            raise ValueError(f"rank{'s' if len(empty) > 1 else ''} "
                             f"{', '.join(map(str, empty))} got no batch (fewer batches than "
                             "ranks?); every rank of an FSDP2 model must run the forward passes")
        if self.source.shard:
            self.num_terms = sum(t for _, t, _ in per_rank)
            self.num_samples = sum(s for _, _, s in per_rank)
            self._scale = float(len(per_rank))  # FSDP2 averages the gradients over ranks
        else:
            differ = [r for r, c in enumerate(per_rank) if c != per_rank[0]]
            if differ:
                raise ValueError(f"the data differs across ranks: rank {differ[0]} has "
                                 f"(batches, loss terms, samples) = {per_rank[differ[0]]}, rank 0 "
                                 f"{per_rank[0]}; give every rank the same data, or shard it "
                                 "with as_data(data, shard=True)")
            self.num_terms, self.num_samples, self._scale = terms, samples, 1.0
        self._passes = max(nb for nb, _, _ in per_rank)

    def gradient(self) -> torch.Tensor:
        """This rank's shards of the gradient of the dataset loss (``shards.local_numel``
        entries): a forward and backward of the sharded model per batch (collectives)."""
        for p in self._params:
            p.grad = None
        batches = self._batches()
        first = None
        with autocast_disabled(), model_mode(self.model, self.mode), torch.enable_grad():
            for _ in range(self._passes):
                item = next(batches, None)
                first = first or item
                x, y, terms = item if item is not None else (first[0], first[1], 0)
                loss = self.loss_fn(forward(self.model, x), y)
                if loss.dim() != 0:
                    raise ValueError("loss_fn must return a scalar (the batch mean), got shape "
                                     f"{tuple(loss.shape)}")
                (loss * (self._scale * terms / self.num_terms)).backward()
        out = torch.cat([(p.grad.to_local() if p.grad is not None
                          else torch.zeros_like(p.to_local())).reshape(-1)
                         for p in self._params])
        for p in self._params:
            p.grad = None
        return out

    def _check_length(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.shards.local_numel,):
            raise ValueError(f"expected this rank's shards, a vector of shape "
                             f"({self.shards.local_numel},) (the global n is {self.shape[0]}), "
                             f"got {tuple(v.shape)}")
        return v

    def _check_block(self, V: torch.Tensor) -> None:
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shards.local_numel:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"expected this rank's rows, an ({self.shards.local_numel}, k) "
                             f"matrix, got {shape}")

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        # in the working precision, as HessianOperator's step: it needs ~3 digits
        v_norm = math.sqrt(self.shards.sum(float(torch.linalg.vector_norm(v)) ** 2))
        if not math.isfinite(v_norm):
            raise ValueError("the vector is not finite (it contains inf or nan)")
        if v_norm == 0:  # the same on every rank: no rank runs the passes
            return torch.zeros_like(v)
        h = self.fd_step = finite_difference_step(v_norm, self.dtype, self.fd_shift)
        shards = [p.to_local() for p in self._params]  # views of FSDP2's sharded storage
        parts = torch.split(v.detach(), [t.numel() for t in shards])
        saved = [t.detach().clone() for t in shards]
        try:
            with torch.no_grad():
                for t, s, d in zip(shards, saved, parts):
                    t.copy_(s).add_(d.view_as(t), alpha=h)
            plus = self.gradient()
            with torch.no_grad():
                for t, s, d in zip(shards, saved, parts):
                    t.copy_(s).add_(d.view_as(t), alpha=-h)
            minus = self.gradient()
        finally:
            with torch.no_grad():
                for t, s in zip(shards, saved):
                    t.copy_(s)
        out = plus.sub_(minus).div_(2 * h)
        if self.shards.sum(0.0 if bool(torch.isfinite(out).all()) else 1.0) > 0:
            raise FloatingPointError("ShardedHessianOperator: the product is not finite on some "
                                     "rank (inf/nan in the loss, its gradient or the vector)")
        return out

    def to_scipy(self) -> Any:
        """Not available: the vectors are sharded over ranks (scipy needs a full vector)."""
        raise TypeError("a ShardedHessianOperator takes sharded vectors; scipy's operators "
                        "need the full vector on one process")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.shape[0]}, local={self.shards.local_numel}, "
                f"device={self.device}, dtype={self.dtype}, num_matvecs={self.num_matvecs})")
