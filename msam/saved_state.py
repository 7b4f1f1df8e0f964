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

__all__ = ["direction_buffer", "DIRECTION_KEYS"]

#: the state entries that hold the direction ``d`` of the perturbation, in lookup order
DIRECTION_KEYS = ("momentum_buffer", "exp_avg")


class SavedStateError(ValueError):
    """A saved optimizer state that cannot be used to move the weights back, with where and why.

    The message is one line for people; the attributes let a caller (a checkpoint loader)
    name the entry in its own terms.

    Attributes:
        reason: ``"structure"`` (not a list of groups / not a dict of states), ``"count"``
            (number of parameters), ``"shape"`` (buffer vs weight), ``"buffer_not_finite"``,
            ``"not_a_number"``, ``"not_finite"``, ``"not_a_flag"``, ``"no_coefficient"`` or
            ``"overflow"`` (the moved weight is not finite in its dtype; ``value`` is ``c_g``).
        key: the entry concerned: a group key (``"perturbation_scale"``, ``"rho"``, ``"lr"``,
            ``"scale_by_lr"``, ``"normalize"``), a state key (``"momentum_buffer"``,
            ``"exp_avg"``) or None.
        group: index of the parameter group, or None.
        index: index of the parameter within its group, or None.
        position: index of the parameter in ``params`` (all groups in order), or None.
        value: the offending value (the buffer for ``"shape"``/``"buffer_not_finite"``).
    """

    def __init__(self, message: str, *, reason: str, key: str | None = None,
                 group: int | None = None, index: int | None = None,
                 position: int | None = None, value: Any = None):
        super().__init__(message)
        self.reason, self.key, self.value = reason, key, value
        self.group, self.index, self.position = group, index, position


def _as_float(g: Mapping[str, Any], name: str, gi: int, default: Any = None) -> float:
    value = g.get(name, default)
    try:
        return check_real(name, value)
    except ValueError as exc:  # ArgumentTypeError included
        reason = "not_a_number" if isinstance(exc, TypeError) else "not_finite"
        raise SavedStateError(f"unperturbed_parameters: group {gi}: {exc}; it is used to move "
                              "the weights back", reason=reason, key=name, group=gi,
                              value=value) from None


def _as_flag(g: Mapping[str, Any], name: str, gi: int, default: bool) -> bool:
    """A saved flag: a bool, 0/1 or a one-element real tensor holding one of them."""
    value = raw = g.get(name, default)
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise SavedStateError(f"unperturbed_parameters: group {gi}: {name!r} must be True or False, "
                          f"got {raw!r}", reason="not_a_flag", key=name, group=gi, value=raw)


def direction_buffer(param_state: Any) -> Tensor | None:
    """The direction ``d`` in one parameter's saved state (``momentum_buffer``, else
    ``exp_avg``); None when it has none (that parameter was not perturbed)."""
    if not isinstance(param_state, Mapping):
        return None
    for key in DIRECTION_KEYS:
        if isinstance(param_state.get(key), Tensor):
            return param_state[key]
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
        SavedStateError: (a ValueError) a malformed state, a count or shape mismatch (naming
            the group, the parameter index and both shapes), a non-finite or non-numeric
            coefficient or buffer, a flag (``scale_by_lr``, ``normalize``, ``perturbed``) that
            is not boolean, no way to know the coefficient (neither ``perturbation_scale`` nor
            ``rho``), a moved weight that overflows its dtype; its attributes say which entry.
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
        try:
            perturbed = saved_flag(state_dict.get(PERTURBED_KEY, False),
                                   "unperturbed_parameters: 'perturbed'")
        except ValueError as exc:
            raise SavedStateError(str(exc), reason="not_a_flag", key=PERTURBED_KEY,
                                  value=state_dict.get(PERTURBED_KEY)) from None
    else:
        perturbed = bool(assume_perturbed)
    if not perturbed:
        return params
    groups = _groups(state_dict, len(params))
    found = _directions(groups, state_dict["state"], params)
    if not found:
        return params
    scales = _coefficients(groups, [d for _, _, d in found])
    out = list(params)
    for i, gi, d in found:
        if scales[gi] == 0.0:
            continue
        w = params[i]
        wide = torch.complex128 if w.is_complex() or d.is_complex() else torch.float64
        out[i] = (w.to(wide) + scales[gi] * d.to(w.device, wide)).to(w.dtype)
        if not bool(torch.isfinite(out[i]).all()) and bool(torch.isfinite(w).all()):
            pi = i - sum(len(g["params"]) for g in groups[:gi])
            raise SavedStateError(
                f"unperturbed_parameters: moving parameter {pi} of group {gi} back overflows "
                f"{w.dtype} (coefficient {scales[gi]:.3g})", reason="overflow", group=gi,
                index=pi, position=i, value=scales[gi])
    return out


