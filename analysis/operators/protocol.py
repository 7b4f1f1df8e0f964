"""The operator protocol every curvature algorithm takes, and the base class of torch operators.

An operator is a square ``n x n`` linear map on flat vectors that lives on one device in one
dtype. :class:`LinearOperator` is the structural type (a ``typing.Protocol``, checked with
``isinstance``): the curvature operators (:class:`~analysis.HessianOperator`,
:class:`~analysis.GGNOperator`), the adapters of :func:`~analysis.as_linear_operator`
(a dense tensor, any object with ``shape`` and ``matvec``) and a user's own class all satisfy it,
and :func:`~analysis.top_eigenpairs`, :func:`~analysis.hessian_trace`,
:func:`~analysis.spectral_density` and :func:`~analysis.per_layer_spectrum` need
nothing else.

:class:`TorchOperator` implements the protocol on top of one method, ``_apply(v)`` (the product
of a checked vector): validation of the vector (type, device, dtype, length), the product counter,
``matmat`` (a loop unless overridden), ``@`` and the scipy export (in the spirit of curvlinops'
``_torch_base.py``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class LinearOperator(Protocol):
    """A square linear operator on flat torch vectors (structural: anything with these members).

    Attributes:
        shape: ``(n, n)``.
        dtype: the dtype of the vectors it takes and returns.
        device: their device.
        num_matvecs: products computed so far (a block of ``k`` columns counts ``k``).

    Methods:
        matvec(v): ``A v`` for ``v`` of shape ``(n,)``.
        matmat(V): ``A V`` for an ``(n, k)`` block of columns.
        __matmul__(x): ``A @ x``, a vector or a block.
        to_scipy(): a ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out).
    """

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device
    num_matvecs: int

    def matvec(self, v: torch.Tensor) -> torch.Tensor: ...

    def matmat(self, V: torch.Tensor) -> torch.Tensor: ...

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor: ...

    def to_scipy(self) -> Any: ...


def to_scipy_operator(op: Any) -> Any:
    """A ``scipy.sparse.linalg.LinearOperator`` for a symmetric torch operator ``op``.

    Vectors come in as float64 numpy arrays, are moved to ``op.device`` and ``op.dtype`` for the
    product and come back as float64 numpy arrays (``rmatvec`` is ``matvec``: the operator is
    symmetric).
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator as ScipyOperator

    def mv(x):
        t = torch.as_tensor(np.asarray(x).reshape(-1)).to(device=op.device, dtype=op.dtype)
        return op.matvec(t).detach().cpu().double().numpy()

    def mm(X):
        t = torch.as_tensor(np.asarray(X)).to(device=op.device, dtype=op.dtype)
        return op.matmat(t).detach().cpu().double().numpy()

    return ScipyOperator(tuple(op.shape), matvec=mv, matmat=mm, rmatvec=mv, dtype=np.float64)


class TorchOperator:
    """Base of the torch operators: the :class:`LinearOperator` protocol over ``_apply``.

    Subclasses set :attr:`shape`, :attr:`device`, :attr:`dtype` and implement ``_apply(v)`` (the
    product of a checked vector); they may override :meth:`_check_vector` (extra checks) and
    :meth:`matmat` (batched products).
    """

    shape: tuple[int, int]
    device: torch.device
    dtype: torch.dtype
    num_matvecs: int = 0

    def _apply(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

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
        return self._check_length(v)

    def _check_length(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape != (self.shape[0],):
            raise ValueError(f"expected a vector of shape ({self.shape[0]},), got {tuple(v.shape)}")
        return v

    def _check_block(self, V: torch.Tensor) -> None:
        if not isinstance(V, torch.Tensor) or V.dim() != 2 or V.shape[0] != self.shape[0]:
            shape = tuple(V.shape) if isinstance(V, torch.Tensor) else type(V).__name__
            raise ValueError(f"expected an ({self.shape[0]}, k) matrix, got {shape}")

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for a flat vector ``v`` of shape ``(n,)`` (the operator's device and dtype).

        Raises:
            TypeError / ValueError: for a vector of the wrong type, dtype, device or length.
        """
        v = self._check_vector(v)
        out = self._apply(v)
        self.num_matvecs += 1
        return out

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """``A V`` for an ``(n, k)`` matrix of column vectors (``k`` products)."""
        self._check_block(V)
        cols = [self.matvec(V[:, j].contiguous()) for j in range(V.shape[1])]
        return torch.stack(cols, dim=1)

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        if isinstance(v, torch.Tensor) and v.dim() == 2:
            return self.matmat(v)
        return self.matvec(v)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self @ v

    def to_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy vectors in and out; each
        product moves the vector to the operator's device and dtype and back)."""
        return to_scipy_operator(self)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(n={self.shape[0]}, device={self.device}, "
                f"dtype={self.dtype}, num_matvecs={self.num_matvecs})")
