"""Loss and accuracy over a data source, model-mode handling, loss resolution, progress bars."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as dist
from .data import Data, DataSource, as_data, to_device
from .losses import CausalLMLoss, LossFn, ModelLoss, OutputLoss, loss_terms
from .results import Result

with warnings.catch_warnings():  # widget bars in Jupyter; text bars (and no warning) elsewhere
    warnings.simplefilter("ignore")  # or when ipywidgets is missing
    from tqdm.auto import tqdm

__all__ = [
    "EvalResult",
    "evaluate",
    "forward",
    "model_mode",
    "resolve_loss",
    "correct_count",
    "progress_bar",
    "model_device_dtype",
]


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


def correct_count(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
    """Number of correct class predictions, or ``None`` when targets are not class indices."""
    if (
        isinstance(outputs, torch.Tensor)
        and isinstance(targets, torch.Tensor)
        and outputs.dim() == 2
        and targets.dim() == 1
        and not targets.is_floating_point()
        and outputs.shape[0] == targets.shape[0]
    ):
        return (outputs.argmax(dim=1) == targets).sum()
    return None


def progress_bar(iterable: Iterable, *, enabled: bool, total: int | None = None, desc: str = "", unit: str = "it"):
    """A tqdm bar on stderr (only on rank 0), or the bare iterable when ``enabled`` is False."""
    if not enabled or not dist.is_main_process():
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)


@dataclass(frozen=True, repr=False)
class EvalResult(Result):
    """Dataset loss and accuracy. ``accuracy`` is ``None`` for non-classification targets."""

    loss: float
    accuracy: float | None
    num_samples: int


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loss_fn: str | LossFn | None,
    data: Data | DataSource,
    *,
    mode: str | None = "eval",
    batch_size: int | None = None,
    progress: bool = False,
) -> EvalResult:
    """Term-weighted mean loss and accuracy of ``model`` over ``data``.

    ``L = sum_b N_b L_b / N`` with ``N_b`` the loss terms of batch ``b`` (its samples, or its
    counted tokens for a language-model loss; :func:`analysis.losses.loss_terms`); accuracy is the fraction of correct argmax predictions. Batches are
    moved to the model's device (floating inputs cast to its dtype). Under an initialized process
    group with a sharded source, per-rank sums are all-reduced.

    Args:
        model: the network.
        loss_fn: a name of :func:`resolve_loss` (``"cross_entropy"``, ``"mse"``, ``"lm"``,
            ``"model"``, ...) or a callable returning the batch-mean loss.
        data: see :mod:`analysis.data`.
        mode: ``"eval"`` (default), ``"train"`` or ``None``; the caller's mode is restored.
        batch_size: batch size for a tensor pair.
        progress: show a tqdm bar.

    Returns:
        :class:`EvalResult` with ``loss``, ``accuracy`` and ``num_samples``.
    """
    loss_fn = resolve_loss(loss_fn)
    source = as_data(data, batch_size=batch_size)
    device, dtype = model_device_dtype(model)
    stats = torch.zeros(4, dtype=torch.float64, device=device)  # sum N_b*L, correct, n, N
    has_acc = True
    with model_mode(model, mode):
        for batch in progress_bar(source, enabled=progress, desc="evaluate", unit="batch"):
            x = to_device(batch.inputs, device, dtype)
            y = to_device(batch.targets, device, dtype)
            out = forward(model, x)
            loss = loss_fn(out, y)
            if loss.dim() != 0:
                raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
            terms = loss_terms(loss_fn, x, y, batch.size)
            stats[0] += loss.double() * terms
            stats[3] += terms
            c = correct_count(out, y)
            if c is None:
                has_acc = False
            else:
                stats[1] += c
            stats[2] += batch.size
    if source.shard:
        dist.all_reduce_sum(stats)
    n = stats[2].item()
    return EvalResult(
        loss=stats[0].item() / stats[3].item() if stats[3].item() > 0 else float("nan"),
        accuracy=(stats[1].item() / n) if has_acc else None,
        num_samples=int(n),
    )
