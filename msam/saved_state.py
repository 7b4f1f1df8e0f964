"""msam's saved-state format: move weights saved at the perturbed point back to ``w``.

A state dict of :class:`msam.MSAM`, :class:`msam.NAG` or :class:`msam.AdamWMSAM` records
``"perturbed"`` (whether the parameters were at ``w~ = w - c_g * d`` when it was taken), the
direction buffer ``d`` per parameter (``momentum_buffer``; ``exp_avg`` for AdamW-MSAM) and the
coefficient ``c_g`` actually applied per group (``"perturbation_scale"``). Code that reads
checkpoints (for example ``landscape.load_checkpoint``) calls :func:`unperturbed_parameters`
instead of decoding these keys itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from msam._checks import check_real, saved_flag
from msam._perturbation import PERTURBED_KEY, SCALE_KEY

__all__ = ["unperturbed_parameters"]

DIRECTION_KEYS = ("momentum_buffer", "exp_avg")


def _as_float(value: Any, name: str, gi: int) -> float:
    try:
        return check_real(name, value)
    except ValueError as exc:  # ArgumentTypeError included
        raise ValueError(f"unperturbed_parameters: group {gi}: {exc}; it is used to move the "
                         "weights back") from None


def _direction(st: Any) -> Tensor | None:
    if not isinstance(st, Mapping):
        return None
    for key in DIRECTION_KEYS:
        if isinstance(st.get(key), Tensor):
            return st[key]
    return None


def unperturbed_parameters(state_dict: Mapping[str, Any], params: Sequence[Tensor], *,
                           assume_perturbed: bool | None = None) -> list[Tensor]:
    r"""The unperturbed weights ``w`` from weights saved at MSAM's perturbed point ``w~``.

    For every parameter ``i`` of group ``g`` with a direction buffer ``d_i``
    (``momentum_buffer``, else ``exp_avg``)::

        w_i = w~_i + c_g * d_i        (computed in float64, returned in w~_i's dtype/device)

    with ``c_g`` the coefficient the optimizer applied, ``group["perturbation_scale"]``
    (``None`` means 0). A state without that entry (an older or foreign MSAM) uses the paper's
    definition ``c_g = rho_g * (lr_g if scale_by_lr) / ||d||`` (no division when
    ``normalize`` is False), ``||d||`` the global L2 norm over every buffer of every group
    (Becker et al. 2024, arXiv:2401.12033, Algorithm 1).

    Args:
        state_dict: an optimizer state dict (``optimizer.state_dict()``).
        params: the saved weights ``w~``, one tensor per optimizer parameter, in the
            optimizer's order (groups in order, parameters in group order).
        assume_perturbed: None reads ``state_dict["perturbed"]`` (absent means not perturbed,
            as in ``load_state_dict``); True moves back regardless (the caller detected the
            perturbation otherwise); False returns ``params`` unchanged.

    Returns:
        A new list; tensors that need no change are the input tensors themselves (not copied).

    Raises:
        ValueError: a malformed state, a count or shape mismatch (naming the group, the
            parameter index and both shapes), a non-finite or non-numeric coefficient or buffer,
            no way to know the coefficient (neither ``perturbation_scale`` nor ``rho``).
        TypeError: ``state_dict`` is not a mapping or ``params`` holds a non-tensor.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"unperturbed_parameters: expected an optimizer state dict, got "
                        f"{type(state_dict).__name__}")
    params = list(params)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"unperturbed_parameters: params[{i}] is a {type(p).__name__}, "
                            "expected a tensor")
    if assume_perturbed is None:
        perturbed = saved_flag(state_dict.get(PERTURBED_KEY, False),
                               "unperturbed_parameters: 'perturbed'")
    else:
        perturbed = bool(assume_perturbed)
    if not perturbed:
        return params
    groups = state_dict.get("param_groups")
    per_param = state_dict.get("state", {})
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise ValueError("unperturbed_parameters: 'param_groups' must be a list of dicts with a "
                         "'params' list")
    if not isinstance(per_param, Mapping):
        raise ValueError(f"unperturbed_parameters: 'state' must be a dict, got "
                         f"{type(per_param).__name__}")
    count = sum(len(g["params"]) for g in groups)
    if count != len(params):
        raise ValueError(f"unperturbed_parameters: the optimizer state has {count} parameters, "
                         f"{len(params)} were given")
    # (index into params, group index, buffer) for every parameter that was perturbed
    found: list[tuple[int, int, Tensor]] = []
    index = 0
    for gi, g in enumerate(groups):
        for pi, pid in enumerate(g["params"]):
            d = _direction(per_param.get(pid, per_param.get(str(pid))))
            p = params[index]
            if d is not None:
                if d.shape != p.shape:
                    raise ValueError(f"unperturbed_parameters: the direction buffer of parameter "
                                     f"{pi} of group {gi} has shape {tuple(d.shape)} but the "
                                     f"weight has shape {tuple(p.shape)}")
                if not bool(torch.isfinite(d).all()):
                    raise ValueError(f"unperturbed_parameters: the direction buffer of parameter "
                                     f"{pi} of group {gi} has inf or NaN entries")
                found.append((index, gi, d))
            index += 1
    if not found:
        return params
    scales: list[float] = []
    norm: float | None = None
    for gi, g in enumerate(groups):
        if SCALE_KEY in g:
            c = g[SCALE_KEY]
            scales.append(0.0 if c is None else _as_float(c, SCALE_KEY, gi))
            continue
        if g.get("rho") is None:
            raise ValueError(f"unperturbed_parameters: group {gi} records neither "
                             f"{SCALE_KEY!r} nor 'rho'; cannot move the weights back")
        coef = _as_float(g["rho"], "rho", gi)
        if g.get("scale_by_lr"):
            coef *= _as_float(g.get("lr", 1.0), "lr", gi)
        if g.get("normalize", True):
            if norm is None:
                norm = math.sqrt(sum(float(d.double().pow(2).sum()) for _, _, d in found))
            coef = coef / norm if norm > 0 else 0.0
        scales.append(coef)
    out = list(params)
    for i, gi, d in found:
        if scales[gi] == 0.0:
            continue
        w = params[i]
        out[i] = (w.double() + scales[gi] * d.to(w.device).double()).to(w.dtype)
    return out
