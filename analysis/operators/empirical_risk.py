"""The empirical-risk part of a curvature operator: data, weighting, all-reduce and checks.

The dataset loss is the exactly weighted mean of batch-mean losses (see :mod:`analysis.data`;
``n_b`` counts the loss terms of batch ``b``, its samples or, for a language-model loss, its
tokens: :mod:`analysis.losses`),

    L(w) = sum_b (n_b / N) L_b(w),        so        C v = sum_b (n_b / N) C_b v

for any curvature ``C`` that is linear in the loss (the Hessian, the GGN), also for a smaller
last batch. :class:`EmpiricalRisk` owns everything about that sum and nothing about ``C_b``:
batches moved to the device once and cached for in-memory data (a DataLoader is re-iterated),
the weights ``n_b / N``, the distributed all-reduce of ``N`` and of the sums, the module mode,
the refusal of nondeterministic setups and the search for the first batch with a non-finite
product (in the spirit of curvlinops' ``_empirical_risk.py``). The products themselves live in
:mod:`analysis.operators.curvature` and :mod:`analysis.operators.hessian`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from .. import distributed as dist
from ..attention import second_order_attention
from ..checks import check_first_batch, check_repeatable_forward
from ..data import Data, DataSource, as_data, microbatches, to_device
from ..evaluation import model_mode, resolve_loss
from ..losses import LossSpec, loss_terms
from ..params import ParameterSpace
from ..precision import autocast_disabled

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


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
    _refuse_random_setup(model, source, mode)
    check_repeatable_forward(model, source, mode, where="curvature operator")


def check_operator_settings(mode: Any, microbatch_size: Any) -> None:
    """An operator's ``mode`` (``"eval"``, ``"train"`` or ``None``) and ``microbatch_size`` (a
    positive int or ``None``), or a ValueError naming the value."""
    if microbatch_size is not None and (isinstance(microbatch_size, bool)
                                        or not isinstance(microbatch_size, int)
                                        or microbatch_size < 1):
        raise ValueError(f"microbatch_size must be a positive integer or None, got "
                         f"{microbatch_size!r}")
    if mode not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")


def _refuse_random_setup(model: nn.Module, source: DataSource, mode: str | None) -> None:
    """The module and loader part of :func:`check_deterministic_setup` (no forward pass)."""
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


def functional_forward(model: nn.Module, state: dict[str, torch.Tensor], inputs: Any) -> Any:
    """``model(inputs)`` with the parameters and buffers of ``state`` (``functional_call``)."""
    if isinstance(inputs, dict):
        return functional_call(model, state, args=(), kwargs=inputs)
    if isinstance(inputs, (tuple, list)):
        return functional_call(model, state, tuple(inputs))
    return functional_call(model, state, (inputs,))


#: ``product(state, x, y, weight, key)``: ``weight * P_b`` for one batch (see
#: :meth:`EmpiricalRisk._weighted_sum`): a flat vector, or the list of per-parameter tensors.
BatchProduct = Callable[[dict, Any, Any, float, "int | None"], Any]


class EmpiricalRisk:
    """The dataset loss ``L = sum_b (n_b / N) L_b`` of a model over its data (see the module
    docstring): the data, its weighting and reduction, the mode and the checks.

    Args:
        model: the network; its trainable parameters (or ``params``) span the space.
        loss_fn: ``"cross_entropy"``, ``"mse"`` or a callable ``loss(outputs, targets)``
            returning the batch-mean scalar.
        data: an ``(X, y)`` pair, a list of ``(x, y)`` batches, a DataLoader or a DataSource.
        params: ``None`` (every parameter with ``requires_grad``) or a list of parameter names
            or parameters: the subspace the operator acts on.
        mode: ``"eval"`` (default), ``"train"`` or ``None`` (leave the model's flags); the
            caller's flags are restored after every product.
        check_deterministic: refuse active dropout, train-mode BatchNorm, shuffling loaders
            and a forward that does not repeat. The first batch's forward and its targets
            against a built-in loss are checked at construction either way
            (:func:`analysis.checks.check_first_batch`: a language model under
            ``cross_entropy`` is refused with the advice to use ``"lm"`` or ``"model_lm"``).
        batch_size: split a tensor pair into batches of this size (``None``: one batch).
        microbatch_size: split every batch (of any data form, a DataLoader's too) into slices
            of at most this many samples for the passes over the data (``None``: whole
            batches). The slices are weighted by their own loss terms, so the dataset loss
            and every product are those of whole batches (to rounding: equal in float64 to
            ``rtol 1e-10``, also for token-weighted language-model losses with padding); the
            working memory of a product is then that of one slice.

    Attributes:
        model, loss_fn, source, mode, check_deterministic: as given (``loss_fn`` resolved).
        space: the :class:`~analysis.ParameterSpace`.
        device, dtype: those of the parameters.
        num_samples: the total number of samples (over all ranks if sharded).
        num_terms: ``N``, the total number of loss terms the batches are weighted by (samples
            for classification; tokens for a language-model loss, see
            :func:`analysis.losses.loss_terms`).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossSpec,
        data: Data,
        *,
        params: Sequence[str | nn.Parameter] | None = None,
        mode: str | None = "eval",
        check_deterministic: bool = True,
        batch_size: int | None = None,
        microbatch_size: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_operator_settings(mode, microbatch_size)
        self.model = model
        self.loss_fn = resolve_loss(loss_fn)
        self.space = ParameterSpace(model, params)
        self.source = as_data(data, batch_size=batch_size)
        self.mode = mode
        self.check_deterministic = check_deterministic
        self.microbatch_size = microbatch_size
        self._data, self._batch_size = data, batch_size  # to rebuild on a subspace
        if check_deterministic:
            _refuse_random_setup(model, self.source, mode)
        # one forward of the first batch (two to see it repeat): a forward or targets that do not
        # fit the loss (a language model under cross_entropy, ...) fail here, in one line
        check_first_batch(model, self.loss_fn, self.source, mode, where=f"{type(self).__name__}()",
                          deterministic=check_deterministic)
        self.device = self.space.device
        self.dtype = self.space.dtype
        self._names = list(self.space.names)
        # cache device-resident batches for in-memory data; a DataLoader is re-iterated
        self._cached: list[tuple[Any, Any, int, int]] | None = None
        if self.source.in_memory:
            cached = []
            local_samples = 0
            for b in self.source:
                x = to_device(b.inputs, self.device, self.dtype)
                y = to_device(b.targets, self.device, self.dtype)
                self._check_batch_device(x, b.index)
                for xm, ym, size in microbatches(x, y, b.size, microbatch_size):
                    cached.append((xm, ym, loss_terms(self.loss_fn, xm, ym, size), b.index))
                local_samples += b.size
            self._cached = cached
            local = sum(c[2] for c in cached)
            self.num_terms = self._reduce_count(local)
            self.num_samples = self._reduce_count(local_samples)
        else:
            self.num_samples = None  # known after the first pass over the loader
            self.num_terms = None

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

    def _batches(self) -> Iterator[tuple[Any, Any, int, int]]:
        """``(inputs, targets, loss terms, index)`` per local batch, on the model's device."""
        if self._cached is not None:
            yield from self._cached
            return
        samples = 0
        for b in self.source:
            x = to_device(b.inputs, self.device, self.dtype)
            y = to_device(b.targets, self.device, self.dtype)
            samples += b.size
            for xm, ym, size in microbatches(x, y, b.size, self.microbatch_size):
                yield xm, ym, loss_terms(self.loss_fn, xm, ym, size), b.index
        if self.num_samples is None:
            self.num_samples = self._reduce_count(samples)

    def num_batches(self) -> int:
        """The number of batches over all ranks (a DataLoader's ``len``, or one pass of loading
        without forwards for an iterable without one)."""
        if self._cached is not None:
            local = len(self._cached)
        elif isinstance(self.source.data, Sized) and self.source.kind == "loader" \
                and not self.source.shard and self.source.max_samples is None:
            local = len(self.source.data)
        else:
            local = sum(1 for _ in self.source)
        return self._reduce_count(local)

    def _first_batch(self) -> tuple[Any, Any, int, int] | None:
        """The first local batch (``None`` on a rank without batches)."""
        return next(iter(self._batches()), None)

    def _writes_buffers(self) -> bool:
        """Whether the forward writes to buffers (train-mode BatchNorm statistics)."""
        return any(
            isinstance(m, _BATCHNORM) and (self.mode == "train" or (self.mode is None and m.training))
            for m in self.model.modules()
        )

    def _state(self) -> dict[str, torch.Tensor]:
        """Parameters (detached) and buffers for functional_call; buffers are cloned when the
        model may write to them (train-mode BatchNorm) so the caller's statistics stay intact."""
        state = {n: p.detach() for n, p in zip(self._names, self.space.params)}
        writes = self._writes_buffers()
        for name, b in self.model.named_buffers():
            state[name] = b.clone() if writes else b
        return state

    def _context(self):
        """The context of every pass: the operator's mode, no tape, math attention kernels, autocast
        off (the products are in the parameters' dtype: :mod:`analysis.precision`)."""
        from contextlib import ExitStack

        stack = ExitStack()
        stack.enter_context(autocast_disabled())
        stack.enter_context(model_mode(self.model, self.mode))
        stack.enter_context(torch.no_grad())
        stack.enter_context(second_order_attention())
        return stack

    def _prepare(self) -> None:
        """Hook run before each pass over the data (e.g. to invalidate cached graphs)."""

    def _weighted_sum(self, product: BatchProduct, zeros: Callable[[], torch.Tensor]) -> torch.Tensor:
        """``sum_b N_b P_b / N`` over the data: ``product(state, x, y, weight, key)`` returns
        ``weight * P_b`` for one batch (``N_b`` its loss terms, ``N`` theirs in all); cached
        batches come pre-weighted by ``N_b / N``, a loader's are divided by ``N`` at the end.
        ``key`` is the position of a cached in-memory batch (``None`` for a loader batch).
        A rank without batches contributes ``zeros()`` to the all-reduce (one per call)."""
        out = None
        state = self._state()
        self._prepare()
        if self._cached is not None:
            total = self.num_terms
            for pos, (x, y, size, _) in enumerate(self._cached):
                out = self._accumulate(out, product(state, x, y, size / total, pos))
        else:
            local = 0
            for x, y, size, index in self._batches():
                self._check_batch_device(x, index)
                out = self._accumulate(out, product(state, x, y, float(size), None))
                local += size
            if self.num_terms is None:
                self.num_terms = self._reduce_count(local)
        if out is None:  # a rank with no batches still joins the all-reduce
            out = zeros()
        if self.source.shard:
            dist.all_reduce_sum(out)  # the weighted sum; N was all-reduced above
        return out if self._cached is not None else out.div_(self.num_terms)

    def _accumulate(self, out: torch.Tensor | None, part: Any) -> torch.Tensor:
        """``out + part`` in place: ``part`` is a flat vector (or block) or a list of
        per-parameter tensors, flattened straight into ``out`` (no concatenated copy)."""
        if isinstance(part, torch.Tensor):
            return part if out is None else out.add_(part)
        return self.space.flatten(part, out=out, add=out is not None)

    def _locate_nonfinite(self, product: BatchProduct) -> None:
        """Raise ``FloatingPointError`` naming the first batch whose (unit-weight) product is not
        finite, or the sum when every batch is finite (the slow path, only after a failure)."""
        with self._context():
            state = self._state()
            for x, y, _size, index in self._batches():
                part = self._accumulate(None, product(state, x, y, 1.0, None))
                if not bool(torch.isfinite(part).all()):
                    raise FloatingPointError(
                        f"{type(self).__name__}: the product is not finite on batch {index} "
                        "(inf/nan in the loss, its derivatives or the vector)"
                    )
        raise FloatingPointError(
            f"{type(self).__name__}: the product is not finite (inf/nan after summing batches)"
        )
