"""Finite-difference Hessian-vector products: the one product method that needs only a gradient.

The central difference of the gradient ``g = grad L`` along ``v`` with step ``h``,

    H v  ~  FD_h(v) = (g(w + h v) - g(w - h v)) / (2 h),

costs two gradients and the memory of one (no second-order graph, no forward-mode tangents), and
works under any engine that can compute a gradient: a sharded or offloaded model, a fused kernel
without double-backward support, a compiled model. :class:`~analysis.hessian.HessianOperator`
uses it with ``method="finite-difference"`` (per batch, through ``torch.func.functional_call``
at the two shifted points: the model is never modified); :func:`finite_difference_product` is the
same product for a gradient the caller computes on the live parameters (it shifts them in place
and restores them bitwise, also when the gradient raises).

Error model. With ``phi(t) = g(w + t v)`` (Taylor, ``phi`` smooth),

    FD_h(v) - H v = (h^2 / 6) phi'''(0) + O(h^4)            truncation, phi'''(0) = D^3 g(w)[v, v, v]
                  + O(u (||g|| + ||H|| ||w||) / h)           rounding

where ``u`` is the unit roundoff of the parameters' dtype (``finfo(dtype).eps / 2``): each
computed gradient carries an error of about ``u ||g||`` (more for long sums) and the shifted point
``w + h v`` is itself rounded by ``u |w|``, which moves the gradient by ``H`` times that; the
difference divides both by ``2 h``. The truncation error falls as ``h^2`` and the rounding
error grows as ``1 / h``; their sum is smallest for a shift ``||h v|| ~ u^(1/3)`` in the scale on
which the loss bends, where both are ``O(u^(2/3))``. The default step is therefore

    h = r / ||v||,        ||h v|| = r = u^(1/3)   (float64: 4.8e-6, float32: 3.9e-3)

(Nocedal & Wright, *Numerical Optimization*, 2nd ed., Sec. 8.1), a shift of fixed length in
parameter space. The loss of a network bends on the scale of its sharpest directions, not of
``||w||``: a shift of ``r max(1, ||w||)``, the first rule tried, moved GPT-2 small (``||w|| =
223``) by 0.87 along a unit vector, far in the nonlinear regime of its top eigenvector (on a
3.4M-parameter GPT-2 with ``||w|| = 41`` the product along its top eigenvector was 75% off at
that shift, 0.03% at 1e-3; Lanczos then stopped at 15.3 on GPT-2 small, whose top eigenvalue is
337). The shift must also stay representable next to ``w``, ``r >> u max |w_i|``, which holds
for weights of order one. The relative error of products is then about ``u^(2/3)`` times the
ratio of the third to the second derivative at that scale: measured against dense float64
Hessians, ``4e-11`` (tanh MLP) and ``3e-10`` (tiny causal LM) in float64, ``2.5e-5`` and
``1.9e-4`` in float32, where the exact float32 products are off by ``1.1e-7`` and ``1.3e-7``
(``tests/analysis/test_finite_difference.py``). Kinks (ReLU) put ``phi`` outside the
assumption where ``w +- h v`` straddles one; the product is then a secant, not ``H v``.

Forward differences. With the gradient ``g(w)`` at hand (it is computed once, for the start
vector of Lanczos and every later product),

    H v  ~  FD+_h(v) = (g(w + h v) - g(w)) / h

costs one gradient per product instead of two. Its truncation error is first order,
``(h / 2) phi''(0) + O(h^2)`` with ``phi''(0) = D^2 g(w)[v, v]``, against the same rounding
``O(u (||g|| + ||H|| ||w||) / h)``; their sum is smallest for ``||h v|| ~ u^(1/2)``, where both are ``O(u^(1/2))``, hence

    h = r / ||v||,        ||h v|| = r = u^(1/2)   (float64: 1.1e-8, float32: 2.4e-4)

(:func:`default_shift` with ``scheme="forward"``). The relative error is then about ``u^(1/2)``
times the ratio of the third to the second derivative (measured against dense float64 Hessians
in ``tests/analysis/test_forward_difference.py``): ample for eigenvalues at ``tol=1e-2``, not for
``tol`` near ``sqrt(u)``.

Memory: the two gradients and the result (three vectors of ``n``) and, for
:func:`finite_difference_product`, a copy of the parameters (the bitwise restoration); the
working memory of one gradient (activations), not of a second-order product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["SCHEMES", "default_shift", "finite_difference_step", "finite_difference_product",
           "check_shift"]

#: The difference schemes: ``"central"`` (two gradients a product, error ``O(h^2)``) and
#: ``"forward"`` (one gradient a product given ``g(w)``, error ``O(h)``).
SCHEMES = ("central", "forward")


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def default_shift(dtype: torch.dtype, scheme: str = "central") -> float:
    """The default shift ``||h v||`` for the unit roundoff ``u = finfo(dtype).eps / 2`` of a
    floating dtype: ``u^(1/3)`` for central differences (float64 4.8e-6, float32 3.9e-3,
    bfloat16 0.16), ``u^(1/2)`` for forward differences (float64 1.1e-8, float32 2.4e-4); see
    the module docstring."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    _check_scheme(scheme)
    return (torch.finfo(dtype).eps / 2) ** (1.0 / 3.0 if scheme == "central" else 0.5)


def check_shift(shift: float | None) -> None:
    """Raise ``ValueError`` unless ``shift`` is ``None`` or a number in ``(0, 1)``."""
    if shift is None:
        return
    if isinstance(shift, bool) or not isinstance(shift, (int, float)) \
            or not math.isfinite(shift) or not 0 < shift < 1:
        raise ValueError(f"shift must be a number in (0, 1) or None, got {shift!r}")


