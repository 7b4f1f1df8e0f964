"""The Hessian of the dataset loss as a linear operator, by three product methods or the fastest.

``H v = sum_b (n_b / N) H_b v`` (the weighting is :class:`~analysis.operators.EmpiricalRisk`'s);
each ``H_b v`` is computed by forward-over-reverse differentiation::

    H_b v = jvp(grad(L_b), (w,), (v,))        # torch.func.jvp of torch.func.grad over functional_call

by reverse-over-reverse (double backward, ``grad(<grad L_b, v>)``), or by one backward pass
through a cached first-order graph; ``method="auto"`` times them on the first batch and keeps the
fastest (:mod:`analysis.operators.auto`).

Import it from the package: ``from analysis import HessianOperator``.

Example:
    >>> import torch
    >>> from analysis import HessianOperator, directional_curvature
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> H = HessianOperator(model, "cross_entropy", (x, y))
    >>> v = torch.randn(H.shape[0])
    >>> Hv = H @ v
    >>> c = directional_curvature(H, v)      # v^T H v / ||v||^2 (paper A.4)
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from ..data import Data
from ..losses import LossSpec
from ..shards import has_dtensor_parameters
from .auto import AutoChoice, choose_method, first_graph, graphs_fit
from .curvature import CurvatureOperator, default_block_size
from .empirical_risk import functional_forward
from .finite_difference import check_shift, finite_difference_step
from .offload import ForwardDifferenceOffload, check_offload


class _InitSignature:
    """``inspect.signature(cls)``: the arguments of ``cls.__init__`` (without ``self``), not
    those of a dispatching ``__new__``; an instance gets ``None`` (no signature of its own)."""

    def __get__(self, obj: Any, cls: type) -> Any:
        if obj is not None:
            return None
        sig = inspect.signature(cls.__init__)
        return sig.replace(parameters=list(sig.parameters.values())[1:])


class HessianOperator(CurvatureOperator):
    """The Hessian of the dataset loss as a linear operator, ``v -> H v``.

    ``H v = sum_b (n_b / N) H_b v`` with ``H_b`` the Hessian of the batch-mean loss of batch
    ``b``. How each ``H_b v`` is computed (``method``):

    * ``"forward-over-reverse"``: ``torch.func.jvp(torch.func.grad(L_b), (w,), (v,))`` over
      ``torch.func.functional_call`` (parameters and buffers passed explicitly); about two to
      three gradients per product and no state kept between products. Falls back to
      ``"double-backward"`` when forward-mode AD fails (an operator without a forward-mode
      derivative); the reason is kept in :attr:`fallback_reason`.
    * ``"double-backward"``: ``grad(<grad L_b, v>)`` by reverse-over-reverse.
    * ``"cached-graph"``: the first-order graph ``g_b = grad L_b`` is built once (with
      ``create_graph=True``) and every product is one backward pass through it,
      ``H_b v = grad(g_b, w, grad_outputs=v)``, which skips the forward and first backward pass
      (about 1.5-2.5 gradients per product on CPU). It keeps the graph of every in-memory batch
      alive (a few times the activation memory), and is rebuilt automatically when a
      parameter or buffer of the model is changed in place (tracked by tensor versions).
    * ``"finite-difference"``: ``H_b v ~ (g_b(w + h v) - g_b(w - h v)) / (2 h)``, two
      gradients of the batch at shifted copies of the parameters (``functional_call``: the
      model itself is never modified), with ``h = r / ||v||`` (a shift of length ``r``) and
      ``r = fd_shift`` (default ``u^(1/3)``, ``u`` the unit roundoff of the parameters'
      dtype). Approximate: error ``(h^2 / 6) D^3 g[v, v, v] + O(u ||g|| / h)``, measured
      ``4e-11``-``3e-10`` relative in float64 and ``3e-5``-``2e-4`` in float32
      (:mod:`analysis.operators.finite_difference` has the error model). The one method that
      needs only a gradient: no second-order graph, no forward-mode derivative, the working
      memory of one gradient (the shifted copy, the two gradients and the result: four
      ``n``-vectors). Never chosen by ``"auto"``; :attr:`fd_step` holds the last step.
    * ``"forward-difference"``: ``H v ~ (g(w + h v) - g(w)) / h`` with the dataset gradient
      ``g(w)`` computed once (by :meth:`gradient`, which then returns it: Lanczos's start
      vector costs nothing more) and kept while the parameters do not change: one gradient per
      product, one more ``n``-vector kept. First-order error ``(h / 2) D^2 g[v, v]`` plus
      rounding ``O(u ||g|| / h)``, so ``r = fd_shift`` defaults to ``u^(1/2)`` (float32 2.4e-4;
      :mod:`analysis.operators.finite_difference`). The per-unit products of the data-sampling
      standard errors (:meth:`unit_products`) use central differences (the units' own
      gradients at ``w`` are not kept). Never chosen by ``"auto"``.
    * ``"auto"`` (default): chosen at the first product, on its first batch and with the user's
      own vector, for at most one extra product of that batch
      (:mod:`analysis.operators.auto`): the first batch's first-order graph is built and the
      user's vector sent back through it (that is the first batch's product, kept; double
      backward costs the two, the cached graph the backward alone), then forward-over-reverse
      is timed once on the same batch, and the fastest is kept. The cached graph competes for
      in-memory data when at least the first batch's graph fits in the cache budget
      (:func:`~analysis.operators.cache_budget`: a sixteenth of the memory available on the
      device unless :data:`~analysis.operators.CACHE_BYTES` is set; estimated from the
      tensors the first batch's graph saves); it then keeps the graphs of the first
      :attr:`cache_batches` batches that fit together, and the other batches build theirs at
      every product and free it, as double backward does (their share of the build is added
      to its timing). A method that
      cannot run on the model (no forward-mode or double-backward derivative) is skipped; an
      error of the user's loss or model is raised. When the first use is ``op @ V`` for a
      block, the batched variants are compared on the first block, per column. A
      :meth:`gradient` before the first product builds the graphs the cached graph would (the
      first batch's always, the others' when they fit), so the choice reuses them. The choice,
      the timings and the reasons are kept in :attr:`auto_choice`
      (:class:`~analysis.operators.AutoChoice`); :attr:`method` is the method in use
      from then on. The first product, the choice included, costs 9.6-11.5 gradients on a
      GPT of 3.3M parameters (CPU; 26.7-28.2 when every method was timed twice); pass
      ``method=`` to skip the choice.

    An FSDP2-sharded model (DTensor parameters, ``fully_shard``) gets a
    :class:`~analysis.operators.ShardedHessianOperator` instead: finite differences of FSDP2
    gradients on sharded vectors (this rank's shards), ``"auto"`` or ``"finite-difference"``
    only (:mod:`analysis.operators.sharded`).

    Piecewise-linear networks (ReLU, max-pooling): autograd differentiates each kink as the
    derivative of one of its sides, so ``H`` is the curvature inside the linear region of ``w``
    and misses the kinks between regions, which the loss crosses at any finite step. On a
    trained two-hidden-layer ReLU MLP (32 samples) ``lambda_max`` is 0.159 while the top
    eigenvalue of the finite-difference operator ``v -> (g(w + h v) - g(w - h v)) / 2h`` is 1.90
    at ``h = 1e-3`` (0.159 at ``h = 1e-6``, where no kink is crossed); issue 27 measured about
    3190 against ``lambda_max`` 1276 on a ResNet-18. Read sharpness from such Hessians as that
    of the region, and use the loss-based measures (:mod:`analysis.sharpness`) for finite radii.

    ``fd_shift``: ``r = ||h v||`` of ``"finite-difference"`` (``None``: ``u^(1/3)``; a number
    in ``(0, 1)`` otherwise). ``microbatch_size``: split every batch into slices of at most this
    many samples for the products (:class:`~analysis.operators.EmpiricalRisk`), so that a
    product's working memory is one slice's; ``"auto"`` then leaves the cached graph out (it
    would keep the graphs of all slices) and ``method="cached-graph"`` is refused. ``offload="disk"``
    (``"forward-difference"`` only): ``g(w)`` and ``w`` on disk, the parameters shifted in place
    and restored bit for bit (:mod:`analysis.operators.offload`; two vectors less in memory).

    Other arguments and attributes are those of :class:`CurvatureOperator`; :attr:`method` holds
    the method in use (``"auto"`` until the first product), :attr:`requested_method` the one
    asked for, :attr:`auto_choice` what ``"auto"`` chose and why (``None`` otherwise).

    Example:
        >>> H = HessianOperator(model, "cross_entropy", (x, y))      # doctest: +SKIP
        >>> Hv = H @ torch.randn(H.shape[0])                          # doctest: +SKIP
        >>> H.method, H.auto_choice.timings                           # doctest: +SKIP
    """

    METHODS = ("auto", "forward-over-reverse", "double-backward", "cached-graph",
               "finite-difference", "forward-difference")

    def __new__(cls, model: Any = None, *args: Any, **kwargs: Any) -> Any:
        # an FSDP2-sharded model (DTensor parameters): the finite-difference operator on sharded
        # vectors (analysis.operators.sharded), which refuses the other product methods
        if cls is HessianOperator and has_dtensor_parameters(model):
            from .sharded import ShardedHessianOperator

            check_offload(kwargs.pop("offload", None), kwargs.get("method", "auto"), sharded=True)

            return ShardedHessianOperator(model, *args, **kwargs)
        return super().__new__(cls)

    __signature__ = _InitSignature()

    def __init__(self, model: nn.Module, loss_fn: LossSpec, data: Data, *,
                 params: Sequence[str | nn.Parameter | nn.Module] | re.Pattern | None = None,
                 mode: str | None = "eval", check_deterministic: bool = True,
                 batch_size: int | None = None, method: str = "auto",
                 fd_shift: float | None = None, microbatch_size: int | None = None,
                 offload: str | None = None) -> None:
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        check_offload(offload, method)
        check_shift(fd_shift)
        if method == "cached-graph" and microbatch_size is not None:
            raise ValueError(
                f"method='cached-graph' keeps the graph of every batch, so microbatch_size="
                f"{microbatch_size!r} would not bound the memory; use another method"
            )
        super().__init__(model, loss_fn, data, params=params, mode=mode,
                         check_deterministic=check_deterministic, batch_size=batch_size,
                         microbatch_size=microbatch_size)
        if method == "cached-graph" and self._cached is None:
            raise ValueError(
                "method='cached-graph' needs in-memory data (a tensor pair, a dict batch or a "
                "list of batches), not a DataLoader"
            )
        self.method = method
        self.requested_method = method
        self.fd_shift, self.offload = fd_shift, offload
        self._offload = ForwardDifferenceOffload(self.space.params, model, self._state_signature) \
            if offload else None
        self.fd_step: float | None = None  # the step h of the last finite-difference product
        self._fd_base: tuple | None = None  # forward differences: (state signature, g(w))
        self._fd_plus = False  # inside a forward-difference pass: batches give g_b(w + h v)
        self.auto_choice: AutoChoice | None = None  # filled at the first product under "auto"
        self.fallback_reason: str | None = None
        self.batched_fallback_reason: str | None = None  # why matmat loops, if it does
        self._graphs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        #: under "cached-graph", how many leading in-memory batches keep their graph (``None``:
        #: all; "auto" sets the number whose graphs fit in the cache budget, the other batches
        #: then build theirs for each product, as double backward does, and free it)
        self.cache_batches: int | None = None
        self._signature: tuple | None = None
        self._first_graph_stats: tuple[float, int] | None = None  # batch 0's build s, bytes
        self._calibration_part = None  # the first batch's product computed by the choice
        loss_fn = self.loss_fn

        def batch_loss(p, state, x, y, weight):
            loss = loss_fn(functional_forward(model, {**state, **p}, x), y)
            if loss.dim() != 0:
                raise ValueError(
                    f"loss_fn must return a scalar (the batch mean), got shape {tuple(loss.shape)}"
                )
            return loss * weight

        self._batch_loss = batch_loss
        self._grad = grad(batch_loss)

    def restricted(self, params: Sequence[str | nn.Parameter]) -> HessianOperator:
        op = super().restricted(params)
        op.cache_batches = self.cache_batches  # the graphs that fit the budget, here too
        return op

    restricted.__doc__ = CurvatureOperator.restricted.__doc__

    def _extra_settings(self) -> dict:
        # a settled "auto" passes its choice on
        return {"method": self.method, "fd_shift": self.fd_shift, "offload": self.offload}

    def resolve_method(self, block: int = 1) -> str:
        """Settle ``method="auto"`` now (see the class docstring; a no-op once settled) and
        return the method in use. Products settle it themselves, on the user's vector; called
        before them, this makes the choice on a seeded random vector (a block of ``block``
        columns for the batched variants), whose product is then not used."""
        if self.method == "auto":
            self._settle(None, block)
            self._calibration_part = None
        return self.method

    def _settle(self, v_dict, block: int):
        """Choose the method on ``v_dict`` (see :func:`~analysis.operators.auto.choose_method`);
        the first batch's weighted product, to reuse (``None`` on a rank without batches)."""
        self.auto_choice = choose_method(self, block=block, v_dict=v_dict)
        self.method = self.auto_choice.method
        part, self._calibration_part = self._calibration_part, None
        return part


    def _state_signature(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in
                     [*self.model.parameters(), *self.model.buffers()])

    def _prepare(self) -> None:
        if self.method in ("cached-graph", "auto"):
            self._prepare_signature()

    def _prepare_signature(self) -> None:
        """Drop the cached graphs when a parameter or buffer changed since they were built."""
        sig = self._state_signature()
        if sig != self._signature:
            self._graphs.clear()
            self._first_graph_stats = None
            self._signature = sig

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the dataset loss, ``sum_b (n_b / N) grad L_b`` (same data, mode
        and weighting as the products). Free with ``"cached-graph"`` (the cached first-order
        graphs hold it); one pass over the data otherwise. Under an unsettled ``"auto"`` with
        in-memory data it builds the first batch's first-order graph (which the choice at the
        first product reuses) and those of the other batches when they fit in the cache budget
        (the gradient is then the one the cached graph would give). Under
        ``"forward-difference"`` it is the kept ``g(w)`` of the products (a copy)."""
        if self.method == "forward-difference":  # (offloaded: read back from the disk)
            return base.clone() if (base := self._forward_base()) is not None else \
                self._offload.file.row(0)
        with self._context():
            keep = self._caches if self.method == "cached-graph" else (lambda key: False)
            if self.method == "auto" and self._cached is not None:
                x, y, size, _ = self._cached[0]
                entry, _, first_bytes = first_graph(self, self._state(), x, y,
                                                    size / self.num_terms)
                count = 0 if entry is None else graphs_fit(self, first_bytes)[0]
                keep = lambda key: key is not None and key < count  # noqa: E731

            def part(state, x, y, weight, key):
                primals = {n: state[n] for n in self._names}
                if key is not None and (keep(key) or key in self._graphs):
                    return self._graph_entry(primals, state, x, y, weight, key)[2].clone()
                return self._gradient_part(state, x, y, weight, key)

            return self._weighted_sum(part, lambda: torch.zeros(
                self.shape[0], device=self.device, dtype=self.dtype))

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        if self.method == "auto":  # chosen on this product, whose first batch it computes
            v_dict = dict(zip(self._names, self.space.unflatten(v.detach())))
            first = self._settle(v_dict, 1)
            with self._context():
                out = self._weighted_sum(_reusing(first, lambda state, x, y, weight, key:
                                                  self._batch_product(state, v_dict, x, y,
                                                                      weight, key)),
                                         lambda: torch.zeros_like(v))
            return self._finite(out, v)
        if self.method == "finite-difference":
            # in the working precision: the step needs ~3 digits (a float64 cast of 124M
            # entries took 0.5 s a product)
            v_norm = float(torch.linalg.vector_norm(v))
            if v_norm == 0:  # no step along a zero vector: its product is zero
                return torch.zeros_like(v)
            self.fd_step = finite_difference_step(v_norm, self.dtype, self.fd_shift)
        if self.method == "forward-difference":
            return self._forward_difference(v)
        return super()._apply(v)

    def _forward_difference(self, v: torch.Tensor) -> torch.Tensor:
        """``(g(w + h v) - g(w)) / h`` with ``g(w)`` from :meth:`gradient` (kept)."""
        v_norm = float(torch.linalg.vector_norm(v))
        if v_norm == 0:
            return torch.zeros_like(v)
        base = self._forward_base()
        self.fd_step = h = finite_difference_step(v_norm, self.dtype, self.fd_shift, "forward")
        self._fd_plus = True
        try:  # sum_b (n_b / N) g_b(w + h v), all-reduced
            if self._offload is None:
                return super()._apply(v).sub_(base).div_(h)
            with self._offload.shifted(self.space.unflatten(v.detach()), h):
                out = super()._apply(v)  # at the parameters shifted in place
            self._fd_base = self._offload.still_valid(self._fd_base)
            return self._offload.subtract_base(out).div_(h)
        finally:
            self._fd_plus = False

    def _forward_base(self) -> torch.Tensor:
        """``g(w)`` for forward differences, recomputed when a parameter or buffer changed."""
        if self._offload is not None and self._offload.sync():
            self._fd_base = None  # the weights changed, bit for bit (by any route)
        sig = self._state_signature()
        if self._fd_base is None or self._fd_base[0] != sig:
            self._fd_base = None  # free the old one first (and set only once stored)
            with self._context():
                base = self._weighted_sum(self._gradient_part, lambda: torch.zeros(
                    self.shape[0], device=self.device, dtype=self.dtype))
            if self._offload is not None:  # on disk, not in memory
                base = self._offload.store_base(base)
            self._fd_base = (sig, base)
        return self._fd_base[1]

    def _gradient_part(self, state, x, y, weight, key, primals=None):
        """One batch's weighted gradient, at ``primals`` (default the weights in ``state``)."""
        primals = {n: state[n] for n in self._names} if primals is None else primals
        gd = self._grad(primals, state, x, y, weight)
        return [gd[n] for n in self._names]

    def clear_cache(self) -> None:
        """Drop cached graphs and the kept ``g(w)`` of forward differences (they are rebuilt at
        the next product)."""
        self._graphs.clear()
        self._fd_base = None
        self._first_graph_stats = None
        self._signature = None

    def _caches(self, key: int | None) -> bool:
        """Whether in-memory batch ``key`` keeps its first-order graph (see
        :attr:`cache_batches`)."""
        return key is not None and (self.cache_batches is None or key < self.cache_batches)

    def _batch_product(self, state, v_dict, x, y, weight, key=None):
        primals = {n: state[n] for n in self._names}
        if self.method == "cached-graph" and self._caches(key):
            entry = self._graph_entry(primals, state, x, y, weight, key)
            return self._graph_backward(entry, v_dict, retain=True)
        if self.method == "forward-difference" and self._fd_plus:
            if self._offload is not None:  # the parameters themselves are at w + h v
                return self._gradient_part(state, x, y, weight, key)
            h = self.fd_step
            return self._gradient_part(state, x, y, weight, key,
                                       {n: primals[n] + h * v_dict[n] for n in self._names})
        if self.method in ("finite-difference", "forward-difference"):
            return self._finite_difference(primals, state, v_dict, x, y, weight)
        if self.method == "forward-over-reverse":
            try:
                return self._forward_over_reverse(primals, state, v_dict, x, y, weight)
            except (NotImplementedError, RuntimeError) as err:
                # an operator without a forward-mode derivative (or a forward-AD bug, e.g.
                # mse_loss on some versions): use reverse-over-reverse from now on; a genuine
                # error in the model resurfaces there
                self.method = "double-backward"
                self.fallback_reason = f"{type(err).__name__}: {err}"
        return self._double_backward(primals, state, v_dict, x, y, weight)

    def _forward_over_reverse(self, primals, state, v_dict, x, y, weight):
        _, hv = jvp(lambda p: self._grad(p, state, x, y, weight), (primals,), (v_dict,))
        return [hv[n] for n in self._names]

    def _finite_difference(self, primals, state, v_dict, x, y, weight):
        """``weight * (g_b(w + h v) - g_b(w - h v)) / (2 h)`` with ``h = self.fd_step``: two
        gradients at shifted copies of the parameters (``functional_call``; the model is not
        touched), one shifted copy alive at a time."""
        h = self.fd_step
        shifted = {n: primals[n] + h * v_dict[n] for n in self._names}
        plus = self._grad(shifted, state, x, y, weight)
        shifted = {n: primals[n] - h * v_dict[n] for n in self._names}
        minus = self._grad(shifted, state, x, y, weight)
        del shifted
        return [plus[n].sub_(minus[n]).div_(2 * h) for n in self._names]

    def _first_order_graph(self, primals, state, x, y, weight):
        with torch.enable_grad():
            leaves = [primals[n].detach().requires_grad_(True) for n in self._names]
            loss = self._batch_loss(dict(zip(self._names, leaves)), state, x, y, weight)
            grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        keep = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        flat = self.space.flatten([None if g is None else g.detach() for g in grads])
        return leaves, keep, flat

    def _graph_entry(self, primals, state, x, y, weight, key):
        """The cached first-order graph of in-memory batch ``key`` (built at its first use)."""
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._first_order_graph(primals, state, x, y, weight)
            self._graphs[key] = entry
        return entry

    def _keep_graph(self, key, entry) -> None:
        """Cache ``entry`` (built from the model's current state) as in-memory batch ``key``'s
        graph, so that the next pass over the data does not rebuild it."""
        self._prepare_signature()
        self._graphs[key] = entry

    def _graph_backward(self, entry, v_dict, *, retain: bool):
        """``H_b v`` by one backward through a first-order graph."""
        leaves, keep, _ = entry
        if not keep:
            return torch.zeros(self.shape[0], device=self.device, dtype=self.dtype)
        vs = [v_dict[n] for n in self._names]
        with torch.enable_grad():
            hv = torch.autograd.grad([g for g, _ in keep], leaves,
                                     grad_outputs=[vs[i] for _, i in keep], retain_graph=retain,
                                     allow_unused=True)
        return list(hv)

    def _double_backward(self, primals, state, v_dict, x, y, weight):
        entry = self._first_order_graph(primals, state, x, y, weight)
        return self._graph_backward(entry, v_dict, retain=False)

    # -- batched products (``op @ V`` for a block of columns in one pass) -----------------------
    def matmat(self, V: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
        """``H V`` for an ``(n, b)`` matrix of columns, ``block_size`` columns per pass.

        Each block is one pass over the data, so one all-reduce under a process group:
        ``torch.func.vmap`` over the tangents of the forward-over-reverse product; for
        ``"double-backward"`` one first-order graph per batch and block and one backward per
        column through it, for ``"cached-graph"`` one backward per column through each
        batch's cached graph. Measured per-vector cost of ``b = 16``
        columns against 16 single products (``benchmarks/batched_products.py``, process CPU
        time, one thread): see docs/benchmarks.md (issue 25). The block's working
        memory is about ``block_size`` times that of one product. An operator or model that
        cannot be batched falls back to one product per column (the reason is kept in
        :attr:`batched_fallback_reason`). Counts ``b`` matvecs.

        Args:
            V: ``(n, b)`` matrix on the model's device and dtype.
            block_size: columns per pass (default :func:`default_block_size`).
        """
        self._check_block(V)
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if V.device != self.device or V.dtype != self.dtype:
            self._check_vector(V[:, 0] if V.shape[1] else V.new_zeros(self.shape[0]))
        n, b = V.shape
        if b == 0:  # A @ (n x 0) is the (n x 0) matrix: no product to compute
            return torch.empty(n, 0, device=self.device, dtype=self.dtype)
        bs = block_size or default_block_size(n, V.element_size())
        out = torch.empty(n, b, device=self.device, dtype=self.dtype)
        for c0 in range(0, b, bs):
            c1 = min(c0 + bs, b)
            if self.method == "auto" and c1 - c0 > 1:  # chosen on this first block
                out[:, c0:c1] = self._first_block(V[:, c0:c1])
            else:
                out[:, c0:c1] = self._apply_block(V[:, c0:c1])
            self.num_matvecs += c1 - c0
        return out

    def _first_block(self, V: torch.Tensor) -> torch.Tensor:
        """The first block under ``"auto"``: the choice is made on it (batched variants, per
        column) and its first batch's product reused."""
        v_dict = self._block_dict(V)
        first = self._settle(v_dict, V.shape[1])
        out = self._block_pass(v_dict, V.shape[1], first)
        if not bool(torch.isfinite(out).all()):  # loop (locates a bad batch)
            return torch.stack([self._apply(V[:, i].contiguous()) for i in range(V.shape[1])], 1)
        return out.T

    def _apply_block(self, V: torch.Tensor) -> torch.Tensor:
        # the cached graph loops the columns inside each batch (one pass over the data and one
        # all-reduce per block: :meth:`_looped_block`); finite differences take one column at a time
        if (V.shape[1] == 1 or self.method in ("finite-difference", "forward-difference")
                or getattr(self, "batched_fallback_reason", None) is not None):
            return torch.stack([self._apply(V[:, i].contiguous()) for i in range(V.shape[1])], 1)
        v_dict = self._block_dict(V)  # one transposed copy of the block: {name: (b, *shape)}
        try:
            out = self._block_pass(v_dict, V.shape[1])
        except (NotImplementedError, RuntimeError, TypeError) as err:
            if self.method != "forward-over-reverse":
                out = None
                self.batched_fallback_reason = f"{type(err).__name__}: {err}"
            else:  # as for one vector: reverse-over-reverse from now on, then batched again
                self.method = "double-backward"
                self.fallback_reason = f"{type(err).__name__}: {err}"
                try:
                    out = self._block_pass(v_dict, V.shape[1])
                except (NotImplementedError, RuntimeError, TypeError) as err2:
                    out = None
                    self.batched_fallback_reason = f"{type(err2).__name__}: {err2}"
        if out is None or not bool(torch.isfinite(out).all()):  # loop (locates a bad batch)
            return torch.stack([self._apply(V[:, i].contiguous()) for i in range(V.shape[1])], 1)
        return out.T

    def _block_pass(self, v_dict, b: int, first=None) -> torch.Tensor:
        """One pass over the data for a block of ``b`` tangents; ``(b, n)`` result (``first``:
        the first batch's product, already computed)."""
        with self._context():
            return self._weighted_sum(
                _reusing(first, lambda state, x, y, weight, key:
                         self._block_product(state, v_dict, x, y, weight, key)),
                lambda: torch.zeros(b, self.shape[0], device=self.device, dtype=self.dtype))

    def _flat_block(self, tensors, b: int) -> torch.Tensor:
        cols = [torch.zeros(b, nm, device=self.device, dtype=self.dtype) if t is None
                else t.reshape(b, -1) for t, nm in zip(tensors, self.space.numels)]
        return torch.cat(cols, 1)

    def _block_product(self, state, v_dict, x, y, weight, key=None) -> torch.Tensor:
        """``weight * H_b V`` for one batch as a ``(b, n)`` block."""
        primals = {n: state[n] for n in self._names}
        b = next(iter(v_dict.values())).shape[0]
        if self.method == "forward-over-reverse":
            return self._forward_over_reverse_block(primals, state, v_dict, x, y, weight, b)
        # double backward, and the cached graph on a batch without a kept graph: one graph
        # build for the block, freed after its last column
        cached = self.method == "cached-graph" and self._caches(key)
        entry = (self._graph_entry(primals, state, x, y, weight, key) if cached
                 else self._first_order_graph(primals, state, x, y, weight))
        return self._looped_block(entry, v_dict, b, keep=cached)

    def _looped_block(self, entry, v_dict, b: int, *, keep: bool) -> torch.Tensor:
        """``(b, n)``: one backward per column through a first-order graph, each row flattened
        in place; the graph is freed after the last column unless ``keep``. A batched backward
        (``is_grads_batched``, vmap over it) measured 1.2-1.7x slower per vector on CPU (an MLP
        of 265k parameters, a CNN of 97k; process CPU time, one thread), so the columns loop."""
        out = torch.empty(b, self.shape[0], device=self.device, dtype=self.dtype)
        for i in range(b):
            # contiguous tangents: a strided row of the block slows the backward's products
            part = self._graph_backward(entry, {n: t[i].contiguous() for n, t in v_dict.items()},
                                        retain=keep or i < b - 1)
            if isinstance(part, torch.Tensor):
                out[i].copy_(part)
            else:
                self.space.flatten(part, out=out[i])
        return out

    def _unit_block(self, state, V, x, y, weight, key) -> torch.Tensor:
        """``C_u V`` of one unit (:meth:`unit_products`): one block product (a column at a
        time for finite differences, or when the block product fails); ``key`` is ``None`` for
        a group of samples, which has no cached graph."""
        if V.shape[1] > 1 and self.batched_fallback_reason is None and self.method in (
                "forward-over-reverse", "double-backward", "cached-graph"):
            try:
                block = self._block_product(state, self._block_dict(V), x, y, weight, key)
                return block.T.div_(weight)
            except (NotImplementedError, RuntimeError, TypeError) as err:
                self.batched_fallback_reason = f"{type(err).__name__}: {err}"
        return super()._unit_block(state, V, x, y, weight, key)

    def _forward_over_reverse_block(self, primals, state, v_dict, x, y, weight, b: int):
        """``weight * H_b V`` for ``b`` tangents at once: ``vmap`` over forward-over-reverse."""
        def one(t):
            return jvp(lambda p: self._grad(p, state, x, y, weight), (primals,), (t,))[1]
        hv = vmap(one)(v_dict)
        return self._flat_block([hv[n] for n in self._names], b)

    def _block_dict(self, V: torch.Tensor) -> dict[str, torch.Tensor]:
        """An ``(n, b)`` block as ``{name: (b, *shape)}`` tangents."""
        rows = V.detach().T.contiguous()  # (b, n)
        parts = torch.split(rows, self.space.numels, dim=1)
        return {nm: p.reshape(rows.shape[0], *s) for nm, p, s in
                zip(self._names, parts, self.space.shapes)}


def _reusing(first, product):
    """``product`` for :meth:`EmpiricalRisk._weighted_sum`, whose first call (the first batch)
    returns ``first`` instead when it is not ``None`` (computed by the choice of ``"auto"``)."""
    pending = [] if first is None else [first]

    def wrapped(state, x, y, weight, key):
        return pending.pop() if pending else product(state, x, y, weight, key)

    return wrapped
