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
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["PerturbedOptimizer"]

SCALE_KEY = "perturbation_scale"
PERTURBED_KEY = "perturbed"

Scale = float | Tensor


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               high_open: bool = False) -> float:
    """Validate a real hyperparameter; raise ValueError naming it and its value."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Invalid {name}: {value!r} (expected a real number)")
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
        raise ValueError(f"Invalid foreach: {foreach!r} (expected None, True or False)")


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

    # -- hooks for subclasses -------------------------------------------------------------
    def _group_scale(self, group: dict[str, Any], norm: Tensor | None) -> Scale:
        """The coefficient ``c_g`` of ``w~ = w - c_g * d`` for one group."""
        raise NotImplementedError

    def _needs_norm(self, group: dict[str, Any]) -> bool:
        raise NotImplementedError

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        foreach = group.get("foreach")
        return default_foreach(params) if foreach is None else bool(foreach)

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

    def _undo(self, pairs: list[tuple[list[Tensor], list[Tensor]]]) -> None:
        """Move from w~ back to w with the stored coefficients (no-op when not perturbed)."""
        if not self._perturbed:
            return
        for group, (params, dirs) in zip(self.param_groups, pairs):
            scale = group.get(SCALE_KEY)
            shift_(params, dirs, scale, foreach=self._use_foreach(group, params))
            group[SCALE_KEY] = None

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

    @property
    def is_perturbed(self) -> bool:
        """True when the parameters are at the perturbed point w~ (training state)."""
        return self._perturbed

    @torch.no_grad()
    def eval(self) -> PerturbedOptimizer:
        """Move the parameters to the unperturbed weights w (idempotent). Call before evaluation
        and before saving weights meant for inference."""
        if self._perturbed:
            self._undo(self._all_directions())
            self._perturbed = False
        return self

    @torch.no_grad()
    def train(self) -> PerturbedOptimizer:
        """Move the parameters back to the perturbed point w~ computed from the current
        hyperparameters and buffers (idempotent)."""
        if not self._perturbed:
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
        """torch.optim's state dict plus ``"perturbed"``: whether the parameters were at w~."""
        sd = super().state_dict()
        sd[PERTURBED_KEY] = bool(self._perturbed)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict. A dict without ``"perturbed"`` (e.g. from torch.optim.SGD) is
        taken as saved at the unperturbed weights w."""
        sd = dict(state_dict)
        perturbed = bool(sd.pop(PERTURBED_KEY, False))
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

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_perturbed"] = self._perturbed
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self._perturbed = state.pop("_perturbed", True)
        super().__setstate__(state)

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
