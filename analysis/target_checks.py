"""Targets against outputs for the built-in losses, checked on the first batch before any work.

Shared by :func:`analysis.checks.check_first_batch` (sharpness metrics, slices, the curvature
operators at construction), :func:`analysis.evaluate` and the command line. For
``cross_entropy`` (integer class indices of shape ``(N,)`` in ``[0, C)``, ``-100`` ignored, or
class probabilities of the outputs' shape) and ``mse`` (floating targets of the outputs' shape),
applied to the prediction tensor of the output (:func:`analysis.losses.logits_of`).

A language model given a classification loss is named as such: outputs (or ``.logits``) of shape
``(B, T, V)`` with targets that are a batch dict, or a ``(B, T)`` integer tensor (``T != V``),
under ``cross_entropy`` or ``mse`` raise one line that says to use ``"lm"`` (next-token,
shifted) or ``"model_lm"`` (the model computes its own loss from ``labels``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .losses import OutputLoss, logits_of

__all__ = ["check_lm_targets", "check_targets", "describe", "lm_hint", "looks_like_lm"]


def describe(obj: Any) -> str:
    """``"float32 (16, 4)"`` for a tensor; nested for tuples and dicts (for error messages)."""
    if isinstance(obj, torch.Tensor):
        return f"{str(obj.dtype).replace('torch.', '')} {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        return "{" + ", ".join(f"{k!r}: {describe(v)}" for k, v in obj.items()) + "}"
    if isinstance(obj, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in obj) + ")"
    return type(obj).__name__


def _loss(name: str, cli: bool, first: bool = True) -> str:
    """``loss 'name'`` (``'name'`` when not ``first``) in the library, ``--loss name`` on the CLI."""
    return f"--loss {name}" if cli else (f"loss {name!r}" if first else repr(name))


def lm_hint(cli: bool = False) -> str:
    """What to use instead of a classification loss for a language model (``cli``: as flags)."""
    return (f"use {_loss('lm', cli)} (next-token, shifted) or {_loss('model_lm', cli, False)} "
            "(the model computes its own loss from labels)")


def looks_like_lm(outputs: Any, targets: Any) -> bool:
    """Whether ``outputs`` (or their ``.logits``) are ``(B, T, V)`` logits of a language model and
    ``targets`` a batch dict or ``(B, T)`` integer labels (with ``T != V``; ``T == V`` is also a
    valid ``(N, C, d)`` classification layout)."""
    try:
        logits = logits_of(outputs)
    except TypeError:
        return False
    if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dim() == 3):
        return False
    if isinstance(targets, Mapping):
        return True
    return (isinstance(targets, torch.Tensor) and targets.dim() == 2
            and not (targets.is_floating_point() or targets.is_complex())
            and tuple(targets.shape) == tuple(logits.shape[:2])
            and logits.shape[1] != logits.shape[2])


def _builtin(loss_fn: Callable) -> tuple[Callable, str] | None:
    fn = loss_fn.fn if isinstance(loss_fn, OutputLoss) else loss_fn
    if fn is F.cross_entropy:
        return fn, "cross_entropy"
    if fn is F.mse_loss:
        return fn, "mse"
    return None


def check_lm_targets(loss_fn: Callable, outputs: Any, y: Any, index: int, where: str,
                     *, cli: bool = False) -> None:
    """Raise one line when a language model's outputs and tokens meet a classification loss.

    For the built-in ``cross_entropy`` and ``mse`` with :func:`looks_like_lm` outputs and
    targets: ``TypeError`` for a batch dict, ``ValueError`` for ``(B, T)`` labels, with
    :func:`lm_hint` (phrased as ``--loss`` flags with ``cli``). Other losses pass.
    """
    known = _builtin(loss_fn)
    if known is None or not looks_like_lm(outputs, y):
        return
    what = (f"a batch dict of {sorted(y)}" if isinstance(y, Mapping) else describe(y))
    err = TypeError if isinstance(y, Mapping) else ValueError
    raise err(
        f"{where}: the outputs {describe(logits_of(outputs))} of batch {index} are a language "
        f"model's (B, T, V) logits and the targets ({what}) its tokens, which {known[1]} does "
        f"not fit; {lm_hint(cli)}"
    )


def check_targets(loss_fn: Callable, outputs: Any, y: Any, y_all: Any, index: int, where: str,
                  *, cli: bool = False) -> None:
    """Raise one line when ``y`` does not fit the built-in loss ``loss_fn`` for ``outputs``.

    Args:
        loss_fn: the resolved loss (only ``cross_entropy`` and ``mse`` are checked).
        outputs: the model's output for the checked samples.
        y: the targets of the checked samples; ``y_all``: all of batch ``index``'s targets
            (for the class range).
        index: the batch's position, for the message.
        where: the routine's name, prefixed to the message.
        cli: phrase the advice as ``--loss`` flags.

    Raises:
        TypeError: targets of the wrong type or dtype (a batch dict, float class labels,
            integer regression targets).
        ValueError: targets of the wrong shape or outside the class range.
    """
    known = _builtin(loss_fn)
    if known is None:
        return
    fn, name = known
    check_lm_targets(loss_fn, outputs, y, index, where, cli=cli)
    if isinstance(y, Mapping):
        raise TypeError(
            f"{where}: {name} needs a tensor of targets, got a batch dict of {sorted(y)} on batch "
            f"{index} (a batch that is one dict is its own target); pass (inputs, targets) pairs "
            f"or use {_loss('model', cli)} (the model's own output.loss)"
        )
    try:
        out = logits_of(outputs)
    except TypeError:
        return  # the loss call reports it
    if not isinstance(y, torch.Tensor):
        return
    if fn is F.cross_entropy:
        _cross_entropy(out, y, y_all, index, where)
    else:
        _mse(out, y, index, where, cli)


def _cross_entropy(out: torch.Tensor, y: torch.Tensor, y_all: Any, index: int, where: str) -> None:
    if not out.is_floating_point() or out.dim() == 0:
        raise ValueError(f"{where}: cross_entropy needs floating (N, C) outputs (logits); "
                         f"batch {index} gave {describe(out)}")
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{where}: cross_entropy needs int64 class indices, got targets "
                        f"{describe(y)} on batch {index}")
    want = (out.shape[:1] + out.shape[2:]) if out.dim() >= 2 else torch.Size([])
    if y.is_floating_point():
        if tuple(y.shape) != tuple(out.shape):
            raise TypeError(
                f"{where}: cross_entropy needs integer class indices of shape {tuple(want)} "
                f"(or class probabilities of the outputs' shape {tuple(out.shape)}), got "
                f"float targets {describe(y)} on batch {index}; convert labels with y.long()"
            )
        return
    if tuple(y.shape) != tuple(want):
        raise ValueError(
            f"{where}: cross_entropy with outputs {describe(out)} needs class-index targets "
            f"of shape {tuple(want)}, got {describe(y)} on batch {index}"
        )
    classes = out.shape[1] if out.dim() >= 2 else out.shape[0]
    valid = ((y_all >= 0) & (y_all < classes)) | (y_all == -100)
    if not bool(valid.all()):
        bad = y_all[~valid]
        raise ValueError(
            f"{where}: targets of batch {index} must be class indices in [0, {classes}) "
            f"(the model has {classes} outputs), got {int(bad.min())}"
            + (f" ... {int(bad.max())}" if bad.numel() > 1 else "")
        )


def _mse(out: torch.Tensor, y: torch.Tensor, index: int, where: str, cli: bool) -> None:
    if not y.is_floating_point():
        raise TypeError(
            f"{where}: mse needs floating targets of the outputs' shape {tuple(out.shape)}, "
            f"got {describe(y)} on batch {index}; these look like class labels: use "
            f"{_loss('cross_entropy', cli)} "
            "or one-hot float targets"
        )
    if tuple(y.shape) != tuple(out.shape):
        raise ValueError(
            f"{where}: mse needs targets of the outputs' shape {tuple(out.shape)}, got "
            f"{describe(y)} on batch {index} (they would be broadcast)"
        )
