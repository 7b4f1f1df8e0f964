"""APGD (Croce & Hein 2020) in the normalized coordinates ``u = delta / c``: projected ascent
with momentum and step halving at checkpoints, and its random starting points."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..params import ParameterSpace
from ._common import nonfinite


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step: ``ceil(p_j * steps)`` with ``p_0 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)`` (Croce & Hein 2020). For 20 steps:
    ``[5, 9, 12, 14, 16, 18, 19, 20]``."""
    p = [0.0, 0.22]
    w = [0, math.ceil(round(steps * 0.22, 9))]
    while w[-1] < steps and w[-1] != w[-2]:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
        w.append(math.ceil(round(p[-1] * steps, 9)))  # round: 0.70 * 20 is 14, not 14.000001
    return w[1:]


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    n = torch.linalg.vector_norm(u)
    return u * torch.clamp(rho / n.clamp_min(torch.finfo(u.dtype).tiny), max=1.0)


def _ascent_direction(gu: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return gu.sign()
    n = torch.linalg.vector_norm(gu)
    return gu / n.clamp_min(torch.finfo(gu.dtype).tiny)


def apgd(
    objective: Callable[[torch.Tensor, bool, str], tuple[torch.Tensor, torch.Tensor | None]],
    c: torch.Tensor,
    u0: torch.Tensor,
    rho: float,
    norm: str,
    steps: int,
    start: tuple[float, torch.Tensor] | None = None,
    momentum: float = 0.75,
    return_point: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """Maximize ``f(delta)`` over ``||delta / c||_p <= rho`` by APGD; returns the best value seen
    (and, with ``return_point``, the ``delta = c u`` where it was seen).

    ``objective(delta, need_grad, where)`` returns ``(loss, grad_delta or None)``. ``start`` is
    ``(f, grad)`` at ``u0`` when already known (zero start: the unperturbed forward/backward).
    """
    checkpoints = set(apgd_checkpoints(steps))
    u = u0
    if start is None:
        f_t, g = objective(c * u, True, "at the APGD start")
        f = float(f_t)
    else:
        f, g = start
    if not math.isfinite(f):
        raise nonfinite(f, "at the APGD start")
    best_f, best_u, best_g = f, u, g
    u_prev = u
    eta = 2.0 * rho
    n_up = 0
    last_cp = 0
    last_best = best_f
    last_eta = eta
    for k in range(steps):
        s = _ascent_direction(c * g, norm)
        z = _project(u + eta * s, rho, norm)
        a = 1.0 if k == 0 else momentum
        u_new = _project(u + a * (z - u) + (1.0 - a) * (u - u_prev), rho, norm)
        u_prev, u = u, u_new
        need_grad = k < steps - 1
        f_t, g_new = objective(c * u, need_grad, f"at APGD step {k + 1}")
        f_new = float(f_t)
        if not math.isfinite(f_new):
            raise nonfinite(f_new, f"at APGD step {k + 1}")
        if f_new > f:
            n_up += 1
        f = f_new
        if g_new is not None:
            g = g_new
        if f > best_f:
            best_f, best_u, best_g = f, u, g
        if k + 1 in checkpoints:
            cond1 = n_up < 0.75 * (k + 1 - last_cp)
            cond2 = last_eta == eta and last_best == best_f
            last_cp, last_best, last_eta, n_up = k + 1, best_f, eta, 0
            if cond1 or cond2:
                eta /= 2.0
                u, u_prev, g, f = best_u, best_u, best_g, best_f
    return (best_f, c * best_u) if return_point else best_f


def random_start(space: ParameterSpace, rho: float, norm: str, gen: torch.Generator,
                 scale: float = 0.1) -> torch.Tensor:
    """A random point of size ``scale * rho`` (default 0.1) in the normalized coordinates."""
    if norm == "linf":
        u = (2 * torch.rand(space.numel, generator=gen, dtype=torch.float64) - 1) * (scale * rho)
    else:
        u = torch.randn(space.numel, generator=gen, dtype=torch.float64)
        u = u * (scale * rho / u.norm())
    return u.to(device=space.device, dtype=space.dtype)
