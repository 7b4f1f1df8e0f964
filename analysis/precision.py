"""Working precision of the analyses: autocast turned off, and the floor a dtype sets on accuracy.

Autocast. Every analysis of the toolkit (curvature products and their gradients, Lanczos,
Hutchinson, stochastic Lanczos quadrature, the sharpness metrics, the curvature tracker)
measures the model **as stored**, in the dtype of its parameters. Called inside
``torch.autocast`` (e.g. from a mixed-precision training loop) it runs outside it:
:func:`autocast_disabled` turns autocast off for every device type where it is on and restores
it on exit. Under autocast the products would be rounded to bfloat16 / float16 while the error
bounds of :mod:`analysis.lanczos` assume the parameters' precision (inside ``autocast(bf16)`` a
float32 model reported a bound of ``1e-6`` at a true error of ``8e-4`` against a dense float64
Hessian). To analyse the model in half precision, convert it (``model.to(torch.bfloat16)``, the
CLI's ``--dtype bfloat16``): then the bounds know the precision (:func:`precision_floor`).

Precision floor. Products computed in a dtype of machine epsilon ``eps`` carry rounding errors of
about ``eps ||H||``; no eigenvalue bound below it can be trusted, so :mod:`analysis.lanczos`
floors its bounds at ``sqrt(m) max(noise, 4 eps ||T||)`` and stops there
(:func:`precision_floor` gives the relative floor ``4 eps``: ``3.1e-2`` in bfloat16, ``3.9e-3``
in float16, ``4.8e-7`` in float32).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch

__all__ = ["autocast_disabled", "AUTOCAST_DEVICE_TYPES", "precision_floor", "is_half",
           "warn_half_precision", "FloorWatch", "FLOOR_PATIENCE"]

#: Products after which a run whose ``tol`` lies below the precision floor stops (see
#: :class:`FloorWatch`).
FLOOR_PATIENCE = 10

#: The device types whose autocast state :func:`autocast_disabled` checks.
AUTOCAST_DEVICE_TYPES: tuple[str, ...] = ("cpu", "cuda", "xpu", "mps")

_HALF = (torch.bfloat16, torch.float16)


def _autocast_on(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except (RuntimeError, TypeError, ValueError):  # a device type this build does not know
        return False


@contextlib.contextmanager
def autocast_disabled() -> Iterator[list[str]]:
    """Run the block with autocast off on every device type where it is on (restored on exit).

    ``torch.autocast(device_type, enabled=False)`` is entered for each device type of
    :data:`AUTOCAST_DEVICE_TYPES` with ``torch.is_autocast_enabled(device_type)``; outside
    autocast this is a no-op. Usable as a decorator. Yields the device types turned off.

    Example:
        >>> import torch
        >>> from analysis.precision import autocast_disabled
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     with autocast_disabled() as off:
        ...         print(off, (torch.ones(2, 2) @ torch.ones(2, 2)).dtype)
        ['cpu'] torch.float32
    """
    on = [d for d in AUTOCAST_DEVICE_TYPES if _autocast_on(d)]
    with contextlib.ExitStack() as stack:
        for d in on:
            stack.enter_context(torch.autocast(device_type=d, enabled=False))
        yield on


def is_half(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is bfloat16 or float16."""
    return dtype in _HALF


def precision_floor(dtype: torch.dtype) -> float:
    """The relative accuracy floor of products in ``dtype``: ``4 eps`` (``eps`` its machine
    epsilon; ``3.1e-2`` for bfloat16, ``3.9e-3`` for float16, ``4.8e-7`` for float32). An
    eigenvalue bound relative to ``|lambda|`` below it is not reachable; it grows further with
    the square root of the basis size (see :mod:`analysis.lanczos`)."""
    return 4.0 * float(torch.finfo(dtype).eps)


def warn_half_precision(dtype: torch.dtype, tol: float, where: str, stacklevel: int = 3) -> bool:
    """Warn (``UserWarning``) when ``dtype`` is bfloat16 / float16; returns whether it warned.

    The message names the dtype, its floor (:func:`precision_floor`) and whether ``tol`` is
    below it (then the analysis stops at the floor with ``converged=False``).
    """
    if not is_half(dtype):
        return False
    floor = precision_floor(dtype)
    name = str(dtype).replace("torch.", "")
    reach = (f"tol={tol:g} is below it: the run stops at the floor with converged=False"
             if tol < floor else f"tol={tol:g} is above it")
    warnings.warn(
        f"{where}: the operator is in {name} (machine epsilon {torch.finfo(dtype).eps:.2g}); "
        f"eigenvalues are resolved to about {floor:.2g} |lambda| at best ({reach}). Convert the "
        "model to float32 for tighter bounds.", UserWarning, stacklevel=stacklevel)
    return True