def _groups(state_dict: Mapping[str, Any], count: int) -> list[Mapping[str, Any]]:
    """The saved parameter groups, checked against the number of weights given."""
    groups = state_dict.get("param_groups")
    per_param = state_dict.get("state", {})
    if not isinstance(groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple)) for g in groups):
        raise SavedStateError("unperturbed_parameters: 'param_groups' must be a list of dicts "
                              "with a 'params' list", reason="structure", key="param_groups",
                              value=groups)
    if not isinstance(per_param, Mapping):
        raise SavedStateError(f"unperturbed_parameters: 'state' must be a dict, got "
                              f"{type(per_param).__name__}", reason="structure", key="state",
                              value=per_param)
    saved = sum(len(g["params"]) for g in groups)
    if saved != count:
        raise SavedStateError(f"unperturbed_parameters: the optimizer state has {saved} "
                              f"parameters, {count} were given", reason="count", value=saved)
    return list(groups)


def _directions(groups: list[Mapping[str, Any]], per_param: Mapping[Any, Any],
                params: list[Tensor]) -> list[tuple[int, int, Tensor]]:
    """(index into params, group index, buffer) for every parameter that was perturbed."""
    found: list[tuple[int, int, Tensor]] = []
    index = 0
    for gi, g in enumerate(groups):
        for pi, pid in enumerate(g["params"]):
            st = per_param.get(pid, per_param.get(str(pid)))
            d = direction_buffer(st)
            p = params[index]
            if d is not None:
                key = next(k for k in DIRECTION_KEYS if st.get(k) is d)
                where = dict(key=key, group=gi, index=pi, position=index, value=d)
                if d.shape != p.shape:
                    raise SavedStateError(
                        f"unperturbed_parameters: the direction buffer of parameter {pi} of "
                        f"group {gi} has shape {tuple(d.shape)} but the weight has shape "
                        f"{tuple(p.shape)}", reason="shape", **where)
                if not bool(torch.isfinite(d).all()):
                    raise SavedStateError(
                        f"unperturbed_parameters: the direction buffer of parameter {pi} of "
                        f"group {gi} has inf or NaN entries", reason="buffer_not_finite", **where)
                found.append((index, gi, d))
            index += 1
    return found


def _coefficients(groups: list[Mapping[str, Any]], dirs: list[Tensor]) -> list[float]:
    """``c_g`` per group: the stored ``perturbation_scale``, else from rho (lr, normalize)."""
    scales: list[float] = []
    norm: float | None = None
    for gi, g in enumerate(groups):
        if SCALE_KEY in g:
            scales.append(0.0 if g[SCALE_KEY] is None else _as_float(g, SCALE_KEY, gi))
            continue
        if g.get("rho") is None:
            raise SavedStateError(f"unperturbed_parameters: group {gi} records neither "
                                  f"{SCALE_KEY!r} nor 'rho'; cannot move the weights back",
                                  reason="no_coefficient", key="rho", group=gi)
        coef = _as_float(g, "rho", gi)
        if _as_flag(g, "scale_by_lr", gi, False):
            coef *= _as_float(g, "lr", gi, 1.0)
        if _as_flag(g, "normalize", gi, True):
            if norm is None:
                norm = math.sqrt(sum(float(d.abs().double().pow(2).sum()) for d in dirs))
            coef = coef / norm if norm > 0 else 0.0
        scales.append(coef)
    return scales
