"""Argument and saved-state checks shared by msam's optimizers (one-line ValueError/TypeError
naming the bad value, raised before anything changes)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ArgumentTypeError", "check_real", "check_foreach", "check_bool", "check_loaded_state",
           "saved_flag", "check_finite_buffer", "PARAM_SHAPED_KEYS"]


class ArgumentTypeError(TypeError, ValueError):
    """A hyperparameter of the wrong type. A TypeError, and also a ValueError so that code
    written when these were ValueErrors keeps catching them."""


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               high_open: bool = False) -> float:
    """Validate a real hyperparameter; raise ValueError (TypeError for a wrong type) naming it
    and its value."""
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ArgumentTypeError(f"Invalid {name}: {value!r} (expected a real number)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentTypeError(f"Invalid {name}: {value!r} (expected a real number)")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value} (must be finite)")
    if low is not None and value < low:
        raise ValueError(f"Invalid {name}: {value} (must be >= {low})")
    if high is not None and (value >= high if high_open else value > high):
        raise ValueError(f"Invalid {name}: {value} (must be {'<' if high_open else '<='} {high})")
    return value


def check_foreach(foreach: Any) -> None:
    """Raise ``ArgumentTypeError`` naming the value unless ``foreach`` is ``None``, ``True`` or ``False``."""
    if foreach is not None and not isinstance(foreach, bool):
        raise ArgumentTypeError(f"Invalid foreach: {foreach!r} (expected None, True or False)")


def check_bool(name: str, value: Any) -> bool:
    """Validate a flag: only True or False (a string such as 'no' would be truthy)."""
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"Invalid {name}: {value!r} (expected True or False)")
    return value


# state entries of torch.optim optimizers (and ours) that have the parameter's shape
PARAM_SHAPED_KEYS = frozenset({
    "momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "exp_inf", "square_avg",
    "grad_avg", "acc_delta", "sum", "ax", "prev", "step_size", "old_p",
})


def check_loaded_state(optimizer: Optimizer, state_dict: Any, name: str,
                       ) -> list[tuple[int, int, Tensor, Mapping[str, Any]]]:
    """Check a state dict against ``optimizer``'s parameters before anything is loaded.

    Refuses (ValueError naming the group, the parameter index, the entry and both shapes) a
    parameter-shaped buffer whose shape differs from its parameter's, or from the shape of the
    entry the optimizer already holds; dtypes and devices are cast on load as torch.optim does.

    Returns:
        ``(group index, index in group, parameter, saved per-parameter state)`` for every saved
        state entry that maps to a parameter.
    """
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"{name}.load_state_dict: expected a state dict (a mapping), got "
                        f"{type(state_dict).__name__}")
    saved_groups = state_dict.get("param_groups")
    saved_state = state_dict.get("state", {})
    if not isinstance(saved_groups, (list, tuple)) or not all(
            isinstance(g, Mapping) and isinstance(g.get("params"), (list, tuple))
            for g in saved_groups):
        raise ValueError(f"{name}.load_state_dict: 'param_groups' must be a list of dicts "
                         f"with a 'params' list, got {type(saved_groups).__name__}")
    if not isinstance(saved_state, Mapping):
        raise ValueError(f"{name}.load_state_dict: 'state' must be a dict, got "
                         f"{type(saved_state).__name__}")
    groups = optimizer.param_groups
    if len(saved_groups) != len(groups):
        raise ValueError(f"{name}.load_state_dict: the state dict has {len(saved_groups)} "
                         f"parameter groups, the optimizer {len(groups)}")
    where: dict[Any, tuple[int, int, Tensor]] = {}
    for gi, (group, saved) in enumerate(zip(groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"{name}.load_state_dict: parameter group {gi} has "
                             f"{len(saved['params'])} parameters in the state dict, "
                             f"{len(group['params'])} in the optimizer")
        for pi, (pid, p) in enumerate(zip(saved["params"], group["params"])):
            where[pid] = (gi, pi, p)
    out = []
    for pid, st in saved_state.items():
        if pid not in where:
            continue
        gi, pi, p = where[pid]
        if not isinstance(st, Mapping):
            raise ValueError(f"{name}.load_state_dict: the state of parameter {pi} of group "
                             f"{gi} is a {type(st).__name__}, expected a dict")
        current = optimizer.state.get(p, {})
        for key, value in st.items():
            if not isinstance(value, Tensor):
                if key in PARAM_SHAPED_KEYS and value is not None:
                    raise ValueError(f"{name}.load_state_dict: {key!r} of parameter {pi} of "
                                     f"group {gi} is a {type(value).__name__}, expected a tensor")
                continue
            if key in PARAM_SHAPED_KEYS:
                expected, what = p.shape, "the parameter has shape"
            elif key != "step" and isinstance(current.get(key), Tensor):
                expected, what = current[key].shape, "the optimizer's own entry has shape"
            else:
                continue
            if value.shape != expected:
                raise ValueError(
                    f"{name}.load_state_dict: {key!r} of parameter {pi} of group {gi} has shape "
                    f"{tuple(value.shape)} but {what} {tuple(expected)} (a state dict of "
                    "another model?); nothing was loaded")
        out.append((gi, pi, p, st))
    return out


def saved_flag(value: Any, what: str) -> bool:
    """A saved boolean flag: a bool, a one-element tensor, a numpy bool or 0/1 (JSON)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if type(value).__name__ == "bool_" or (type(value) is int and value in (0, 1)):
        value = bool(value)
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be True or False, got {value!r}")
    return value


def check_finite_buffer(name: str, key: str, gi: int, pi: int, value: Any) -> None:
    """Refuse a buffer with inf/NaN entries that would be used to move the weights."""
    if isinstance(value, Tensor) and (value.is_floating_point() or value.is_complex()):
        finite = torch.isfinite(value).all()
        if hasattr(finite, "full_tensor"):  # a sharded DTensor (FSDP2): every rank's shards,
            finite = finite.full_tensor()   # so that all ranks refuse together
        if not bool(finite):
            raise ValueError(f"{name}.load_state_dict: {key!r} of parameter {pi} of group {gi} "
                             "has inf or NaN entries; loading it would put them into the "
                             "weights (nothing was loaded)")