class FloorWatch:
    """When an iterative eigensolver whose ``tol`` is below the precision floor should stop.

    :meth:`update` is called after each product with the floor of the bounds (``sqrt(m)
    max(noise, 4 eps ||T||)`` in :mod:`analysis.lanczos`), the unfloored bounds ``raw`` and the
    residuals ``r`` of the wanted pairs and their scales ``|theta_i|``. It returns a reason (a
    string starting ``"precision floor"``) when ``floor > tol |theta_i|`` for some wanted pair
    (bounds that small are not reachable in the products' dtype) and, for the last ``patience``
    products, either the unfloored bounds stayed below the floor or the largest relative
    residual improved by less than 2x (it stagnates at the rounding level); else None. The
    patience lets the Krylov space see the top of the spectrum first (at a loose floor an early
    Ritz value can sit near a lower eigenvalue).

    :meth:`level` gives the floor: ``sqrt(m) max(noise, rel ||T||)`` with ``rel = 4 eps`` of the
    products' ``dtype``, or, with a narrow Krylov basis of ``basis_dtype`` (epsilon ``eps_b``)
    for vectors of ``n`` entries, at least ``eps_b / sqrt(n)`` (its rounded rows are orthogonal
    to the exact ones to about that) and ``4 eps_b^2`` after a thick restart (the kept Ritz
    vectors are rounded: their Rayleigh quotients move by ``~eps_b^2 ||H||``); the reason then
    names the basis.
    """

    def __init__(self, dtype: torch.dtype, patience: int = FLOOR_PATIENCE, *,
                 basis_dtype: torch.dtype | None = None, n: int = 1):
        self.name = str(dtype).replace("torch.", "")
        self.source = f"the products' {self.name} precision"
        self.rel = precision_floor(dtype)
        eps_b = 0.0 if basis_dtype is None else float(torch.finfo(basis_dtype).eps)
        self.basis_name = str(basis_dtype).replace("torch.", "") + " basis"
        self.narrow = (eps_b / math.sqrt(max(int(n), 1)), 4 * eps_b ** 2)
        self.patience = int(patience)
        self.best: list[float] = []  # per product: the largest relative residual of the wanted
        self.settled = 0  # consecutive products with the unfloored bounds below the floor

    def level(self, m: int, noise: float, tnorm: float, restarted: bool = False) -> float:
        """The floor of the bounds of an ``m``-vector basis: ``sqrt(m) max(noise, rel tnorm)``
        (``noise`` the measured rounding level, ``tnorm ~ ||T||``; see the class docstring)."""
        rel = self.rel
        narrow = max(self.narrow[0], self.narrow[1] if restarted else 0.0)
        if narrow > rel:
            rel, self.name = narrow, self.basis_name
            self.source = f"the {self.name}'s rounding (store it wider)"
        return math.sqrt(m) * max(noise, rel * tnorm)

    def update(self, floor: float, raw: torch.Tensor, r: torch.Tensor, scale: torch.Tensor,
               tol: float) -> str | None:
        """Record one product; the reason to stop, or None (see the class docstring)."""
        p, name = self.patience, self.name
        self.best.append(float((r / scale).max()))
        if not bool((floor > tol * scale).any()):
            self.settled = 0
            return None
        self.settled = self.settled + 1 if bool((raw <= floor).all()) else 0
        if self.settled >= p:
            what = f"the bounds stayed at the {name} rounding floor {floor:.3g}"
        elif len(self.best) > p and min(self.best[-p:]) > 0.5 * min(self.best[:-p]):
            what = (f"the residuals stopped improving over {p} products at "
                    f"{self.best[-1]:.3g} relative, near the {name} rounding floor {floor:.3g}")
        else:
            return None
        return (f"precision floor: {what}, above tol={tol:g} x |theta| "
                f"(={float((tol * scale).min()):.3g}); {self.source} cannot resolve a smaller "
                "error")
