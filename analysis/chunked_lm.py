"""Next-token cross-entropy of a large-vocabulary LM without ``B x T x V`` tensors.

A causal LM's loss goes through logits of ``N = B (T - 1)`` positions by ``V`` tokens (GPT-2:
4 x 128 x 50,257 float32 = 103 MB), and autograd keeps several tensors of that size alive (the
logits, their log-softmax, the gradient). :func:`linear_cross_entropy` fuses the output layer
and the loss and works **by chunks of tokens**: for each chunk of ``c`` positions,

    z = h_c W^T (+ b)                  (c x V, the only vocabulary-sized tensor, freed after the chunk)
    loss += sum_i logsumexp(z_i) - z_i[y_i]
    dz = softmax(z) - onehot(y)        (rows of ignored positions zero)
    dh_c = dz W ;  dW += dz^T h_c ;  db += sum_i dz_i

so the gradient is computed in the forward pass and only ``dh`` (``N x d``), ``dW`` and ``db``
(the size of the output layer) are kept for the backward pass. This is a first-order function
(its backward is marked once-differentiable): it gives exact losses and gradients, hence exact
:meth:`~analysis.hessian.HessianOperator.gradient` and ``method="finite-difference"`` products
(:mod:`analysis.operators.finite_difference`), and it makes double backward and forward mode
fail loudly instead of silently dropping the softmax curvature.

:class:`ChunkedCausalLM` wraps a Hugging Face causal LM (anything with ``base_model`` returning
``last_hidden_state`` and ``get_output_embeddings()``) so that its forward returns this loss
(``output.loss``, the mean over counted next-token targets: labels not ``-100`` and not masked
by ``attention_mask``); use it with ``loss_fn="model_lm"``:

    >>> wrapped = ChunkedCausalLM(gpt2, chunk_tokens=256)                   # doctest: +SKIP
    >>> H = HessianOperator(wrapped, "model_lm", batch, method="finite-difference")  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .losses import lm_labels

#: the node that once-differentiable autograd functions put on their gradients (torch internal)
DelayedError = torch._C._functions.DelayedError

__all__ = ["linear_cross_entropy", "ChunkedCausalLM", "ChunkedLMOutput", "DEFAULT_CHUNK_TOKENS"]

_SECOND_ORDER = ("linear_cross_entropy (ChunkedCausalLM) is differentiable once: its gradient "
                 "holds no softmax curvature; use HessianOperator(..., "
                 "method='finite-difference')")

#: Positions per chunk (GPT-2: 1024 x 50,257 float32 logits = 206 MB at a time).
DEFAULT_CHUNK_TOKENS = 1024


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(h_i W^T + b, y_i)`` over positions with ``y_i != ignore_index``; the gradient
    is computed chunk by chunk in the forward pass (see the module docstring)."""

    @staticmethod
    def forward(h, weight, bias, labels, chunk, ignore_index):
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        dh = torch.zeros_like(h)
        dw = torch.zeros_like(weight)
        db = None if bias is None else torch.zeros_like(bias)
        for s in range(0, h.shape[0], chunk):
            hc, yc = h[s:s + chunk], labels[s:s + chunk]
            keep = yc != ignore_index
            if not bool(keep.any()):
                continue
            z = hc @ weight.T
            if bias is not None:
                z += bias
            lse = torch.logsumexp(z, dim=1)
            safe = torch.where(keep, yc, torch.zeros_like(yc))
            picked = z.gather(1, safe[:, None]).squeeze(1)
            total += ((lse - picked) * keep).sum(dtype=torch.float64)
            z.sub_(lse[:, None]).exp_()  # z <- softmax, in place: one c x V tensor
            z.scatter_add_(1, safe[:, None], -torch.ones_like(picked)[:, None])
            z.mul_(keep[:, None].to(z.dtype))
            dh[s:s + chunk] = z @ weight
            dw.addmm_(z.T, hc)
            if db is not None:
                db.add_(z.sum(0))
            del z
        return total.to(h.dtype), dh, dw, db

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dh, dw, db = output
        h, weight, bias = inputs[:3]
        ctx.has_bias = bias is not None
        extra = [db] if db is not None else []
        ctx.save_for_backward(dh, dw, *extra, h, weight, *([bias] if bias is not None else []))
        ctx.mark_non_differentiable(dh, dw, *extra)

    @staticmethod
    def backward(ctx, g, *_):
        saved = ctx.saved_tensors
        k = 3 if ctx.has_bias else 2
        grads, inputs = saved[:k], saved[k:]
        with torch.no_grad():
            grads = [g * t for t in grads]
        if torch.is_grad_enabled():
            # a graph of the gradient is asked for (double backward): tie each gradient to its
            # input through a node that raises when differentiated, rather than leave a
            # gradient that looks constant (its curvature would be silently zero)
            grads = [DelayedError(_SECOND_ORDER, 1)(t + 0 * x.reshape(-1)[:1].sum())
                     for t, x in zip(grads, inputs)]
        return grads[0], grads[1], (grads[2] if ctx.has_bias else None), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         bias: torch.Tensor | None = None,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                         ignore_index: int = -100) -> torch.Tensor:
    """``sum_i CE(h_i W^T + b, y_i)`` over the positions whose label is not ``ignore_index``,
    with at most ``chunk_tokens x V`` logits alive at a time (see the module docstring).

    Args:
        h: ``(N, d)`` hidden states.
        weight: ``(V, d)`` output layer (an output embedding).
        labels: ``(N,)`` integer targets.
        bias: ``(V,)`` or ``None``.
        chunk_tokens: positions per chunk (default :data:`DEFAULT_CHUNK_TOKENS`).
        ignore_index: the label that does not count.

    Returns:
        The summed loss (a scalar in ``h``'s dtype; accumulated in float64), differentiable
        once in ``h``, ``weight`` and ``bias``.

    Raises:
        ValueError: for mismatched shapes or a ``chunk_tokens`` that is not a positive integer.
    """
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"h must be (N, d) and weight (V, d), got {tuple(h.shape)} and "
                         f"{tuple(weight.shape)}")
    if labels.shape != (h.shape[0],):
        raise ValueError(f"labels must be ({h.shape[0]},), got {tuple(labels.shape)}")
    loss, *_ = _LinearCrossEntropy.apply(h, weight, bias, labels, chunk_tokens, ignore_index)
    return loss


