"""Loss and accuracy over a data source, model-mode handling, loss resolution, progress bars."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .data import Data, as_data, to_device
from .losses import CausalLMLoss, LossFn, LossSpec, ModelLoss, OutputLoss, logits_of, loss_terms
from .results import Result
from .target_checks import check_targets, describe

with warnings.catch_warnings():  # widget bars in Jupyter; text bars (and no warning) elsewhere
    warnings.simplefilter("ignore")  # or when ipywidgets is missing
    from tqdm.auto import tqdm

__all__ = ["forward", "model_mode", "resolve_loss", "correct_count", "progress_bar",
           "model_device_dtype", "accuracy_per_term", "accuracy_unit"]


_LOSSES: dict[str, LossFn] = {
    "cross_entropy": OutputLoss(F.cross_entropy),
    "mse": OutputLoss(F.mse_loss),
    "lm": CausalLMLoss(),
    "causal_lm": CausalLMLoss(),
    "model": ModelLoss(),
    "model_lm": ModelLoss("causal_lm"),
}

LOSS_NAMES: tuple[str, ...] = tuple(_LOSSES)


def resolve_loss(loss: str | LossFn | None) -> LossFn:
    """A loss callable ``loss(outputs, targets) -> mean scalar`` from a name or a callable.

    Names (see :mod:`analysis.losses`): ``"cross_entropy"`` (default when ``None``) and
    ``"mse"`` (both take ``.logits`` / ``["logits"]`` / the first element of a model output that
    is not a tensor), ``"lm"`` / ``"causal_lm"`` (next-token cross-entropy over counted tokens),
    ``"model"`` (the model's own ``output.loss``, weighted by samples) and ``"model_lm"`` (the
    same, weighted by the shifted tokens of ``labels`` like a Hugging Face causal LM).
    """
    if loss is None:
        return _LOSSES["cross_entropy"]
    if isinstance(loss, str):
        if loss not in _LOSSES:
            raise ValueError(f"unknown loss {loss!r}; choose from {sorted(_LOSSES)} or pass a callable")
        return _LOSSES[loss]
    if not callable(loss):
        raise TypeError(f"loss_fn must be callable or a name, got {type(loss).__name__}")
    return loss


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (CPU/float32 if it has none)."""
    for p in model.parameters():
        return p.device, p.dtype
    for b in model.buffers():
        return b.device, (b.dtype if b.is_floating_point() else torch.get_default_dtype())
    return torch.device("cpu"), torch.get_default_dtype()


def forward(model: Callable[..., Any], inputs: Any) -> Any:
    """Call ``model`` on a batch's inputs: a tensor, a tuple (``*args``) or a dict (``**kwargs``)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


@contextlib.contextmanager
def model_mode(model: nn.Module, mode: str | None) -> Iterator[nn.Module]:
    """Temporarily put ``model`` in ``"eval"`` or ``"train"`` mode (``None``: leave as is).

    Every submodule's own ``training`` flag is restored on exit, also when they differed.
    """
    if mode not in (None, "eval", "train"):
        raise ValueError(f"mode must be 'eval', 'train' or None, got {mode!r}")
    saved = [(m, m.training) for m in model.modules()]
    try:
        if mode == "eval":
            model.eval()
        elif mode == "train":
            model.train()
        yield model
    finally:
        for m, flag in saved:
            m.training = flag


def correct_count(outputs: Any, targets: Any, loss_fn: LossFn | None = None) -> torch.Tensor | None:
    """Number of correct predictions, or ``None`` when there is no accuracy to count.

    With a ``loss_fn`` that defines ``num_correct(outputs, targets)`` (the language-model losses
    of :mod:`analysis.losses`: correct next-token predictions over the counted, shifted
    positions, ``ignore_index`` excluded) its count, one per loss term; otherwise (and when a
    per-sample loss such as ``"model"`` has no count of its own) the correct argmax class
    predictions of ``(N, classes)`` logits for ``(N,)`` class-index targets, one per sample
    (:func:`accuracy_per_term` says which). The logits are read as the losses read them
    (:func:`analysis.losses.logits_of`: a tensor, ``output.logits`` of a Hugging Face
    ``ModelOutput``, ``output["logits"]``), the targets of a batch dict from its ``labels``, so
    ``BertForSequenceClassification`` / ``ViTForImageClassification`` get an accuracy.
    """
    count = getattr(loss_fn, "num_correct", None)
    if count is not None:
        c = count(outputs, targets)
        # a per-term count that fails is no accuracy; a per-sample loss falls back to the argmax
        if c is not None or str(getattr(loss_fn, "term_unit", "sample")) != "sample":
            return c
    try:
        logits = logits_of(outputs)
    except TypeError:
        return None
    if isinstance(targets, Mapping):
        targets = targets.get("labels")
    if (
        isinstance(targets, torch.Tensor)
        and logits.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
        and logits.shape[0] == targets.shape[0]
    ):
        return (logits.argmax(dim=1) == targets).sum()
    return None


def accuracy_per_term(loss_fn: LossFn | None) -> bool:
    """Whether :func:`correct_count` counts per loss term (the loss defines ``num_correct``), so
    the accuracy divides by the terms, not by the samples."""
    return getattr(loss_fn, "num_correct", None) is not None


def accuracy_unit(loss_fn: LossFn | None) -> str:
    """What an accuracy count is for ``loss_fn``: its ``term_unit`` (``"token"`` for the
    language-model losses) when it counts per term, else ``"sample"``."""
    if accuracy_per_term(loss_fn):
        return str(getattr(loss_fn, "term_unit", "term"))
    return "sample"


def progress_bar(iterable: Iterable, *, enabled: bool, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr (only on rank 0), or the bare iterable when ``enabled`` is False."""
    if not enabled or not dist.is_main_process():
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