def finite_difference_step(v_norm: float, dtype: torch.dtype, shift: float | None = None,
                           scheme: str = "central") -> float:
    """The step ``h = r / ||v||`` of the difference along ``v``: a shift ``h v`` of length ``r``.

    Args:
        v_norm: ``||v||`` (positive).
        dtype: the parameters' dtype (sets the default ``r``).
        shift: ``r``; default :func:`default_shift` of ``scheme`` (central ``u^(1/3)``,
            forward ``u^(1/2)``).
        scheme: ``"central"`` or ``"forward"`` (:data:`SCHEMES`).

    Raises:
        ValueError: for a ``shift`` outside ``(0, 1)``, an unknown ``scheme``, or a ``v_norm``
            that is not finite and positive.
    """
    check_shift(shift)
    _check_scheme(scheme)
    if not (math.isfinite(v_norm) and v_norm > 0):
        raise ValueError(f"the vector norm must be finite and positive, got {v_norm!r}")
    r = default_shift(dtype, scheme) if shift is None else float(shift)
    return r / float(v_norm)


def finite_difference_product(gradient: Callable[[], torch.Tensor],
                              params: Sequence[torch.Tensor], v: torch.Tensor, *,
                              step: float | None = None,
                              shift: float | None = None,
                              base: torch.Tensor | None = None) -> torch.Tensor:
    """``H v ~ (g(w + h v) - g(w - h v)) / (2 h)`` for a gradient computed on live parameters
    (with ``base = g(w)``: the forward difference ``(g(w + h v) - g(w)) / h``, one gradient).

    The parameters are shifted in place to ``w + h v``, then to ``w - h v`` (each from a saved
    copy of ``w``, so both points are rounded once and symmetrically), ``gradient()`` is called
    at each, and the parameters are restored **bitwise** from the copy, also when ``gradient``
    raises. This is the product for engines that can only compute a gradient of the model as it
    is (a sharded model: issue 24 builds on it); :class:`~analysis.hessian.HessianOperator`'s
    ``method="finite-difference"`` computes the same difference without touching the model.

    Args:
        gradient: a function of no arguments returning the flat gradient ``g(w)`` at the
            current values of ``params`` (a 1-D tensor of length ``n``, in their order).
        params: the parameter tensors (``n`` entries in all, one device and dtype), modified
            in place during the call and restored bitwise.
        v: the flat direction, length ``n``.
        step: ``h``; default :func:`finite_difference_step` with ``shift``.
        shift: ``r = ||h v||`` of the default step (default ``u^(1/3)``, forward ``u^(1/2)``,
            see the module docstring).
        base: the flat gradient ``g(w)`` at the current parameters, or ``None``; given, the
            product is the forward difference (``gradient`` is called once, at ``w + h v``).

    Returns:
        The product, a flat tensor of length ``n`` in the gradient's dtype (zeros for ``v = 0``,
        without calling ``gradient``).

    Raises:
        TypeError: ``params`` are not tensors or ``v`` is not a tensor.
        ValueError: a length mismatch, a non-finite ``v``, or a ``step`` that is not a positive
            finite number; raised before anything is changed.
    """
    params = list(params)
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise TypeError("params must be a non-empty sequence of tensors")
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"v must be a torch.Tensor, got {type(v).__name__}")
    n = sum(p.numel() for p in params)
    if v.shape != (n,):
        raise ValueError(f"v must have shape ({n},) (the parameters' size), got {tuple(v.shape)}")
    if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                             or not math.isfinite(step) or step <= 0):
        raise ValueError(f"step must be a positive finite number or None, got {step!r}")
    check_shift(shift)
    if base is not None and (not isinstance(base, torch.Tensor) or base.shape != (n,)):
        raise ValueError(f"base must be the flat gradient g(w), a tensor of shape ({n},), got "
                         f"{tuple(base.shape) if isinstance(base, torch.Tensor) else base!r}")
    v_norm = float(torch.linalg.vector_norm(v.detach(), dtype=torch.float64))
    if not math.isfinite(v_norm):
        raise ValueError("v is not finite (it contains inf or nan)")
    if v_norm == 0:
        return torch.zeros(n, device=params[0].device, dtype=params[0].dtype)
    scheme = "central" if base is None else "forward"
    h = float(step) if step is not None else finite_difference_step(v_norm, params[0].dtype,
                                                                    shift, scheme)
    parts = [t.view_as(p) for t, p in zip(torch.split(v.detach(), [p.numel() for p in params]),
                                          params)]
    saved = [p.detach().clone() for p in params]
    try:
        with torch.no_grad():
            for p, s, d in zip(params, saved, parts):
                p.copy_(s).add_(d.to(p.dtype), alpha=h)
        plus = gradient().detach().clone()
        if base is None:
            with torch.no_grad():
                for p, s, d in zip(params, saved, parts):
                    p.copy_(s).add_(d.to(p.dtype), alpha=-h)
            minus = gradient().detach()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    if base is not None:
        if plus.shape != (n,):
            raise ValueError(f"gradient() must return a flat tensor of length {n}, got "
                             f"{tuple(plus.shape)}")
        return plus.sub_(base.detach().to(plus.dtype)).div_(h)
    if plus.shape != (n,) or minus.shape != (n,):
        raise ValueError(f"gradient() must return a flat tensor of length {n}, got "
                         f"{tuple(plus.shape)} and {tuple(minus.shape)}")
    return plus.sub_(minus).div_(2 * h)
