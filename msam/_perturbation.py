"""Shared machinery for optimizers whose parameters live at a perturbed point.

MSAM-style optimizers keep the model parameters at ``w~ = w - c_g * d`` between steps, where ``d``
is a per-parameter direction buffer (the momentum ``v`` for :class:`msam.MSAM`, the first moment
``m`` for :class:`msam.AdamWMSAM`) and ``c_g`` a per-group scalar coefficient, for example
``rho / ||d||`` with ``||d||`` the global L2 norm of ``d`` over every parameter of every group.

The coefficient that was actually applied is stored in each parameter group under
``group["perturbation_scale"]`` (a Python float, a 0-d tensor on the parameters' device, or
``None`` for "nothing applied"). Undoing the perturbation always uses the stored coefficient, so
changing ``rho`` or ``lr`` between steps never leaves a residual in ``w``.

Pseudo-code of one step (Becker et al. 2024, Algorithm 1, efficient form)::

    g = grad L_B(w~)                 # taken by the caller at the live parameters
    w = w~ + c_old * d               # undo with the STORED coefficient
    d, w = update(d, w, g)           # the base optimizer (SGD momentum / AdamW)
    c_new = scale(group, ||d||)      # global norm over all groups
    w~ = w - c_new * d               # perturb again, store c_new

The state dict carries ``state_dict()["perturbed"]`` (bool): whether the parameters were at the
perturbed point ``w~`` when it was taken.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["PerturbedOptimizer"]

SCALE_KEY = "perturbation_scale"
PERTURBED_KEY = "perturbed"

Scale = float | Tensor


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
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name}.load_state_dict: {key!r} of parameter {pi} of group {gi} "
                             "has inf or NaN entries; loading it would put them into the "
                             "weights (nothing was loaded)")


def default_foreach(params: list[Tensor]) -> bool:
    """torch.optim's rule: the multi-tensor path by default on accelerators, not on CPU."""
    return bool(params) and all(p.device.type not in ("cpu", "meta") for p in params)


def group_by_device_dtype(*lists: list[Tensor]) -> dict[tuple, tuple[list[Tensor], ...]]:
    """Split parallel tensor lists into sub-lists that share (device, dtype) of the first list."""
    out: dict[tuple, tuple[list[Tensor], ...]] = {}
    for items in zip(*lists):
        key = (items[0].device, items[0].dtype)
        if key not in out:
            out[key] = tuple([] for _ in lists)
        for bucket, item in zip(out[key], items):
            bucket.append(item)
    return out


def is_zero(scale: Scale | None) -> bool:
    return scale is None or (not isinstance(scale, Tensor) and scale == 0.0)


def shift_(params: list[Tensor], dirs: list[Tensor], scale: Scale | None, *, foreach: bool) -> None:
    """``params += scale * dirs`` in place, ``scale`` a float or a 0-d tensor (no host sync)."""
    if is_zero(scale) or not params:
        return
    if not isinstance(scale, Tensor):
        if foreach:
            for ps, ds in group_by_device_dtype(params, dirs).values():
                torch._foreach_add_(ps, ds, alpha=scale)
        else:
            for p, d in zip(params, dirs):
                p.add_(d, alpha=scale)
        return
    if foreach:
        for (device, _), (ps, ds) in group_by_device_dtype(params, dirs).items():
            s = scale.to(device, non_blocking=True)
            # a 0-d tensor broadcasts: one fused read-modify-write per tensor, no temporaries
            torch._foreach_addcmul_(ps, ds, [s] * len(ps))
    else:
        cache: dict[torch.device, Tensor] = {}
        for p, d in zip(params, dirs):
            s = cache.get(p.device)
            if s is None:
                s = cache[p.device] = scale.to(p.device, non_blocking=True)
            p.addcmul_(d, s)


def global_norm(dirs: list[Tensor], *, foreach: bool) -> Tensor | None:
    """L2 norm of the concatenation of ``dirs`` as a 0-d tensor (no host sync); None if empty.

    Accumulates in float64 when any buffer is float64, else in float32 (also for half types).
    """
    if not dirs:
        return None
    norm_dtype = torch.float64 if any(d.dtype == torch.float64 for d in dirs) else torch.float32
    device = dirs[0].device
    parts: list[Tensor] = []
    for (_, dtype), (ds,) in group_by_device_dtype(dirs).items():
        if foreach and dtype == norm_dtype:
            norms = torch._foreach_norm(ds)
        else:
            norms = [torch.linalg.vector_norm(d, dtype=norm_dtype) for d in ds]
        parts.append(torch.stack(norms).to(device=device, dtype=norm_dtype, non_blocking=True))
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return torch.linalg.vector_norm(flat)


