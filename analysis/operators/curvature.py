"""Curvature operators of the dataset loss: the common base and the generalized Gauss-Newton.

:class:`CurvatureOperator` joins the empirical risk (:class:`~analysis.operators.EmpiricalRisk`:
data, weighting, all-reduce, checks) and the torch operator protocol
(:class:`~analysis.operators.TorchOperator`); a subclass only says how to multiply one batch,
``_batch_product``. :class:`GGNOperator` computes ``G v = J^T H_out J v`` (``J`` the Jacobian of
the network outputs, ``H_out`` the Hessian of the loss in the outputs), which for cross-entropy
and mean squared error is positive semi-definite; the Hessian is in
:mod:`analysis.operators.hessian`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import jvp

from ..data import Data, batch_size_of
from ..evaluation import resolve_loss
from ..losses import LossSpec, ModelLoss, logits_of, loss_terms
from ..uncertainty import split_samples
from .empirical_risk import EmpiricalRisk, functional_forward
from .protocol import TorchOperator

#: Probe memory the default block size aims at (the products' working memory comes on top).
BLOCK_BYTES = 256 * 2**20


def default_block_size(n: int, itemsize: int = 4, *, max_block: int = 16) -> int:
    """Columns per batched product: ``clamp(BLOCK_BYTES // (4 n itemsize), 1, max_block)``.

    Four ``n``-vectors per column (the probes, their products and the tangents of a batched
    forward-over-reverse pass) within :data:`BLOCK_BYTES` (256 MiB): 16 up to ~1M float32
    parameters, 1 from ~16M.
    """
    return int(max(1, min(max_block, BLOCK_BYTES // max(1, 4 * n * itemsize))))


class CurvatureOperator(EmpiricalRisk, TorchOperator):
    """Base class: a symmetric ``n x n`` curvature matrix of the dataset loss, applied to vectors.

    Subclasses implement :meth:`_batch_product` (the weighted product of one batch). The data
    handling (batches moved to the device once and cached for tensor pairs and lists of
    batches; a DataLoader is re-iterated), exact sample weighting, the distributed all-reduce,
    mode handling and the checks come from :class:`~analysis.operators.EmpiricalRisk`; input
    validation, the matvec counter, ``@`` and ``to_scipy`` from
    :class:`~analysis.operators.TorchOperator`.

    Args and the data attributes (``space``, ``num_samples``, ``num_terms``, ...): those of
    :class:`~analysis.operators.EmpiricalRisk`.

    Attributes:
        shape: ``(n, n)``.
        device, dtype: those of the parameters; vectors must match them.
        num_matvecs: products computed so far (a matrix of ``k`` columns counts ``k``).
    """

    num_matvecs = 0  # per instance from the first product on

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)`` with ``n`` the size of the parameter space."""
        return (self.space.numel, self.space.numel)

    def restricted(self, params: Sequence[str | nn.Parameter]) -> CurvatureOperator:
        """The same operator (class, loss, data, mode, settings; the product method, a settled
        ``"auto"``'s choice included) on the parameters ``params`` only: its diagonal block ``C_pp``. The setup was checked already, so the new operator
        does not repeat :func:`check_deterministic_setup`."""
        return type(self)(self.model, self.loss_fn, self._data, params=params, mode=self.mode,
                          check_deterministic=False, batch_size=self._batch_size,
                          microbatch_size=self.microbatch_size, **self._extra_settings())

    def _extra_settings(self) -> dict:
        """Constructor keywords of a subclass beyond the common ones (for :meth:`restricted`)."""
        return {}

    def _check_length(self, v: torch.Tensor) -> torch.Tensor:
        return self.space.check_vector(v)

    def _batch_product(self, state, v_dict, x, y, weight, key=None):
        """``weight * C_b v`` for one batch as a flat vector. ``key`` is the position of a
        cached in-memory batch (``None`` for a loader batch or the slow error path)."""
        raise NotImplementedError

    # -- the product --------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for a flat vector ``v`` of shape ``(n,)`` (the model's device and dtype).

        Raises:
            TypeError / ValueError: for a vector of the wrong type, dtype, device or length.
            FloatingPointError: if the product is not finite (names the first bad batch).
        """
        return super().matvec(v)

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        v_dict = dict(zip(self._names, self.space.unflatten(v.detach())))
        with self._context():
            out = self._weighted_sum(
                lambda state, x, y, weight, key: self._batch_product(state, v_dict, x, y, weight, key),
                lambda: torch.zeros(self.shape[0], device=self.device, dtype=self.dtype))
        return self._finite(out, v)

    def unit_products(self, V: torch.Tensor, reduce: Callable[[int, torch.Tensor], Any], *,
                      groups: int = 1) -> list[Any]:
        """``[reduce(N_u, C_u V) for each sampling unit u of this rank]`` in one pass over the data.

        The units are the batches (``groups=1``) or each batch split into ``groups`` contiguous
        groups of samples (:func:`analysis.uncertainty.split_samples`); ``N_u`` counts a unit's
        loss terms (units without any are skipped) and ``C_u V`` is the ``(n, b)`` product with
        the curvature of the unit's mean loss, so ``C V = sum_u (N_u / N) C_u V``. Used for
        data-sampling standard errors (:mod:`analysis.uncertainty`). Counts ``b`` matvecs (the
        same samples as one ``matmat``; cached in-memory batches reuse their cached graphs
        when ``groups=1``).
        """
        self._check_block(V)
        resolve = getattr(self, "resolve_method", None)
        if resolve is not None:
            resolve()
        out = []
        V = V.detach()
        with self._context():
            state = self._state()
            self._prepare()
            for pos, (x, y, size, _index) in enumerate(self._batches()):
                parts = split_samples(x, y, batch_size_of(y), groups)
                for xu, yu, nu in parts:
                    terms = size if len(parts) == 1 else loss_terms(self.loss_fn, xu, yu, nu)
                    if terms <= 0:
                        continue
                    cached = len(parts) == 1 and self._cached is not None
                    weight, key = (size / self.num_terms, pos) if cached else (1.0, None)
                    out.append(reduce(terms, self._unit_block(state, V, xu, yu, weight, key)))
        self.num_matvecs += V.shape[1]
        return out

    def _unit_block(self, state, V, x, y, weight, key) -> torch.Tensor:
        """``C_u V`` of one unit as an ``(n, b)`` block, a column at a time (the product is taken
        with ``weight``, as the cached graph of batch ``key`` was built, and divided by it)."""
        cols = []
        for i in range(V.shape[1]):
            v_dict = dict(zip(self._names, self.space.unflatten(V[:, i])))
            part = self._batch_product(state, v_dict, x, y, weight, key)
            cols.append(part if isinstance(part, torch.Tensor) else self.space.flatten(part))
        return torch.stack(cols, 1).div_(weight)

    def _finite(self, out: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # the sum is not finite when an entry is not (one read, no n-sized boolean temporary:
        # 24 ms -> 4 ms at 11M parameters); a finite vector whose sum overflows is checked fully
        if bool(torch.isfinite(out.sum())) or bool(torch.isfinite(out).all()):
            return out
        v_dict = dict(zip(self._names, self.space.unflatten(v.detach())))
        self._locate_nonfinite(
            lambda state, x, y, weight, key: self._batch_product(state, v_dict, x, y, weight))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, device={self.device}, dtype={self.dtype}, "
            f"mode={self.mode!r}, num_matvecs={self.num_matvecs})"
        )


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix of the dataset loss, ``v -> G v``.

    ``G = sum_b (n_b / N) J_b^T H_out,b J_b`` with ``J_b`` the Jacobian of the network outputs on
    batch ``b`` in the parameters and ``H_out,b`` the Hessian of the batch-mean loss in the
    outputs. For cross-entropy and mean squared error ``H_out`` is positive semi-definite, so
    ``G`` is too; for a model that is linear in its parameters ``G = H``. Each product costs
    one Jacobian-vector product, one loss-Hessian product in output space and one
    vector-Jacobian product. Arguments and attributes are those of :class:`CurvatureOperator`.
    """

    def __init__(self, model: nn.Module, loss_fn: LossSpec, data: Data, *,
                 params: Sequence[str | nn.Parameter | nn.Module] | re.Pattern | None = None,
                 mode: str | None = "eval", check_deterministic: bool = True,
                 batch_size: int | None = None, microbatch_size: int | None = None) -> None:
        if isinstance(resolve_loss(loss_fn), ModelLoss):
            raise TypeError(
                "GGNOperator needs a loss of the model outputs (e.g. 'lm' or 'cross_entropy'), "
                f"not the model's own loss {loss_fn!r}"
            )
        super().__init__(model, loss_fn, data, params=params, mode=mode,
                         check_deterministic=check_deterministic, batch_size=batch_size,
                         microbatch_size=microbatch_size)
        self.method = "forward-over-reverse"
        self.fallback_reason: str | None = None

    def _batch_product(self, state, v_dict, x, y, weight, key=None):
        model = self.model
        names = self._names
        with torch.enable_grad():
            leaves = [state[n].detach().requires_grad_(True) for n in names]
            out = logits_of(functional_forward(model, {**state, **dict(zip(names, leaves))}, x))
            jv = self._jvp(state, v_dict, x, out, leaves)
            # H_out (J v) by double backward in output space (cheap: outputs only)
            o = out.detach().requires_grad_(True)
            loss = self.loss_fn(o, y)
            if loss.dim() != 0:
                raise ValueError(
                    f"loss_fn must return a scalar (the batch mean), got shape {tuple(loss.shape)}"
                )
            (g,) = torch.autograd.grad(loss * weight, o, create_graph=True)
            (hjv,) = torch.autograd.grad(g, o, grad_outputs=jv, allow_unused=True)
            if hjv is None:
                hjv = torch.zeros_like(out)
            gv = torch.autograd.grad(out, leaves, grad_outputs=hjv.detach(), allow_unused=True)
        return list(gv)

    def _jvp(self, state, v_dict, x, out, leaves):
        """``J v``: forward mode, or the double-vjp trick when forward AD is unavailable."""
        if self.method == "forward-over-reverse":
            primals = {n: state[n] for n in self._names}
            try:
                with torch.no_grad():
                    _, jv = jvp(lambda p: logits_of(functional_forward(self.model, {**state, **p}, x)),
                                (primals,), (v_dict,))
                return jv
            except (NotImplementedError, RuntimeError) as err:
                self.method = "double-vjp"
                self.fallback_reason = f"{type(err).__name__}: {err}"
        u = torch.zeros_like(out, requires_grad=True)
        vjps = torch.autograd.grad(out, leaves, grad_outputs=u, create_graph=True, allow_unused=True)
        pairs = [(g, v_dict[n]) for g, n in zip(vjps, self._names) if g is not None and g.requires_grad]
        (jv,) = torch.autograd.grad([g for g, _ in pairs], u, grad_outputs=[w for _, w in pairs],
                                    retain_graph=True)
        return jv.detach()


def directional_curvature(op: CurvatureOperator | Callable[[torch.Tensor], torch.Tensor],
                          d: torch.Tensor) -> float:
    """Curvature of the loss along a direction: ``d^T H d / ||d||^2`` (MSAM paper, App. A.4).

    Args:
        op: a curvature operator (or any callable ``v -> H v``).
        d: a flat direction (any nonzero length-``n`` vector; e.g. the momentum buffer).

    Returns:
        The Rayleigh quotient as a Python float (one matvec). On an operator with sharded
        vectors (``op.shards``, an FSDP2 model: ``d`` is this rank's shards) both inner products
        are summed over the ranks.

    Raises:
        ValueError: for a zero direction.
    """
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"d must be a torch.Tensor, got {type(d).__name__}")
    if isinstance(op, CurvatureOperator):
        d = d.to(device=op.device, dtype=op.dtype)
    shards = getattr(op, "shards", None)
    total = (lambda t: t) if shards is None else shards.sum
    nrm2 = total(torch.dot(d, d).double())
    if not bool(nrm2 > 0):
        raise ValueError("the direction d is zero; its curvature is undefined")
    hd = op @ d
    return float(total(torch.dot(d, hd).double()) / nrm2)