@dataclass(frozen=True, repr=False)
class EvalResult(Result):
    """Dataset loss and accuracy.

    Attributes:
        loss: the term-weighted mean loss.
        accuracy: the fraction of correct predictions, counted per ``accuracy_unit``: samples
            for classification, next tokens for a language-model loss (``None`` when there is
            nothing to count, e.g. regression targets).
        num_samples: samples (sequences) in the data.
        num_terms: loss terms in the data (samples, or counted tokens).
        accuracy_unit: ``"sample"`` or ``"token"`` (``None`` without an accuracy).
    """

    loss: float
    accuracy: float | None
    num_samples: int
    num_terms: int | None = None
    accuracy_unit: str | None = None


@torch.no_grad()
def _batch_error(what: str, index: int, details: str, err: BaseException) -> ValueError:
    text = str(err).strip().splitlines()
    return ValueError(f"evaluate(): {what} failed on batch {index} ({details}): "
                      f"{type(err).__name__}: {text[0] if text else ''}")


def evaluate(
    model: nn.Module,
    loss_fn: LossSpec,
    data: Data,
    *,
    mode: str | None = "eval",
    batch_size: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Term-weighted mean loss and accuracy of ``model`` over ``data``.

    ``L = sum_b N_b L_b / N`` with ``N_b`` the loss terms of batch ``b`` (its samples, or its
    counted tokens for a language-model loss; :func:`analysis.losses.loss_terms`); accuracy is
    the fraction of correct argmax predictions over the samples for classification, over the
    loss's terms for a loss that counts them (token accuracy of a causal LM: the next-token
    predictions of the shifted logits at the counted positions, ``-100`` labels excluded; see
    :func:`correct_count`). Batches are moved to the model's device (floating inputs cast to its
    dtype). Under an initialized process group with a sharded source, per-rank sums are
    all-reduced. The first batch's targets are checked against a built-in loss first
    (:func:`analysis.target_checks.check_targets`: a language model's logits under
    ``cross_entropy`` raise with the advice to use ``"lm"`` or ``"model_lm"``).

    Args:
        model: the network.
        loss_fn: a name of :func:`resolve_loss` (``"cross_entropy"``, ``"mse"``, ``"lm"``,
            ``"model"``, ...) or a callable returning the batch-mean loss.
        data: see :mod:`analysis.data`.
        mode: ``"eval"`` (default), ``"train"`` or ``None``; the caller's mode is restored.
        batch_size: batch size for a tensor pair.
        progress: show a tqdm bar.

    Returns:
        :class:`EvalResult` with ``loss``, ``accuracy``, ``num_samples``, ``num_terms`` and
        ``accuracy_unit``.

    Raises:
        TypeError, ValueError: targets of the first batch that do not fit a built-in loss (see
            :func:`analysis.target_checks.check_targets`), a loss that is not a scalar.
        ValueError: parameters on the meta device; a forward pass or a loss that fails on any
            batch (integer inputs, a wrong input shape, class labels out of range in a later
            batch), naming the batch and its shapes and dtypes, the original error chained.
    """
    loss_fn = resolve_loss(loss_fn)
    source = as_data(data, batch_size=batch_size)
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"evaluate(): the model's parameters are on the meta device (no values), "
                         f"e.g. {meta[0]!r}; materialize them first (model.to_empty(device=...) "
                         "and load a state dict)")
    device, dtype = model_device_dtype(model)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # sum N_b*L, correct, n, N
    has_acc = True
    per_term = accuracy_per_term(loss_fn)
    first = True
    with model_mode(model, mode):
        for batch in progress_bar(source, enabled=progress, desc="evaluate", unit="batch"):
            x = to_device(batch.inputs, device, dtype)
            y = to_device(batch.targets, device, dtype)
            try:
                out = forward(model, x)
            except Exception as err:  # integer inputs, a wrong shape: one line naming the batch
                raise _batch_error("the forward pass", batch.index, f"inputs {describe(x)}; model "
                                   f"parameters {str(dtype).removeprefix('torch.')}", err) from err
            if first:  # targets that do not fit a built-in loss fail in one line
                check_targets(loss_fn, out, y, y, batch.index, "evaluate()")
                first = False
            try:
                loss = loss_fn(out, y)
            except Exception as err:  # e.g. class labels out of range in a later batch
                raise _batch_error("the loss", batch.index,
                                   f"outputs {describe(out)}, targets {describe(y)}", err) from err
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            terms = loss_terms(loss_fn, x, y, batch.size)
            stats[0] += loss.double() * terms
            stats[3] += terms
            c = correct_count(out, y, loss_fn) if has_acc else None
            if c is None:
                has_acc = False
            else:
                stats[1] += c
            stats[2] += batch.size
    if source.shard:
        dist.all_reduce_sum(stats)
    n, terms = stats[2].item(), stats[3].item()
    counted = terms if per_term else n
    return EvalResult(
        loss=stats[0].item() / terms if terms > 0 else float("nan"),
        accuracy=(stats[1].item() / counted if counted > 0 else float("nan")) if has_acc else None,
        num_samples=int(n),
        num_terms=int(terms),
        accuracy_unit=accuracy_unit(loss_fn) if has_acc else None,
    )
