"""Adapters to the operator protocol, and the one convenience layer for model + loss + data.

:func:`as_linear_operator` is what every algorithm calls on its first argument: an operator that
satisfies :class:`~analysis.LinearOperator` is used as is, a square tensor or an object
with ``shape`` and ``matvec`` (or ``@``) is wrapped, and a model with a loss and data becomes a
:class:`~analysis.HessianOperator` built from the keywords of :data:`OPERATOR_KEYWORDS`
only; any other keyword is a ``TypeError`` that names it and the allowed ones (it used to flow
into the operator's constructor).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..data import Data
from ..losses import LossSpec
from .curvature import CurvatureOperator
from .hessian import HessianOperator
from .protocol import LinearOperator, TorchOperator

#: The keywords :func:`as_linear_operator` passes on to :class:`~analysis.HessianOperator`.
OPERATOR_KEYWORDS = ("params", "mode", "check_deterministic", "batch_size", "method",
                     "fd_shift", "microbatch_size", "offload")


class _TensorOperator(TorchOperator):
    """A dense symmetric matrix as an operator (tests, known spectra)."""

    def __init__(self, A: torch.Tensor):
        if A.dim() != 2 or A.shape[0] != A.shape[1]:
            raise ValueError(f"a matrix operator must be square, got shape {tuple(A.shape)}")
        self.A = A
        self.shape = tuple(A.shape)
        self.device, self.dtype = A.device, A.dtype
        self.num_matvecs = 0

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += 1
        return self.A @ v

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        self.num_matvecs += V.shape[1]
        return self.A @ V


class _CallableOperator(TorchOperator):
    """Any object with ``shape`` and ``matvec`` (or ``@``) as a counted operator."""

    def __init__(self, obj: Any):
        self.obj = obj
        n = int(obj.shape[0])
        self.shape = (n, n)
        self.device = getattr(obj, "device", torch.device("cpu"))
        self.dtype = getattr(obj, "dtype", torch.float64)
        if not isinstance(self.dtype, torch.dtype):
            self.dtype = torch.float64
        self.num_matvecs = 0

    def matvec(self, v):
        self.num_matvecs += 1
        if hasattr(self.obj, "matvec"):
            return self.obj.matvec(v)
        return self.obj @ v


def _check_keywords(kwargs: dict) -> None:
    unknown = [k for k in kwargs if k not in OPERATOR_KEYWORDS]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise TypeError(
            f"unknown operator keyword{'s' if len(unknown) > 1 else ''} {names}; a model's "
            f"Hessian operator takes {', '.join(OPERATOR_KEYWORDS)}"
        )


def as_linear_operator(obj: Any, loss_fn: LossSpec = None, data: Data = None,
                       **operator_kwargs: Any) -> LinearOperator:
    """Turn ``obj`` into an operator of the :class:`~analysis.LinearOperator` protocol.

    Args:
        obj: a model (``nn.Module``: then ``loss_fn`` and ``data`` are required and a
            :class:`~analysis.HessianOperator` is built), an operator satisfying the
            protocol (returned as is), a square tensor, or any object with ``shape`` and
            ``matvec`` / ``@`` (wrapped, with a product counter).
        loss_fn: the loss (with a model only).
        data: the data (with a model only), see :mod:`analysis.data`.
        **operator_kwargs: with a model only, exactly the keywords of :data:`OPERATOR_KEYWORDS`:
            ``params``, ``mode``, ``check_deterministic``, ``batch_size``, ``method``,
            ``fd_shift``, ``microbatch_size`` (see :class:`~analysis.HessianOperator`).

    Raises:
        TypeError: for a keyword outside :data:`OPERATOR_KEYWORDS` (naming it and the allowed
            ones), for operator keywords given with an operator, or for an unsupported ``obj``.
        ValueError: for ``loss_fn``/``data`` given with an operator, or a model without data.
    """
    _check_keywords(operator_kwargs)
    if isinstance(obj, nn.Module):
        if data is None:
            raise ValueError("data is required when a model is passed (got None)")
        return HessianOperator(obj, loss_fn, data, **operator_kwargs)
    if loss_fn is not None or data is not None:
        raise ValueError("pass loss_fn and data only with a model, not with an operator")
    if operator_kwargs:
        raise TypeError(
            f"operator keywords ({', '.join(operator_kwargs)}) only apply when a model is "
            f"passed, not with a {type(obj).__name__}"
        )
    if isinstance(obj, CurvatureOperator):
        return obj
    if isinstance(obj, torch.Tensor):
        return _TensorOperator(obj)
    if hasattr(obj, "shape") and (hasattr(obj, "matvec") or hasattr(obj, "__matmul__")):
        shape = tuple(obj.shape)
        if len(shape) != 2 or shape[0] != shape[1]:
            raise ValueError(f"the operator must be square, got shape {shape}")
        return obj if isinstance(obj, LinearOperator) else _CallableOperator(obj)
    raise TypeError(
        f"expected a model, a curvature operator, a square tensor or an object with shape and "
        f"matvec; got {type(obj).__name__}"
    )
