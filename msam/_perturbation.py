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

:meth:`PerturbedOptimizer.step` is this template, in torch.optim's style: ``_init_group``
collects each group's tensors (one :class:`GroupStep`; nothing changes, a sparse gradient is
refused), ``_init_state`` creates missing per-parameter state, ``_undo`` moves to ``w``,
``_update`` runs the subclass's functional kernel (single-tensor or ``torch._foreach``) and
``_perturb`` moves to the new ``w~``. Subclasses fill in ``_update`` (and, if they fuse the
update with the perturbation as MSAM does, ``_directions`` / ``_shift``).

The state dict carries ``state_dict()["perturbed"]`` (bool): whether the parameters were at the
perturbed point ``w~`` when it was taken; every ``state_dict()["param_groups"][i]`` carries it too,
so converters that keep only ``state`` and ``param_groups`` (torch.distributed.checkpoint's
``get_state_dict`` for FSDP2 models) keep it.

FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters and buffers are DTensors, each rank
holds its shards; the kernels run on the local shards through DTensor's dispatch and
:func:`global_norm` counts every sharded tensor as the full tensor (one all-reduce per step).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from msam._checks import (
    check_finite_buffer,
    check_loaded_state,
    check_real,
    saved_flag,
)

__all__ = ["GroupStep"]

SCALE_KEY = "perturbation_scale"
PERTURBED_KEY = "perturbed"

Scale = float | Tensor


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


def negated(scale: Scale) -> Scale:
    """``-scale`` for a float or a 0-d tensor."""
    return -scale if isinstance(scale, Tensor) else -float(scale)


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


def _dtensor_type() -> type | None:
    """torch.distributed.tensor.DTensor, or None in a build without torch.distributed."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed support
        return None
    return DTensor


def _plain_norm(dirs: list[Tensor], norm_dtype: torch.dtype, *, foreach: bool) -> Tensor:
    """L2 norm of the concatenation of ``dirs`` (all plain tensors or all DTensors of one
    mesh), accumulated in ``norm_dtype`` on the first tensor's device."""
    device = dirs[0].device
    parts: list[Tensor] = []
    for (_, dtype), (ds,) in group_by_device_dtype(dirs).items():
        if foreach and dtype == norm_dtype:
            norms = torch._foreach_norm(ds)
        else:
            norms = [torch.linalg.vector_norm(torch.view_as_real(d) if d.is_complex() else d,
                                              dtype=norm_dtype) for d in ds]
        parts.append(torch.stack(norms).to(device=device, dtype=norm_dtype, non_blocking=True))
    flat = parts[0] if len(parts) == 1 else torch.cat(parts)
    return torch.linalg.vector_norm(flat)


def global_norm(dirs: list[Tensor], *, foreach: bool) -> Tensor | None:
    """L2 norm of the concatenation of ``dirs`` as a plain 0-d tensor (no host sync); None if
    empty.

    Accumulates in float64 when any buffer is float64 or complex128, else in float32 (also for
    half types). A complex buffer counts as the pair of its real and imaginary parts
    (``sqrt(sum |d_i|^2)``, the norm of ``torch.view_as_real(d)``), as torch.optim treats
    complex parameters.

    Sharded tensors (``DTensor``, e.g. the parameters and state of an FSDP2 ``fully_shard``
    model) count as the full tensors they stand for: DTensor's own reductions give each local
    shard's norm as a partial value, and the norm over a mesh is reduced once (one all-reduce
    per device mesh, usually one per call; a replicated placement is not counted twice). Plain
    tensors next to them are taken as replicated (identical on every rank) and counted once:
    ``||d|| = sqrt(||plain||^2 + sum_mesh ||sharded on mesh||^2)``, the same on every rank.
    """
    if not dirs:
        return None
    wide = (torch.float64, torch.complex128)
    norm_dtype = torch.float64 if any(d.dtype in wide for d in dirs) else torch.float32
    dtensor = _dtensor_type()
    if dtensor is None or not any(isinstance(d, dtensor) for d in dirs):
        return _plain_norm(dirs, norm_dtype, foreach=foreach)
    device = dirs[0].device
    plain = [d for d in dirs if not isinstance(d, dtensor)]
    by_mesh: dict[Any, list[Tensor]] = {}
    for d in dirs:
        if isinstance(d, dtensor):
            by_mesh.setdefault(d.device_mesh, []).append(d)
    norms = [_plain_norm(ds, norm_dtype, foreach=foreach).full_tensor().to(device)
             for ds in by_mesh.values()]
    if plain:
        norms.append(_plain_norm(plain, norm_dtype, foreach=foreach).to(device))
    return norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))


