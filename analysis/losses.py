"""Losses for model outputs as users have them, and the number of loss terms in a batch.

Every routine of the toolkit takes ``loss_fn(outputs, targets) -> scalar``, the **mean over the
batch's loss terms**. The dataset loss is the mean over *all* loss terms of the data,

    L(w) = (1 / N) sum_b N_b L_b(w),        N = sum_b N_b,

where ``N_b`` is the number of terms of batch ``b``: its samples for classification and
regression, its counted tokens for a language model (positions whose label is not
``ignore_index`` and whose attention mask is 1). Weighting batches by ``N_b`` makes uneven padding
give the same loss, gradient and Hessian as one big batch holding all tokens. A loss declares its
terms with a method ``num_terms(inputs, targets) -> int``; a loss without one counts samples
(:func:`loss_terms`), so plain functions such as ``F.cross_entropy`` behave as before. Accuracy
is counted over the same terms: a loss may define ``num_correct(outputs, targets)`` (the
language-model losses count the correct next-token predictions, argmax of the shifted logits,
over the counted positions; :func:`analysis.evaluation.correct_count`) and ``term_unit``
(``"token"``), the unit the accuracy is reported in.

Built-in losses (names for :func:`analysis.evaluation.resolve_loss` and the CLI's ``--loss``):

* ``"lm"`` / ``"causal_lm"``: :class:`CausalLMLoss`, next-token cross-entropy on shifted logits
  and labels, with ``ignore_index=-100`` and the attention mask.
* ``"model"``: :class:`ModelLoss`, the loss the model computes itself (``output.loss``, e.g. a
  Hugging Face model called with ``labels``), weighted by samples; ``"model_lm"`` weights it by
  the shifted, counted tokens of ``labels`` as a Hugging Face causal LM computes it.
* ``"cross_entropy"`` and ``"mse"`` accept output objects too (:func:`logits_of`).

Targets of a language model: a ``(B, T)`` tensor of labels (the input ids, ``-100`` where a
position does not count) or, for data whose batches are single dicts
(``{"input_ids", "attention_mask", "labels"}``, see :mod:`analysis.data`), the batch dict itself;
labels are then ``labels`` if present, else ``input_ids``, with positions where
``attention_mask == 0`` ignored.

Example:
    >>> import torch
    >>> from analysis import CausalLMLoss
    >>> logits = torch.randn(2, 4, 7)
    >>> labels = torch.tensor([[1, 2, 3, 4], [5, 6, -100, -100]])
    >>> lm = CausalLMLoss()
    >>> lm.num_terms(None, labels)     # 3 + 1 next-token targets
    4
    >>> 0 <= int(lm.num_correct(logits, labels)) <= 4
    True
    >>> float(lm(logits, labels)) > 0
    True
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

#: A loss ``loss_fn(output, target) -> scalar`` (mean over the batch's loss terms).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: What every entry point accepts as ``loss_fn``: a name (``"cross_entropy"``, ``"mse"``,
#: ``"lm"`` / ``"causal_lm"``, ``"model"``, ``"model_lm"``; see
#: :func:`analysis.evaluation.resolve_loss`), a callable ``loss_fn(output, target)`` returning
#: the batch mean (a :data:`LossFn`, e.g. :class:`CausalLMLoss`), or ``None`` for
#: ``"cross_entropy"``.
LossSpec = str | LossFn | None

__all__ = ["logits_of", "loss_terms", "lm_labels", "ModelLoss", "OutputLoss"]


def logits_of(output: Any) -> torch.Tensor:
    """The prediction tensor of a model output.

    A tensor is returned as is; otherwise ``output.logits`` (a Hugging Face ``ModelOutput``),
    ``output["logits"]`` (a dict), or the first element of a tuple/list.

    Raises:
        TypeError: when no tensor can be found.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(
        f"cannot take the logits of a model output of type {type(output).__name__}; return a "
        "tensor, an object with .logits, a dict with 'logits' or a tuple starting with them"
    )


