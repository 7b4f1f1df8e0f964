"""Curvature as linear operators: Hessian- and Gauss-Newton-vector products over the dataset loss.

The dataset loss is the exactly weighted mean of batch-mean losses (see :mod:`analysis.data`;
``n_b`` counts the loss terms of batch ``b``, its samples or, for a language-model loss, its
tokens: :mod:`analysis.losses`),

    L(w) = sum_b (n_b / N) L_b(w),        so        H v = sum_b (n_b / N) H_b v,

also for a smaller last batch. :class:`HessianOperator` computes ``H v`` for flat vectors ``v``
over the model's trainable parameters (:class:`analysis.params.ParameterSpace`), on the model's
device and in its dtype, by forward-over-reverse differentiation::

    H_b v = jvp(grad(L_b), (w,), (v,))        # torch.func.jvp of torch.func.grad over functional_call

with a double-backward fallback (``grad(<grad L_b, v>)``) for models whose operators lack forward-mode
AD. :class:`GGNOperator` computes the generalized Gauss-Newton product ``G v = J^T H_out J v``
(``J`` the Jacobian of the network outputs, ``H_out`` the Hessian of the loss in the outputs),
which for cross-entropy and mean squared error is positive semi-definite.

Both are square linear operators: ``op @ v``, ``op.matvec(v)``, ``op @ V`` for an ``(n, k)``
matrix of columns, ``op.to_scipy()`` for ``scipy.sparse.linalg``. They refuse nondeterministic
setups (active dropout, train-mode BatchNorm, a shuffling DataLoader) unless
``check_deterministic=False``, because Lanczos and the trace estimators need the *same* matrix at
every product.

Example:
    >>> import torch
    >>> from analysis.hessian import HessianOperator, directional_curvature
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    >>> x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    >>> H = HessianOperator(model, "cross_entropy", (x, y))
    >>> v = torch.randn(H.shape[0])
    >>> Hv = H @ v
    >>> c = directional_curvature(H, v)      # v^T H v / ||v||^2 (paper A.4)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from . import distributed as dist
from .attention import second_order_attention
from .data import Data, DataSource, as_data, to_device
from .evaluation import model_mode, resolve_loss
from .losses import LossFn, ModelLoss, logits_of, loss_terms
from .params import ParameterSpace

__all__ = [
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "directional_curvature",
    "check_deterministic_setup",
    "default_block_size",
]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


#: Probe memory the default block size aims at (the products' working memory comes on top).
BLOCK_BYTES = 256 * 2**20


def default_block_size(n: int, itemsize: int = 4, *, max_block: int = 16) -> int:
    """Columns per batched product: ``clamp(BLOCK_BYTES // (4 n itemsize), 1, max_block)``.

    Four ``n``-vectors per column (the probes, their products and the tangents of a batched
    forward-over-reverse pass) within :data:`BLOCK_BYTES` (256 MiB): 16 up to ~1M float32
    parameters, 1 from ~16M.
    """
    return int(max(1, min(max_block, BLOCK_BYTES // max(1, 4 * n * itemsize))))

def check_deterministic_setup(model: nn.Module, source: DataSource, mode: str | None) -> None:
    """Raise ``ValueError`` if products with the curvature would not be reproducible.

    Refused: a dropout module with ``p > 0`` that will be active (``mode="train"``, or
    ``mode=None`` with the module in training mode), a BatchNorm module in training mode (its
    output then depends on the batch composition and its running statistics change at every
    product), and a DataLoader that shuffles.
    Then the outputs of the first batch are computed twice and must agree
    (:func:`analysis.checks.check_repeatable_forward`): this catches ``F.dropout`` in ``forward``.

    Args:
        model: the network.
        source: the data source.
        mode: the mode the curvature is evaluated in (``"eval"``, ``"train"`` or ``None``).
    """
    for name, m in model.named_modules():
        active = mode == "train" or (mode is None and m.training)
        if not active:
            continue
        if isinstance(m, _DROPOUT) and m.p > 0:
            raise ValueError(
                f"module {name or type(m).__name__!r} is an active {type(m).__name__}(p={m.p}) "
                f"under mode={mode!r}, so every curvature product would see another random mask; "
                "use mode='eval' or pass check_deterministic=False"
            )
        if isinstance(m, _BATCHNORM):
            raise ValueError(
                f"module {name or type(m).__name__!r} is a {type(m).__name__} in training mode "
                f"under mode={mode!r}: its output depends on the batch statistics and its running "
                "statistics change at every product; use mode='eval' or pass "
                "check_deterministic=False"
            )
    if source.is_shuffled:
        raise ValueError(
            "the DataLoader shuffles (its sampler is a RandomSampler), so successive curvature "
            "products would use different batches when the batches are weighted; build it with "
            "shuffle=False or pass check_deterministic=False"
        )
    from .checks import check_repeatable_forward  # catches F.dropout(training=True) in forward

    check_repeatable_forward(model, source, mode, where="curvature operator")


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, dict):
        for v in obj.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(obj, (tuple, list)):
        for v in obj:
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _call(model: nn.Module, state: dict[str, torch.Tensor], inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return functional_call(model, state, args=(), kwargs=inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, state, tuple(inputs))
    return functional_call(model, state, (inputs,))


class CurvatureOperator:
    """Base class: a symmetric ``n x n`` curvature matrix of the dataset loss, applied to vectors.

    Subclasses implement :meth:`_batch_product` (the weighted product of one batch). This class
    owns the data handling (batches moved to the device once and cached for tensor pairs and
    lists of batches; a DataLoader is re-iterated), exact sample weighting, the distributed
    all-reduce, mode handling, input validation and the matvec counter.

    Args:
        model: the network; its trainable parameters (or ``params``) span the space.
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable ``loss(outputs, targets)``
            returning the batch-mean scalar.
        data: an ``(X, y)`` pair, a list of ``(x, y)`` batches, a DataLoader or a DataSource.
        params: ``None`` (every parameter with ``requires_grad``) or a list of parameter names
            or parameters: the subspace the operator acts on.
        mode: ``"eval"`` (default), ``"train"`` or ``None`` (leave the model's flags); the
            caller's flags are restored after every product.
        check_deterministic: refuse active dropout, train-mode BatchNorm and shuffling loaders.
        batch_size: split a tensor pair into batches of this size (``None``: one batch).

    Attributes:
        space: the :class:`~analysis.params.ParameterSpace`.
        shape: ``(n, n)``.
        device, dtype: those of the parameters; vectors must match them.
        num_matvecs: products computed so far (a matrix of ``k`` columns counts ``k``).
        num_samples: the total number of samples (over all ranks if sharded).
        num_terms: ``N``, the total number of loss terms the batches are weighted by (samples
            for classification; tokens for a language-model loss, see
            :func:`analysis.losses.loss_terms`), so ``C = sum_b (N_b / N) C_b``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: str | LossFn | None,
        data: Data | DataSource,
        *,
        params: Sequence[str | nn.Parameter] | None = None,
        mode: str | None = "eval",
        check_deterministic: bool = True,
        batch_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if mode not in (None, "eval", "train"):
            raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
        self.model = model
        self.loss_fn = resolve_loss(loss_fn)
        self.space = ParameterSpace(model, params)
        self.source = as_data(data, batch_size=batch_size)
        self.mode = mode
        self.check_deterministic = check_deterministic
        if check_deterministic:
            check_deterministic_setup(model, self.source, mode)
        n = self.space.numel
        self.shape = (n, n)
        self.device = self.space.device
        self.dtype = self.space.dtype
        self.num_matvecs = 0
        self._names = list(self.space.names)
        # cache device-resident batches for in-memory data; a DataLoader is re-iterated
        self._cached: list[tuple[Any, Any, int, int]] | None = None
        if self.source.kind in ("pair", "batches"):
            cached = []
            local_samples = 0
            for b in self.source:
                x = to_device(b.inputs, self.device, self.dtype)
                y = to_device(b.targets, self.device, self.dtype)
                self._check_batch_device(x, b.index)
                cached.append((x, y, loss_terms(self.loss_fn, x, y, b.size), b.index))
                local_samples += b.size
            self._cached = cached
            local = sum(c[2] for c in cached)
            self.num_terms = self._reduce_count(local)
            self.num_samples = self._reduce_count(local_samples)
        else:
            self.num_samples = None  # known after the first pass over the loader
            self.num_terms = None

    # -- helpers -------------------------------------------------------------------------------
    def _reduce_count(self, local: int) -> int:
        if not self.source.shard:
            return local
        t = torch.tensor([float(local)], device=self.device, dtype=torch.float64)
        dist.all_reduce_sum(t)
        return int(t.item())

    def _check_batch_device(self, x: Any, index: int) -> None:
        t = _first_tensor(x)
        if t is not None and t.device != self.device:
            raise ValueError(
                f"batch {index} could not be moved to the model's device {self.device} "
                f"(it is on {t.device})"
            )

    def _batches(self):
        if self._cached is not None:
            yield from self._cached
            return
        samples = 0
        for b in self.source:
            x = to_device(b.inputs, self.device, self.dtype)
            y = to_device(b.targets, self.device, self.dtype)
            samples += b.size
            yield x, y, loss_terms(self.loss_fn, x, y, b.size), b.index
        if self.num_samples is None:
            self.num_samples = self._reduce_count(samples)

    def _state(self) -> dict[str, torch.Tensor]:
        """Parameters (detached) and buffers for functional_call; buffers are cloned when the
        model may write to them (train-mode BatchNorm) so the caller's statistics stay intact."""
        state = {n: p.detach() for n, p in zip(self._names, self.space.params)}
        writes = any(
            isinstance(m, _BATCHNORM) and (self.mode == "train" or (self.mode is None and m.training))
            for m in self.model.modules()
        )
        for name, b in self.model.named_buffers():
            state[name] = b.clone() if writes else b
        return state

    def _check_vector(self, v: torch.Tensor) -> torch.Tensor:
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"the vector must be a torch.Tensor, got {type(v).__name__}")
        if v.device != self.device:
            raise ValueError(
                f"the vector is on device {v.device} but the operator (the model) is on device {self.device}"
            )
        if v.dtype != self.dtype:
            raise TypeError(
                f"the vector has dtype {v.dtype} but the model's parameters are {self.dtype}; "
                "cast it with v.to(op.dtype)"
            )
        return self.space.check_vector(v)

    def _batch_product(self, state, v_dict, x, y, weight, key=None):
        """``weight * C_b v`` for one batch as a flat vector. ``key`` is the position of a
        cached in-memory batch (``None`` for a loader batch or the slow error path)."""
        raise NotImplementedError

    def _prepare(self) -> None:
        """Hook run before each product (e.g. to invalidate cached graphs)."""

    # -- the product --------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``C v`` for a flat vector ``v`` of shape ``(n,)`` (the model's device and dtype).

        Raises:
            TypeError / ValueError: for a vector of the wrong type, dtype, device or length.
            FloatingPointError: if the product is not finite (names the first bad batch).
        """
        v = self._check_vector(v)
        out = self._apply(v)
        self.num_matvecs += 1
        return out

    def _apply(self, v: torch.Tensor, *, locate: bool = True) -> torch.Tensor:
        v_dict = dict(zip(self._names, self.space.unflatten(v.detach())))
        with model_mode(self.model, self.mode), torch.no_grad(), second_order_attention():
            out = self._weighted_sum(
                lambda state, x, y, weight, key: self._batch_product(state, v_dict, x, y, weight, key),
                lambda: torch.zeros(self.shape[0], device=self.device, dtype=self.dtype))
        return self._finite(out, v, locate)

    def _weighted_sum(self, product, zeros) -> torch.Tensor:
        """``sum_b N_b P_b / N`` over the data: ``product(state, x, y, weight, key)`` returns
        ``weight * P_b`` for one batch (``N_b`` its loss terms, ``N`` theirs in all); cached
        batches come pre-weighted by ``N_b / N``, a loader's are divided by ``N`` at the end.
        A rank without batches contributes ``zeros()`` to the all-reduce (one per call)."""
        out = None
        state = self._state()
        self._prepare()
        if self._cached is not None:
            total = self.num_terms
            for pos, (x, y, size, _) in enumerate(self._cached):
                part = product(state, x, y, size / total, pos)
                out = part if out is None else out.add_(part)
        else:
            local = 0
            for x, y, size, index in self._batches():
                self._check_batch_device(x, index)
                part = product(state, x, y, float(size), None)
                out = part if out is None else out.add_(part)
                local += size
            if self.num_terms is None:
                self.num_terms = self._reduce_count(local)
        if out is None:  # a rank with no batches still joins the all-reduce
            out = zeros()
        if self.source.shard:
            dist.all_reduce_sum(out)  # the weighted sum; N was all-reduced above
        return out if self._cached is not None else out.div_(self.num_terms)

    def _finite(self, out: torch.Tensor, v: torch.Tensor, locate: bool) -> torch.Tensor:
        if bool(torch.isfinite(out).all()):
            return out
        # slow path, only on failure: find the first batch with a non-finite product
        v_dict = dict(zip(self._names, self.space.unflatten(v.detach())))
        with model_mode(self.model, self.mode), torch.no_grad(), second_order_attention():
            state = self._state()
            for x, y, _size, index in self._batches():
                hv = self._batch_product(state, v_dict, x, y, 1.0)
                if not bool(torch.isfinite(hv).all()):
                    raise FloatingPointError(
                        f"{type(self).__name__}: the product is not finite on batch {index} "
                        "(inf/nan in the loss, its derivatives or the vector)"
                    )
        raise FloatingPointError(
            f"{type(self).__name__}: the product is not finite (inf/nan after summing batches)"
        )

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``C V`` for an ``(n, k)`` matrix of column vectors (``k`` products)."""
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0]:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"expected an ({self.shape[0]}, k) matrix, got {shape}")
        cols = [self.matvec(V[:, j].contiguous()) for j in range(V.shape[1])]
        return torch.stack(cols, dim=1)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            return self.matmat(v)
        return self.matvec(v)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self @ v

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors in and out; each
        product moves the vector to the model's device and dtype and back)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            x = np.asarray(x).reshape(-1)
            t = torch.as_tensor(x).to(device=self.device, dtype=self.dtype)
            return self.matvec(t).detach().cpu().double().numpy()

        def mm(X):
            t = torch.as_tensor(np.asarray(X)).to(device=self.device, dtype=self.dtype)
            return self.matmat(t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.shape[0]}, device={self.device}, dtype={self.dtype}, "
            f"mode={self.mode!r}, num_matvecs={self.num_matvecs})"
        )


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
    * ``"auto"`` (default): ``"cached-graph"`` when the data is a single in-memory batch (a
      tensor pair without ``batch_size``, or a one-element list), else ``"forward-over-reverse"``.

    Other arguments and attributes are those of :class:`CurvatureOperator`; :attr:`method` holds
    the method in use.

    Example:
        >>> H = HessianOperator(model, "cross_entropy", (x, y))      # doctest: +SKIP
        >>> Hv = H @ torch.randn(H.shape[0])                          # doctest: +SKIP
    """

    METHODS = ("auto", "forward-over-reverse", "double-backward", "cached-graph")

    def __init__(self, model, loss_fn, data, *, params=None, mode="eval",
                 check_deterministic=True, batch_size=None, method="auto"):
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        super().__init__(model, loss_fn, data, params=params, mode=mode,
                         check_deterministic=check_deterministic, batch_size=batch_size)
        if method == "auto":
            single = self._cached is not None and len(self._cached) == 1
            method = "cached-graph" if single else "forward-over-reverse"
        if method == "cached-graph" and self._cached is None:
            raise ValueError(
                "method='cached-graph' needs in-memory data (a tensor pair or a list of batches), "
                "not a DataLoader"
            )
        self.method = method
        self.fallback_reason: str | None = None
        self.batched_fallback_reason: str | None = None  # why matmat loops, if it does
        self._graphs: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self._signature: tuple | None = None
        loss_fn = self.loss_fn

        def batch_loss(p, state, x, y, weight):
            loss = loss_fn(_call(model, {**state, **p}, x), y)
            if loss.dim() != 0:
                raise ValueError(
                    f"loss_fn must return a scalar (the batch mean), got shape {tuple(loss.shape)}"
                )
            return loss * weight

        self._batch_loss = batch_loss
        self._grad = grad(batch_loss)

    def _state_signature(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in
                     [*self.model.parameters(), *self.model.buffers()])

    def _prepare(self) -> None:
        if self.method != "cached-graph":
            return
        sig = self._state_signature()
        if sig != self._signature:
            self._graphs.clear()
            self._signature = sig

    def gradient(self) -> torch.Tensor:
        """The flat gradient of the dataset loss, ``sum_b (n_b / N) grad L_b`` (same data, mode
        and weighting as the products). Free with ``"cached-graph"`` (the cached first-order
        graphs hold it); one pass over the data otherwise."""
        out = None
        local = 0
        with model_mode(self.model, self.mode), torch.no_grad(), second_order_attention():
            state = self._state()
            self._prepare()
            primals = {n: state[n] for n in self._names}
            if self._cached is not None:
                total = self.num_terms
                for pos, (x, y, size, _) in enumerate(self._cached):
                    if self.method == "cached-graph":
                        entry = self._graphs.get(pos)
                        if entry is None:
                            with torch.enable_grad():
                                entry = self._first_order_graph(primals, state, x, y, size / total)
                            self._graphs[pos] = entry
                        g = entry[2]
                    else:
                        gd = self._grad(primals, state, x, y, size / total)
                        g = torch.cat([gd[n].reshape(-1) for n in self._names])
                    out = g.clone() if out is None else out.add_(g)
                if self.source.shard:
                    dist.all_reduce_sum(out)
                return out
            for x, y, size, _ in self._batches():
                gd = self._grad(primals, state, x, y, float(size))
                g = torch.cat([gd[n].reshape(-1) for n in self._names])
                out = g if out is None else out.add_(g)
                local += size
            if self.num_terms is None:
                self.num_terms = self._reduce_count(local)
            if self.source.shard:
                dist.all_reduce_sum(out)
            return out.div_(self.num_terms)

    def clear_cache(self) -> None:
        """Drop cached graphs (they are rebuilt at the next product)."""
        self._graphs.clear()
        self._signature = None

    def _batch_product(self, state, v_dict, x, y, weight, key=None):
        primals = {n: state[n] for n in self._names}
        if self.method == "cached-graph" and key is not None:
            return self._cached_product(primals, state, v_dict, x, y, weight, key)
        if self.method == "forward-over-reverse":
            try:
                _, hv = jvp(lambda p: self._grad(p, state, x, y, weight), (primals,), (v_dict,))
            except (NotImplementedError, RuntimeError) as err:
                # an operator without a forward-mode derivative (or a forward-AD bug, e.g.
                # mse_loss on some versions): use reverse-over-reverse from now on; a genuine
                # error in the model resurfaces there
                self.method = "double-backward"
                self.fallback_reason = f"{type(err).__name__}: {err}"
            else:
                return torch.cat([hv[n].reshape(-1) for n in self._names])
        return self._double_backward(primals, state, v_dict, x, y, weight)

    def _first_order_graph(self, primals, state, x, y, weight):
        leaves = [primals[n].detach().requires_grad_(True) for n in self._names]
        loss = self._batch_loss(dict(zip(self._names, leaves)), state, x, y, weight)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        keep = [(g, i) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        flat = self.space.flatten([None if g is None else g.detach() for g in grads])
        return leaves, keep, flat

    def _cached_product(self, primals, state, v_dict, x, y, weight, key):
        entry = self._graphs.get(key)
        with torch.enable_grad():
            if entry is None:
                entry = self._first_order_graph(primals, state, x, y, weight)
                self._graphs[key] = entry
            leaves, keep, _ = entry
            if not keep:
                return torch.zeros(self.shape[0], device=self.device, dtype=self.dtype)
            vs = [v_dict[n] for n in self._names]
            hv = torch.autograd.grad([g for g, _ in keep], leaves,
                                     grad_outputs=[vs[i] for _, i in keep],
                                     retain_graph=True, allow_unused=True)
        return self.space.flatten(hv)

    def _double_backward(self, primals, state, v_dict, x, y, weight):
        with torch.enable_grad():
            leaves, keep, _ = self._first_order_graph(primals, state, x, y, weight)
            if not keep:
                return torch.zeros(self.shape[0], device=self.device, dtype=self.dtype)
            vs = [v_dict[n] for n in self._names]
            hv = torch.autograd.grad([g for g, _ in keep], leaves,
                                     grad_outputs=[vs[i] for _, i in keep], allow_unused=True)
        return self.space.flatten(hv)

    # -- batched products (``op @ V`` for a block of columns in one pass) -----------------------
    def matmat(self, V: torch.Tensor, *, block_size: int | None = None) -> torch.Tensor:
        """``H V`` for an ``(n, b)`` matrix of columns, ``block_size`` columns per pass.

        Each block is one pass over the data: ``torch.func.vmap`` over the tangents of the
        forward-over-reverse product, or one batched backward (``is_grads_batched``) through the
        first-order graph for ``"double-backward"``; ``"cached-graph"`` loops (one backward per
        column through the cached graph was faster than a batched one). Measured per-vector cost
        on CPU for b = 1, 4, 16 (``benchmarks/batched_products.py``, 265k-parameter MLP, batch
        256): forward-over-reverse 1.00, 0.62, 0.60; double-backward 1.00, 0.87, 0.94. The block's working
        memory is about ``block_size`` times that of one product. An operator or model that
        cannot be batched falls back to one product per column (the reason is kept in
        :attr:`batched_fallback_reason`). Counts ``b`` matvecs.

        Args:
            V: ``(n, b)`` matrix on the model's device and dtype.
            block_size: columns per pass (default :func:`default_block_size`).
        """
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0]:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"expected an ({self.shape[0]}, k) matrix, got {shape}")
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if V.device != self.device or V.dtype != self.dtype:
            self._check_vector(V[:, 0] if V.shape[1] else V.new_zeros(self.shape[0]))
        n, b = V.shape
        bs = block_size or default_block_size(n, V.element_size())
        out = torch.empty(n, b, device=self.device, dtype=self.dtype)
        for c0 in range(0, b, bs):
            c1 = min(c0 + bs, b)
            out[:, c0:c1] = self._apply_block(V[:, c0:c1])
            self.num_matvecs += c1 - c0
        return out

    def _apply_block(self, V: torch.Tensor) -> torch.Tensor:
        # the cached graph is already one backward per product; batching it (vmap over the
        # backward) measured 1.2-1.4x slower per vector on CPU, so it loops
        if (V.shape[1] == 1 or self.method == "cached-graph"
                or getattr(self, "batched_fallback_reason", None) is not None):
            return torch.stack([self._apply(V[:, i].contiguous()) for i in range(V.shape[1])], 1)
        rows = V.detach().T.contiguous()  # (b, n)
        parts = torch.split(rows, self.space.numels, dim=1)
        v_dict = {nm: p.reshape(rows.shape[0], *s) for nm, p, s in
                  zip(self._names, parts, self.space.shapes)}
        try:
            out = self._block_pass(v_dict, rows)
        except (NotImplementedError, RuntimeError, TypeError) as err:
            if self.method != "forward-over-reverse":
                out = None
                self.batched_fallback_reason = f"{type(err).__name__}: {err}"
            else:  # as for one vector: reverse-over-reverse from now on, then batched again
                self.method = "double-backward"
                self.fallback_reason = f"{type(err).__name__}: {err}"
                try:
                    out = self._block_pass(v_dict, rows)
                except (NotImplementedError, RuntimeError, TypeError) as err2:
                    out = None
                    self.batched_fallback_reason = f"{type(err2).__name__}: {err2}"
        if out is None or not bool(torch.isfinite(out).all()):  # loop (locates a bad batch)
            return torch.stack([self._apply(V[:, i].contiguous()) for i in range(V.shape[1])], 1)
        return out.T

    def _block_pass(self, v_dict, rows) -> torch.Tensor:
        """One pass over the data for a ``(b, n)`` block of rows; ``(b, n)`` result."""
        with model_mode(self.model, self.mode), torch.no_grad(), second_order_attention():
            return self._weighted_sum(
                lambda state, x, y, weight, key: self._block_product(state, v_dict, x, y, weight, key),
                lambda: torch.zeros_like(rows))

    def _flat_block(self, tensors, b: int) -> torch.Tensor:
        cols = [torch.zeros(b, nm, device=self.device, dtype=self.dtype) if t is None
                else t.reshape(b, -1) for t, nm in zip(tensors, self.space.numels)]
        return torch.cat(cols, 1)

    def _block_product(self, state, v_dict, x, y, weight, key=None) -> torch.Tensor:
        """``weight * H_b V`` for one batch as a ``(b, n)`` block."""
        primals = {n: state[n] for n in self._names}
        b = next(iter(v_dict.values())).shape[0]
        if self.method == "forward-over-reverse":
            def one(t):
                return jvp(lambda p: self._grad(p, state, x, y, weight), (primals,), (t,))[1]
            hv = vmap(one)(v_dict)
            return self._flat_block([hv[n] for n in self._names], b)
        with torch.enable_grad():
            if self.method == "cached-graph" and key is not None:
                entry = self._graphs.get(key)
                if entry is None:
                    entry = self._first_order_graph(primals, state, x, y, weight)
                    self._graphs[key] = entry
                retain = True
            else:
                entry = self._first_order_graph(primals, state, x, y, weight)
                retain = False
            leaves, keep, _ = entry
            if not keep:
                return torch.zeros(b, self.shape[0], device=self.device, dtype=self.dtype)
            vs = [v_dict[n] for n in self._names]
            hv = torch.autograd.grad([g for g, _ in keep], leaves,
                                     grad_outputs=[vs[i] for _, i in keep],
                                     retain_graph=retain, allow_unused=True,
                                     is_grads_batched=True)
        return self._flat_block(hv, b)


class GGNOperator(CurvatureOperator):
    """The generalized Gauss-Newton matrix of the dataset loss, ``v -> G v``.

    ``G = sum_b (n_b / N) J_b^T H_out,b J_b`` with ``J_b`` the Jacobian of the network outputs on
    batch ``b`` in the parameters and ``H_out,b`` the Hessian of the batch-mean loss in the
    outputs. For cross-entropy and mean squared error ``H_out`` is positive semi-definite, so
    ``G`` is too; for a model that is linear in its parameters ``G = H``. Each product costs
    one Jacobian-vector product, one loss-Hessian product in output space and one
    vector-Jacobian product. Arguments and attributes are those of :class:`CurvatureOperator`.
    """

    def __init__(self, model, loss_fn, data, *, params=None, mode="eval",
                 check_deterministic=True, batch_size=None):
        if isinstance(resolve_loss(loss_fn), ModelLoss):
            raise TypeError(
                "GGNOperator needs a loss of the model outputs (e.g. 'lm' or 'cross_entropy'), "
                f"not the model's own loss {loss_fn!r}"
            )
        super().__init__(model, loss_fn, data, params=params, mode=mode,
                         check_deterministic=check_deterministic, batch_size=batch_size)
        self.method = "forward-over-reverse"
        self.fallback_reason: str | None = None

    def _batch_product(self, state, v_dict, x, y, weight, key=None):
        model = self.model
        names = self._names
        with torch.enable_grad():
            leaves = [state[n].detach().requires_grad_(True) for n in names]
            out = logits_of(_call(model, {**state, **dict(zip(names, leaves))}, x))
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
        return self.space.flatten(gv)

    def _jvp(self, state, v_dict, x, out, leaves):
        """``J v``: forward mode, or the double-vjp trick when forward AD is unavailable."""
        if self.method == "forward-over-reverse":
            primals = {n: state[n] for n in self._names}
            try:
                with torch.no_grad():
                    _, jv = jvp(lambda p: logits_of(_call(self.model, {**state, **p}, x)), (primals,),
                                (v_dict,))
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
        The Rayleigh quotient as a Python float (one matvec).

    Raises:
        ValueError: for a zero direction.
    """
    if not isinstance(d, torch.Tensor):
        raise TypeError(f"d must be a torch.Tensor, got {type(d).__name__}")
    if isinstance(op, CurvatureOperator):
        d = d.to(device=op.device, dtype=op.dtype)
    nrm2 = torch.dot(d, d)
    if not bool(nrm2 > 0):
        raise ValueError("the direction d is zero; its curvature is undefined")
    hd = op @ d
    return float(torch.dot(d, hd) / nrm2)