@dataclass
class ChunkedLMOutput(Mapping):
    """The output of :class:`ChunkedCausalLM`: the loss only (no logits), readable as
    ``output.loss`` and ``output["loss"]``."""

    loss: torch.Tensor

    def __getitem__(self, key: str) -> Any:
        if key != "loss":
            raise KeyError(key)
        return self.loss

    def __iter__(self):
        return iter(("loss",))

    def __len__(self) -> int:
        return 1


class ChunkedCausalLM(nn.Module):
    """A causal LM whose forward returns its next-token loss computed by
    :func:`linear_cross_entropy` (no ``B x T x V`` logits).

    ``forward(input_ids, attention_mask=None, labels=None)`` runs ``lm.base_model`` to the
    last hidden states and returns :class:`ChunkedLMOutput` with the mean cross-entropy over the
    counted next-token targets (``labels``, else ``input_ids``; ``-100`` and masked positions
    do not count), the loss a Hugging Face causal LM computes, so that ``loss_fn="model_lm"``
    weights batches by the same tokens. The parameters are ``lm``'s (``model.lm.*``).

    Args:
        lm: e.g. a ``transformers.GPT2LMHeadModel``.
        chunk_tokens: positions per chunk of the output layer.
        ignore_index: the label that does not count.
    """

    def __init__(self, lm: nn.Module, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                 ignore_index: int = -100):
        super().__init__()
        if not (hasattr(lm, "base_model") and hasattr(lm, "get_output_embeddings")):
            raise TypeError(f"ChunkedCausalLM needs a causal LM with base_model and "
                            f"get_output_embeddings() (Hugging Face), got {type(lm).__name__}")
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be a positive integer, got {chunk_tokens!r}")
        self.lm = lm
        self.chunk_tokens = chunk_tokens
        self.ignore_index = ignore_index

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> ChunkedLMOutput:
        h = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        targets = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        y = lm_labels({k: v for k, v in targets.items() if v is not None}, self.ignore_index)
        y = y[:, 1:].reshape(-1)
        head = self.lm.get_output_embeddings()
        total = linear_cross_entropy(h[:, :-1].reshape(-1, h.shape[-1]), head.weight, y,
                                     bias=head.bias, chunk_tokens=self.chunk_tokens,
                                     ignore_index=self.ignore_index)
        count = (y != self.ignore_index).sum().clamp(min=1)
        return ChunkedLMOutput(loss=total / count)