def loss_terms(loss_fn: Callable, inputs: Any, targets: Any, samples: int) -> int:
    """``N_b``, the number of loss terms of one batch: ``loss_fn.num_terms(inputs, targets)`` if
    the loss defines it, else ``samples``.

    Raises:
        ValueError: when ``num_terms`` returns a negative or non-integer count.
    """
    count = getattr(loss_fn, "num_terms", None)
    if count is None:
        return samples
    n = count(inputs, targets)
    if isinstance(n, torch.Tensor):
        n = n.item()
    if isinstance(n, bool) or not float(n).is_integer() or n < 0:
        raise ValueError(f"{type(loss_fn).__name__}.num_terms returned {n!r}; expected a count >= 0")
    return int(n)


def lm_labels(targets: Any, ignore_index: int = -100) -> torch.Tensor:
    """Labels ``(B, T)`` from a label tensor or a batch dict (masked by ``attention_mask``)."""
    if isinstance(targets, torch.Tensor):
        labels = targets
    elif isinstance(targets, Mapping):
        if "labels" in targets and targets["labels"] is not None:
            labels = targets["labels"]
        elif "input_ids" in targets:
            labels = targets["input_ids"]
        else:
            raise ValueError(
                f"a language-model target dict needs 'labels' or 'input_ids', got keys {sorted(targets)}"
            )
        mask = targets.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, ignore_index)
    else:
        raise TypeError(
            f"language-model targets must be a (B, T) tensor of labels or a batch dict, got "
            f"{type(targets).__name__}"
        )
    if labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(
            f"language-model labels must be a (B, T) integer tensor, got {tuple(labels.shape)} "
            f"{labels.dtype}"
        )
    return labels