class PerturbedOptimizer(Optimizer):
    """Base class: parameters live at ``w~ = w - c_g * d`` between steps (see module docstring).

    Subclasses set ``_direction_key`` (the state key of ``d``), implement
    ``_group_scale(group, norm)`` and their ``step``. They get ``eval()``, ``train()``,
    ``is_perturbed``, ``unperturbed()`` and a state dict with a ``"perturbed"`` flag.
    """

    _direction_key: str = ""

    def __init__(self, params, defaults: dict[str, Any]):
        super().__init__(params, defaults)
        # v_0 = 0: the perturbation is zero, so the parameters are trivially at w~ = w.
        self._perturbed = True
        # per group, the (parameters, direction tensors) the applied perturbation was made
        # with: undoing uses these, so clearing or replacing ``self.state`` while perturbed
        # cannot strand the perturbation in the weights. None: rebuild from the state.
        self._applied: list[tuple[list[Tensor], list[Tensor]]] | None = [
            ([], []) for _ in self.param_groups]

    # -- hooks for subclasses -------------------------------------------------------------
    def _group_scale(self, group: dict[str, Any], norm: Tensor | None) -> Scale:
        """The coefficient ``c_g`` of ``w~ = w - c_g * d`` for one group."""
        raise NotImplementedError

    def _needs_norm(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        foreach = group.get("foreach")
        return default_foreach(params) if foreach is None else bool(foreach)

    def _check_groups(self) -> None:
        """Validate every group's hyperparameters (they may have been edited since
        construction); ValueError/TypeError before anything moves."""
        for group in self.param_groups:
            self._validate_group(group)

    # -- the perturbation -----------------------------------------------------------------
    def _group_directions(self, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        params, dirs = [], []
        for p in group["params"]:
            d = self.state[p].get(self._direction_key) if p in self.state else None
            if d is not None:
                params.append(p)
                dirs.append(d)
        return params, dirs

    def _all_directions(self) -> list[tuple[list[Tensor], list[Tensor]]]:
        return [self._group_directions(g) for g in self.param_groups]

    def _undo(self, pairs: list[tuple[list[Tensor], list[Tensor]]] | None = None) -> None:
        """Move from w~ back to w with the stored coefficients and the direction tensors the
        perturbation was applied with (no-op when not perturbed). ``pairs`` is ignored (kept
        for subclasses written against the old signature)."""
        if not self._perturbed:
            return
        record = self._applied if self._applied is not None else self._all_directions()
        for gi, group in enumerate(self.param_groups):
            params, dirs = record[gi] if gi < len(record) else ([], [])
            scale = group.get(SCALE_KEY)
            shift_(params, dirs, scale, foreach=self._use_foreach(group, params))
            group[SCALE_KEY] = None
        self._applied = None

    def _state_matches_record(self) -> bool:
        if self._applied is None:
            return True
        for group, (params, dirs) in zip(self.param_groups, self._applied):
            if is_zero(group.get(SCALE_KEY)):
                continue
            for p, d in zip(params, dirs):
                st = self.state.get(p)
                if st is None or st.get(self._direction_key) is not d:
                    return False
        return True

    def _new_scales(self, pairs: list[tuple[list[Tensor], list[Tensor]]]) -> list[Scale]:
        norm = None
        if any(self._needs_norm(g) for g in self.param_groups):
            dirs = [d for _, ds in pairs for d in ds]
            foreach = any(self._use_foreach(g, ps) for g, (ps, _) in zip(self.param_groups, pairs))
            norm = global_norm(dirs, foreach=foreach)
        return [self._group_scale(g, norm) for g in self.param_groups]

    def _apply(self, pairs, scales: list[Scale]) -> None:
        for group, (params, dirs), scale in zip(self.param_groups, pairs, scales):
            neg = -scale if isinstance(scale, Tensor) else -float(scale)
            shift_(params, dirs, neg, foreach=self._use_foreach(group, params))
            group[SCALE_KEY] = scale
        self._applied = [(list(ps), list(ds)) for ps, ds in pairs]

    @property
    def is_perturbed(self) -> bool:
        """True when the parameters are at the perturbed point w~ (training state)."""
        return self._perturbed

    @torch.no_grad()
    def eval(self) -> PerturbedOptimizer:
        """Move the parameters to the unperturbed weights w (idempotent). Call before evaluation
        and before saving weights meant for inference."""
        if self._perturbed:
            self._undo()
            self._perturbed = False
        return self

    @torch.no_grad()
    def train(self) -> PerturbedOptimizer:
        """Move the parameters back to the perturbed point w~ computed from the current
        hyperparameters and buffers (idempotent)."""
        if not self._perturbed:
            self._check_groups()
            pairs = self._all_directions()
            self._apply(pairs, self._new_scales(pairs))
            self._perturbed = True
        return self

    @contextmanager
    def unperturbed(self) -> Iterator[PerturbedOptimizer]:
        """Context manager: parameters at w inside, back at w~ (if they were) on exit, even on
        exceptions. The same coefficients are re-applied, so w~ is restored up to rounding."""
        was = self._perturbed
        saved = [g.get(SCALE_KEY) for g in self.param_groups]
        self.eval()
        try:
            yield self
        finally:
            if was and not self._perturbed:
                with torch.no_grad():
                    self._apply(self._all_directions(), [0.0 if s is None else s for s in saved])
                self._perturbed = True

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict plus ``"perturbed"``: whether the parameters were at w~.

        Raises:
            RuntimeError: the state no longer holds the buffers the current perturbation was
                applied with (``optimizer.state`` cleared or replaced while perturbed), so a
                loader could not move the saved weights back; call ``eval()`` first.
        """
        if self._perturbed and not self._state_matches_record():
            raise RuntimeError(
                f"{type(self).__name__}.state_dict(): the optimizer state no longer holds the "
                "buffers the weights were perturbed with (was optimizer.state cleared or "
                "replaced?); call optimizer.eval() (moves the weights back to w) or step() first")
        sd = super().state_dict()
        sd[PERTURBED_KEY] = bool(self._perturbed)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict. A dict without ``"perturbed"`` (e.g. from torch.optim.SGD) is
        taken as saved at the unperturbed weights w.

        Everything is checked before anything is loaded: buffer shapes against the
        parameters, the groups' hyperparameters, and (since they move the weights) that the
        direction buffers and, for a perturbed state, the stored ``perturbation_scale`` are
        finite. Dtypes and devices are cast to the parameters' as torch.optim does.

        Raises:
            ValueError: a buffer of another shape (naming group, parameter, entry and both
                shapes), a non-finite direction buffer or coefficient, a bad hyperparameter.
            TypeError: ``state_dict`` is not a mapping, a hyperparameter has a wrong type.
        """
        name = type(self).__name__
        entries = check_loaded_state(self, state_dict, name)
        sd = dict(state_dict)
        perturbed = saved_flag(sd.pop(PERTURBED_KEY, False), f"{name}.load_state_dict: "
                               "'perturbed'")
        for gi, pi, _, st in entries:
            check_finite_buffer(name, self._direction_key, gi, pi, st.get(self._direction_key))
        for gi, saved in enumerate(sd["param_groups"]):
            merged = {**self.defaults, **saved}
            try:
                self._validate_group(merged)
            except ValueError as exc:
                raise type(exc)(f"{name}.load_state_dict: parameter group {gi}: {exc}") from None
            if perturbed:
                scale = saved.get(SCALE_KEY)
                if scale is not None:
                    try:
                        check_real(SCALE_KEY, scale)
                    except ValueError as exc:
                        raise ValueError(f"{name}.load_state_dict: parameter group {gi}: {exc}; "
                                         "it is used to move the weights back (nothing was "
                                         "loaded)") from None
        super().load_state_dict(sd)
        for group in self.param_groups:
            for key, value in self.defaults.items():  # e.g. a torch.optim.SGD state dict
                group.setdefault(key, value)
            scale = group.get(SCALE_KEY)
            if isinstance(scale, Tensor) and group["params"]:
                group[SCALE_KEY] = scale.to(group["params"][0].device)
            if not perturbed:
                group[SCALE_KEY] = None
        self._perturbed = perturbed
        # the loaded state describes the perturbation of the loaded weights
        self._applied = self._all_directions() if perturbed else None

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_perturbed"] = self._perturbed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._perturbed = state.pop("_perturbed", True)
        super().__setstate__(state)
        self._applied = self._all_directions() if self._perturbed else None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        param_group.setdefault(SCALE_KEY, None)
        super().add_param_group(param_group)
        try:
            self._validate_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:  # overridden by subclasses
        pass

    @staticmethod
    def _check_sparse(name: str, groups) -> None:
        for group in groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.is_sparse:
                    raise RuntimeError(
                        f"{name} does not support sparse gradients (parameter of shape "
                        f"{tuple(p.shape)}); use a dense embedding (sparse=False)")