@dataclass
class GroupStep:
    """One parameter group's tensors for one step, gathered by ``_init_group``.

    ``state`` holds one list per key of ``_state_keys``, parallel to ``params`` (None where the
    parameter has no such entry yet); ``idle`` are the parameters without a gradient that
    carry a direction buffer (``idle_dirs``): they are not updated, only perturbed again.
    """

    params: list[Tensor] = field(default_factory=list)
    grads: list[Tensor] = field(default_factory=list)
    state: dict[str, list[Tensor | None]] = field(default_factory=dict)
    idle: list[Tensor] = field(default_factory=list)
    idle_dirs: list[Tensor] = field(default_factory=list)
    foreach: bool = False


class PerturbedOptimizer(Optimizer):
    """Base class: parameters live at ``w~ = w - c_g * d`` between steps (see module docstring).

    Subclasses set ``_direction_key`` (the state key of ``d``) and ``_state_keys`` (the state
    entries their kernel reads), implement ``_group_scale(group, norm)``, ``_needs_norm`` and
    ``_update(group, step)`` (the base optimizer's kernel at ``w``), and may override
    ``_init_state``, ``_directions`` and ``_shift``. They get the template ``step()``,
    ``eval()``, ``train()``, ``is_perturbed``, ``unperturbed()`` and a state dict with a
    ``"perturbed"`` flag.
    """

    _direction_key: str = ""
    _state_keys: tuple[str, ...] = ()

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

    def _init_state(self, step: GroupStep) -> None:
        """Create missing per-parameter state for ``step.params`` (and fill ``step.state``).
        Called once every group was collected, so a refused step leaves the state unchanged."""

    def _update(self, group: dict[str, Any], step: GroupStep) -> None:
        """The base optimizer's update at the unperturbed ``w`` (a functional kernel)."""
        raise NotImplementedError

    def _directions(self, group: dict[str, Any], step: GroupStep,
                    ) -> tuple[list[Tensor], list[Tensor]]:
        """(parameters, direction buffers) of the new perturbation, after ``_update``; by
        default every parameter of the group that has a buffer, in group order."""
        return self._group_directions(group)

    def _shift(self, group: dict[str, Any], step: GroupStep, params: list[Tensor],
               dirs: list[Tensor], scale: Scale) -> None:
        """Move the group from ``w`` to ``w~ = w - scale * d`` after ``_update``."""
        shift_(params, dirs, negated(scale), foreach=self._use_foreach(group, params))

    def _use_foreach(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        foreach = group.get("foreach")
        return default_foreach(params) if foreach is None else bool(foreach)

    def _check_groups(self) -> None:
        """Validate every group's hyperparameters (they may have been edited since
        construction); ValueError/TypeError before anything moves."""
        for group in self.param_groups:
            self._validate_group(group)

    # -- the step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step from the gradient taken at the live parameters (``w~``).

        collect (``_init_group``) -> undo (``w~ -> w``, stored coefficients) -> update (the
        base optimizer at ``w``) -> perturb (``w -> w~`` with the new coefficients).

        After ``eval()`` (parameters at ``w``) the undo is skipped: the gradient is taken as
        the gradient at ``w`` (one update of the base optimizer without SAM effect) and the
        parameters end at the new ``w~``, perturbed again. This is deliberate and does not
        warn (evaluate, then train on); call ``train()`` before the forward/backward to take
        the gradient at ``w~``.

        Args:
            closure: optional callable that re-evaluates the model (at ``w~``), calls backward
                and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        self._check_groups()  # hyperparameters may have been edited since construction
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        steps = [self._init_group(group) for group in self.param_groups]
        for step in steps:
            self._init_state(step)
        self._undo()
        for group, step in zip(self.param_groups, steps):
            self._update(group, step)
        self._perturb(steps)
        return loss

    def _init_group(self, group: dict[str, Any]) -> GroupStep:
        """Collect a group's parameters, gradients and state (changes nothing).

        Raises:
            RuntimeError: a sparse gradient.
        """
        params, grads, states, idle, idle_dirs = [], [], [], [], []
        for p in group["params"]:
            state = self.state.get(p)
            grad = p.grad
            if grad is None:
                d = state.get(self._direction_key) if state else None
                if d is not None:
                    idle.append(p)
                    idle_dirs.append(d)
                continue
            if grad.is_sparse:
                raise RuntimeError(
                    f"{type(self).__name__} does not support sparse gradients (parameter of "
                    f"shape {tuple(p.shape)}); use a dense embedding (sparse=False)")
            params.append(p)
            grads.append(grad)
            states.append(state)
        lists = {key: [st.get(key) if st else None for st in states] for key in self._state_keys}
        return GroupStep(params, grads, lists, idle, idle_dirs,
                         self._use_foreach(group, params or idle))

    def _perturb(self, steps: list[GroupStep]) -> None:
        """``w -> w~`` with new coefficients from the updated buffers; records what was applied."""
        pairs = [self._directions(g, s) for g, s in zip(self.param_groups, steps)]
        scales = self._new_scales(pairs)
        for group, step, (params, dirs), scale in zip(self.param_groups, steps, pairs, scales):
            self._shift(group, step, params, dirs, scale)
            group[SCALE_KEY] = scale
        self._applied = [(list(ps), list(ds)) for ps, ds in pairs]
        self._perturbed = True

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
            shift_(params, dirs, negated(scale), foreach=self._use_foreach(group, params))
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
        """torch.optim's state dict plus ``"perturbed"``: whether the parameters were at w~
        (also put in every saved parameter group, see the module docstring).

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
        # also in every group: state-dict converters that keep only "state" and
        # "param_groups" (torch.distributed.checkpoint's get_state_dict) keep the flag too
        for group in sd["param_groups"]:
            group[PERTURBED_KEY] = bool(self._perturbed)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict. The ``"perturbed"`` flag is read at the top level, else from
        the parameter groups (a dict converted by torch.distributed.checkpoint); a dict without
        it (e.g. from torch.optim.SGD) is taken as saved at the unperturbed weights w.

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
        perturbed = self._saved_perturbed(sd)
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

    def _saved_perturbed(self, sd: dict[str, Any]) -> bool:
        """Pop the ``"perturbed"`` flag from ``sd`` and its groups (a copy of them is put in
        ``sd``); the top-level flag wins, then the groups' (which must agree); False if none."""
        name = type(self).__name__
        groups = [dict(g) for g in sd["param_groups"]]
        sd["param_groups"] = groups
        flags = {saved_flag(g.pop(PERTURBED_KEY), f"{name}.load_state_dict: parameter group "
                            f"{gi}: 'perturbed'")
                 for gi, g in enumerate(groups) if PERTURBED_KEY in g}
        if PERTURBED_KEY in sd:
            return saved_flag(sd.pop(PERTURBED_KEY), f"{name}.load_state_dict: 'perturbed'")
        if len(flags) > 1:
            raise ValueError(f"{name}.load_state_dict: the parameter groups disagree on "
                             "'perturbed' (some True, some False); nothing was loaded")
        return flags.pop() if flags else False

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