class CausalLMLoss:
    """Next-token cross-entropy, the mean over counted tokens (``"lm"`` / ``"causal_lm"``).

    ``L_b = (1 / N_b) sum_{i, t} -log softmax(z_{i,t})[y_{i,t+1}]`` over the positions ``t`` whose
    next label ``y_{i,t+1}`` is not ``ignore_index`` (and not masked by ``attention_mask`` when the
    targets are a batch dict); ``N_b`` is their number (:meth:`num_terms`). With ``shift=False``
    the logits at ``t`` predict the label at ``t`` (masked LM, labels already aligned).

    Args:
        ignore_index: label value that does not count (``-100``, as in PyTorch and Hugging Face).
        shift: shift logits and labels for next-token prediction (default ``True``).

    The model output may be a ``(B, T, V)`` tensor or anything :func:`logits_of` accepts.
    Token accuracy (:meth:`num_correct`) counts the same positions.
    """

    #: what a loss term (and so an accuracy count) is
    term_unit = "token"

    def __init__(self, ignore_index: int = -100, *, shift: bool = True):
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = ignore_index
        self.shift = bool(shift)

    def _labels(self, targets: Any) -> torch.Tensor:
        labels = lm_labels(targets, self.ignore_index)
        return labels[:, 1:] if self.shift else labels

    def num_terms(self, inputs: Any, targets: Any) -> int:
        """The number of counted next-token targets in the batch."""
        return int((self._labels(targets) != self.ignore_index).sum())

    def _aligned(self, output: Any, targets: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, labels)`` with ``logits[:, t]`` predicting ``labels[:, t]``."""
        logits = logits_of(output)
        labels = self._labels(targets)
        if logits.dim() != 3:
            raise ValueError(f"language-model logits must be (B, T, V), got {tuple(logits.shape)}")
        if self.shift:
            logits = logits[:, :-1]
        if logits.shape[:2] != labels.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}"
            )
        return logits, labels

    def num_correct(self, output: Any, targets: Any) -> torch.Tensor:
        """Correct next-token predictions: positions counted by :meth:`num_terms` whose label is
        the argmax of the logits predicting it."""
        logits, labels = self._aligned(output, targets)
        return ((logits.argmax(dim=-1) == labels) & (labels != self.ignore_index)).sum()

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        logits, labels = self._aligned(output, targets)
        flat = logits.reshape(-1, logits.shape[-1])
        target = labels.reshape(-1)
        count = (target != self.ignore_index).sum()
        total = F.cross_entropy(flat, target, ignore_index=self.ignore_index, reduction="sum")
        return total / count.clamp(min=1)  # a batch without counted tokens has N_b = 0

    def __repr__(self) -> str:
        return f"CausalLMLoss(ignore_index={self.ignore_index}, shift={self.shift})"


class ModelLoss:
    """The loss the model computes itself: ``output.loss`` (``"model"`` / ``"model_lm"``).

    For models called with their labels (e.g. a Hugging Face model given a batch dict with
    ``labels``), ``output.loss`` / ``output["loss"]`` / the first element of a tuple. The targets
    are not used by the loss, only to count its terms. Note that Hugging Face's causal-LM loss
    casts the logits to float32 (``logits.float()``), also in a float64 model; use ``"lm"`` for
    float64 accuracy.

    Args:
        terms: how the batch loss is averaged, for the weighting: ``"samples"`` (default),
            ``"causal_lm"`` (shifted tokens of the labels that are not ``ignore_index``, the
            convention of Hugging Face causal LMs) or ``"tokens"`` (unshifted).
        ignore_index: the label value that does not count.
    """

    TERMS = ("samples", "causal_lm", "tokens")

    def __init__(self, terms: str = "samples", ignore_index: int = -100):
        if terms not in self.TERMS:
            raise ValueError(f"terms must be one of {self.TERMS}, got {terms!r}")
        self.terms = terms
        self._lm = None if terms == "samples" else CausalLMLoss(ignore_index,
                                                               shift=terms == "causal_lm")
        self.term_unit = "sample" if self._lm is None else "token"

    def num_terms(self, inputs: Any, targets: Any) -> int:
        """Terms of the batch (see ``terms``)."""
        from .data import batch_size_of

        if self._lm is None:
            return batch_size_of(targets if targets is not None else inputs)
        return self._lm.num_terms(inputs, targets)

    def num_correct(self, output: Any, targets: Any) -> torch.Tensor | None:
        """Token accuracy count from ``output.logits`` for the token-weighted variants (see
        :meth:`CausalLMLoss.num_correct`); ``None`` (no accuracy) for ``terms="samples"`` and
        for outputs without ``(B, T, V)`` logits matching the labels (the loss is the model's
        own, so its logits may be anything)."""
        if self._lm is None:
            return None
        try:
            return self._lm.num_correct(output, targets)
        except (TypeError, ValueError):
            return None

    def __call__(self, output: Any, targets: Any = None) -> torch.Tensor:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, Mapping):
            loss = output.get("loss")
        if loss is None and isinstance(output, (tuple, list)) and output:
            loss = output[0]
        if not isinstance(loss, torch.Tensor):
            raise TypeError(
                f"the model output ({type(output).__name__}) has no loss; pass the labels in the "
                "inputs (e.g. a batch dict with 'labels') or use loss 'lm'"
            )
        return loss

    def __repr__(self) -> str:
        return f"ModelLoss(terms={self.terms!r})"


class OutputLoss:
    """A tensor loss applied to :func:`logits_of` the output (``"cross_entropy"``, ``"mse"``).

    Args:
        fn: ``fn(prediction_tensor, targets) -> batch mean``.
    """

    def __init__(self, fn: Callable[[torch.Tensor, Any], torch.Tensor]):
        self.fn = fn

    def __call__(self, output: Any, targets: Any) -> torch.Tensor:
        return self.fn(output if isinstance(output, torch.Tensor) else logits_of(output), targets)

    def __repr__(self) -> str:
        return f"OutputLoss({getattr(self.fn, '__name__', self.fn)!r})"
