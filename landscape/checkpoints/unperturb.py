"""MSAM checkpoints saved at the perturbed point: the optimizer state is checked (one error
naming the key), its parameters are matched to the weights' names, and the weights are moved
back with :func:`msam.unperturbed_parameters` (msam owns its state format)."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from msam.batchnorm import BATCHNORM_BUFFERS
from msam.saved_state import (
    DIRECTION_KEYS,
    SavedStateError,
    direction_buffer,
    unperturbed_parameters,
)

from .formats import PREFIXES
from .matching import shared_groups, storage_identity, tie_groups
from .result import CheckpointError

_FLAG_KEYS = ("perturbed", "is_perturbed", "msam_perturbed")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text, kind = repr(value), type(value).__name__
    article = "an" if kind[:1].lower() in "aeiou" else "a"
    return f"{article} {kind} ({text[:40]}{'...' if len(text) > 40 else ''})"


def _malformed(path: pathlib.Path, key: str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: malformed optimizer state: {key} is {what}")


def _flag(value: Any, path: pathlib.Path, key: str) -> bool:
    """A boolean flag stored as bool, int or a one-element tensor; anything else is refused."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise _malformed(path, key, f"{_describe(value)}; expected a boolean")
        value = value.item()
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise _malformed(path, key, f"{_describe(value)}; expected a boolean")


def check_optimizer(opt: Mapping[str, Any], path: pathlib.Path, okey: str) -> None:
    """Refuse an optimizer state_dict whose structure the loader cannot read (names the key)."""
    okey = okey or "optimizer"
    for key in _FLAG_KEYS:
        if key in opt:
            _flag(opt[key], path, f"{okey}[{key!r}]")
    if "sam" in opt:
        sam = opt["sam"]
        if not isinstance(sam, Mapping):
            raise _malformed(path, f"{okey}['sam']", f"{_describe(sam)}; expected a dict")
        if "perturbed" in sam:
            _flag(sam["perturbed"], path, f"{okey}['sam']['perturbed']")
    groups = opt.get("param_groups")
    if groups is not None:
        if not isinstance(groups, (list, tuple)):
            raise _malformed(path, f"{okey}['param_groups']", f"{_describe(groups)}; expected a list of dicts")
        for gi, g in enumerate(groups):
            where = f"{okey}['param_groups'][{gi}]"
            if not isinstance(g, Mapping):
                raise _malformed(path, where, f"{_describe(g)}; expected a dict")
            params = g.get("params", [])
            if not isinstance(params, (list, tuple)) or not all(
                    isinstance(p, (int, str)) and not isinstance(p, bool) for p in params):
                raise _malformed(path, f"{where}['params']", f"{_describe(params)}; expected a list of ids")
            names = g.get("param_names")
            if names is not None and not isinstance(names, (list, tuple)):
                raise _malformed(path, f"{where}['param_names']", f"{_describe(names)}; expected a list of names")
            for key in ("perturbed", "is_perturbed"):
                if key in g:
                    _flag(g[key], path, f"{where}[{key!r}]")
    per_param = opt.get("state")
    if per_param is not None:
        if not isinstance(per_param, Mapping):
            raise _malformed(path, f"{okey}['state']", f"{_describe(per_param)}; expected a dict")
        for pid, st in per_param.items():
            where = f"{okey}['state'][{pid!r}]"
            if not isinstance(st, Mapping):
                raise _malformed(path, where, f"{_describe(st)}; expected a dict")
            for key in DIRECTION_KEYS:
                if key in st and st[key] is not None and not (
                        isinstance(st[key], torch.Tensor)
                        and (st[key].is_floating_point() or st[key].is_complex())):
                    raise _malformed(path, f"{where}[{key!r}]", f"{_describe(st[key])}; expected a float tensor")


def refuse_sam_ascent(opt_state: Mapping[str, Any] | None, path: pathlib.Path) -> None:
    """A SAM state saved between the two passes: the weights are at ``w + e`` (no way back)."""
    sam_state = opt_state.get("sam") if isinstance(opt_state, Mapping) else None
    if isinstance(sam_state, Mapping) and bool(_scalar(sam_state.get("perturbed", False))):
        raise CheckpointError(
            f"{path} was saved between SAM's first_step() and second_step(): its weights are at "
            "the ascent point w + e, not at w; save after second_step() (or after "
            "optimizer.unperturb())"
        )


def perturbed_flag(opt_state: Mapping[str, Any]) -> bool:
    """Whether an optimizer state_dict says its parameters were saved at a perturbed point.

    Assumes :func:`check_optimizer` accepted it (flags are boolean-like).
    """
    for key in _FLAG_KEYS:
        if key in opt_state:
            return bool(_scalar(opt_state[key]))
    for g in opt_state.get("param_groups", []) or []:
        for key in ("perturbed", "is_perturbed"):
            if isinstance(g, Mapping) and key in g and bool(_scalar(g[key])):
                return True
    return False


def _scalar(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x


def _parameter_names(state: dict[str, torch.Tensor], model: nn.Module | None) -> list[str]:
    """One name per parameter: the model's (tied ones once), else the floating state keys with
    keys that alias an earlier one (the same saved tensor) left out."""
    if model is not None:
        return [n for n, _ in model.named_parameters()]
    first = {}
    for k, v in state.items():
        if v.is_floating_point() and not k.endswith(BATCHNORM_BUFFERS):
            first.setdefault(storage_identity(v, k), k)
    return list(first.values())


def _aliases(state: Mapping[str, torch.Tensor], model: nn.Module | None) -> dict[str, list[str]]:
    """Each parameter name -> every state key holding that parameter (tied weights share one).

    With a model: the keys whose model tensors share one storage (an input embedding
    and a language-model head); without: the keys whose saved tensors are the same view of one
    storage (``torch.save`` keeps the sharing).
    """
    groups = tie_groups(model) if model is not None else shared_groups(state)
    return {n: g for g in groups if len(g) > 1 for n in g}


def _strip_name(name: str) -> str:
    for prefix in PREFIXES:
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _match_optimizer_params(
    groups: list, per_param: Mapping, order: list[tuple[Any, int]], names: list[str],
    state: Mapping[str, torch.Tensor], path: pathlib.Path, explain: str,
    aliases: Mapping[str, list[str]] | None = None,
) -> list[str]:
    """The model parameter name of each optimizer parameter, in ``order``.

    * By name when every group records ``param_names`` (torch >= 2.5 optimizers built from
      ``model.named_parameters()``).
    * By position when there is one parameter group (an optimizer built from
      ``model.parameters()`` lists them in ``named_parameters()`` order).
    * With several groups and no names, by shape when every perturbed parameter's shape
      identifies one model parameter; otherwise the match is ambiguous and refused, since a
      wrong match would silently add another parameter's momentum.
    """
    if groups and all(isinstance(g.get("param_names"), (list, tuple))
                      and len(g["param_names"]) == len(g.get("params", [])) for g in groups):
        recorded = [_strip_name(str(n)) for g in groups for n in g["param_names"]]
        known = set(names) | set(aliases or ())  # a tied parameter under any of its names
        missing = [n for n in recorded if n not in known]
        if missing:
            raise CheckpointError(
                f"{path}: the optimizer names parameters the model does not have {missing[:5]}; "
                f"{explain}"
            )
        return recorded
    if len(groups) <= 1:
        return list(names)
    shapes: dict[tuple, list[str]] = {}
    for n in names:
        if n in state:
            shapes.setdefault(tuple(state[n].shape), []).append(n)
    matched: list[str] = []
    used: set[str] = set()
    for pid, _ in order:
        st = per_param.get(pid, per_param.get(str(pid), {}))
        buf = direction_buffer(st) if isinstance(st, Mapping) else None
        if buf is None:
            matched.append("")  # not perturbed: never looked up
            continue
        candidates = [n for n in shapes.get(tuple(buf.shape), []) if n not in used]
        if len(shapes.get(tuple(buf.shape), [])) != 1 or not candidates:
            raise CheckpointError(
                f"{path}: the optimizer has {len(groups)} parameter groups and records no "
                f"parameter names, and its parameter {pid} (shape {tuple(buf.shape)}) could be "
                f"any of {shapes.get(tuple(buf.shape), [])}; {explain}"
            )
        matched.append(candidates[0])
        used.add(candidates[0])
    return matched


def check_optimizers(optimizers: list[tuple[str, Mapping[str, Any]]], path: pathlib.Path) -> None:
    """Refuse, before anything changes, any optimizer state of the file that the loader cannot
    read (naming its key, e.g. ``optimizer_states[1]['param_groups']``) or that was saved
    between SAM's two passes. Every optimizer of the file is checked, not only the first.

    Args:
        optimizers: ``(key, state_dict)`` pairs, the key as named in the file
            (``"optimizer"``, ``"optimizer_states[1]"``, ``"optimizer.pt"``).
        path: the checkpoint (named in the errors).

    Raises:
        CheckpointError: a malformed entry (naming it), or a SAM state saved at ``w + e``.
    """
    for okey, opt in optimizers:
        check_optimizer(opt, path, okey)
    for _, opt in optimizers:
        refuse_sam_ascent(opt, path)


def perturbed_states(optimizers: list[tuple[str, Mapping[str, Any]]]) -> list[tuple[str, Mapping[str, Any]]]:
    """The ``(key, state)`` pairs of ``optimizers`` whose state says the weights were saved at a
    perturbed point (the ``perturbed`` flag MSAM's ``state_dict`` writes, or a group's flag);
    assumes :func:`check_optimizers` accepted them."""
    return [(k, o) for k, o in optimizers if o and perturbed_flag(o)]


def _param_count(opt: Mapping[str, Any]) -> int:
    return sum(len(g.get("params", [])) for g in opt.get("param_groups") or [])


def _records_names(opt: Mapping[str, Any]) -> bool:
    groups = opt.get("param_groups") or []
    return bool(groups) and all(isinstance(g.get("param_names"), (list, tuple))
                                and len(g["param_names"]) == len(g.get("params", [])) for g in groups)


def move_back_all(
    state: dict[str, torch.Tensor], optimizers: list[tuple[str, Mapping[str, Any]]],
    model: nn.Module | None, path: pathlib.Path,
) -> dict[str, torch.Tensor]:
    """Move the weights of every perturbed optimizer of the file back to ``w``.

    One optimizer covers all parameters (matched as described in :func:`unperturbed_state`). Several
    optimizers (a PyTorch Lightning module whose ``configure_optimizers`` returns one per
    sub-network) each cover a part: by the names they record (``param_names``), otherwise by
    position, when their parameter counts add up to the model's (Lightning lists them in
    ``configure_optimizers`` order, each built from ``sub_module.parameters()``), with every
    direction buffer's shape checked against the parameter it is matched to. Anything else is
    refused naming the optimizer's key, since a wrong match would move the wrong weights.

    Args:
        state: the checkpoint's tensors (keys matched to ``model``).
        optimizers: every ``(key, state_dict)`` of the file, in the file's order.
        model: the model they are loaded into (its parameter names), or ``None`` (the floating
            tensors of ``state`` in order).
        path: the checkpoint (named in the errors).

    Returns:
        A new dict with the moved-back weights (``state`` itself when nothing is perturbed).

    Raises:
        CheckpointError: an optimizer that cannot be matched to the parameters, or move-back
            data that is malformed, non-finite or would overflow (naming the entry).
    """
    perturbed = perturbed_states(optimizers)
    if not perturbed:
        return state
    if len(optimizers) == 1:
        okey, opt = optimizers[0]
        return unperturbed_state(state, opt, model, path, okey)
    names = _parameter_names(state, model)
    counts = [_param_count(o) for _, o in optimizers]
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    out = state
    for i, (okey, opt) in enumerate(optimizers):
        if not (opt and perturbed_flag(opt)):
            continue
        if _records_names(opt):
            part = None  # matched by the recorded names among all parameters
        elif sum(counts) == len(names):
            part = names[offsets[i]:offsets[i] + counts[i]]
        else:
            raise CheckpointError(
                f"{path}: {okey} says its weights were saved at MSAM's perturbed point, but the "
                f"file's {len(optimizers)} optimizers hold {sum(counts)} parameters in all and the "
                f"model {len(names)}, and {okey} records no parameter names: cannot tell which "
                "weights to move back; save after optimizer.eval(), or load with unperturb=False "
                "to take the perturbed weights as they are")
        out = unperturbed_state(out, opt, model, path, okey, names=part, partial=part is None)
    return out


def unperturbed_state(
    state: dict[str, torch.Tensor], opt_state: Mapping[str, Any], model: nn.Module | None,
    path: pathlib.Path, okey: str = "optimizer", names: list[str] | None = None,
    partial: bool = False,
) -> dict[str, torch.Tensor]:
    """Move ``w~`` back to ``w = w~ + c_g * d`` for every parameter group ``g``.

    ``names``: the parameters this optimizer holds, in order (one of several optimizers);
    default every parameter of the model (or of the file). ``partial``: the optimizer holds
    some of them, matched by the names it records.

    The loader's part is matching the optimizer's parameters to the weights' names; the
    move-back itself (``d`` the stored direction buffer, ``c_g`` the coefficient the optimizer
    applied, or the paper's definition from ``rho``) is :func:`msam.unperturbed_parameters`,
    whose errors are reported here in the checkpoint's own terms.
    """
    groups = [dict(g, params=list(g.get("params", []))) for g in opt_state.get("param_groups") or []]
    per_param = opt_state.get("state") or {}
    order: list[tuple[Any, int]] = []
    for gi, g in enumerate(groups):
        order += [(pid, gi) for pid in g["params"]]
    if names is None:
        names = _parameter_names(state, model)
    explain = (
        "cannot match the optimizer state to the parameters to undo MSAM's perturbation "
        "(was the optimizer built from model.parameters()?); save after optimizer.eval(), or "
        "load with unperturb=False to take the perturbed weights as they are"
    )
    if len(order) != len(names) and not partial:
        raise CheckpointError(
            f"{path}: the optimizer has {len(order)} parameters but the model {len(names)}; {explain}"
        )
    if not order:
        return state
    aliases = _aliases(state, model)
    matched = _match_optimizer_params(groups, per_param, order, names, state, path, explain,
                                      aliases)
    # a tied parameter may be saved under any of its names
    matched = [next((k for k in aliases.get(n, ()) if k in state), n) if n not in state else n
               for n in matched]
    # a weight the checkpoint lacks is a placeholder: an error only if it was perturbed
    weights = [state.get(name, _ABSENT) for name in matched]
    try:
        moved = unperturbed_parameters({"param_groups": groups, "state": per_param}, weights,
                                       assume_perturbed=True)
    except SavedStateError as exc:
        raise _move_back_error(exc, path, okey or "optimizer", order, matched, state, explain) from None
    out = dict(state)
    for (pid, _), name, w, new in zip(order, matched, weights, moved):
        if new is w:
            continue
        if name not in state:  # only an empty buffer matches the placeholder's shape
            raise CheckpointError(f"{path}: momentum of optimizer parameter {pid} has shape "
                                  f"{tuple(new.shape)} but {name!r} is absent; {explain}")
        for key in aliases.get(name, [name]):  # every key of a tied parameter, or the
            if key in state:                   # twin loaded after it would undo the move
                out[key] = new
    return out


_ABSENT = torch.empty(0)


def _move_back_error(
    exc: SavedStateError, path: pathlib.Path, okey: str, order: list[tuple[Any, int]],
    matched: list[str], state: Mapping[str, torch.Tensor], explain: str,
) -> CheckpointError:
    """msam's refusal to move the weights back, naming the checkpoint's entry."""
    if exc.reason == "shape":
        pid, name = order[exc.position][0], matched[exc.position]
        got = tuple(state[name].shape) if name in state else "absent"
        return CheckpointError(f"{path}: momentum of optimizer parameter {pid} has shape "
                               f"{tuple(exc.value.shape)} but {name!r} is {got}; {explain}")
    if exc.reason == "buffer_not_finite":
        pid, name = order[exc.position][0], matched[exc.position]
        where, value = f"{okey}['state'][{pid!r}][{exc.key!r}] (for {name!r})", "non-finite values"
        return CheckpointError(f"{path}: optimizer state {where} holds {value}: {_NOT_FINITE}")
    where = f"{okey}['param_groups'][{exc.group}][{exc.key!r}]"
    if exc.reason == "not_finite":
        return CheckpointError(f"{path}: optimizer state {where} is {_scalar(exc.value)}: {_NOT_FINITE}")
    if exc.reason == "not_a_number":
        return _malformed(path, where, f"{_describe(exc.value)}; expected a real number")
    if exc.reason == "not_a_flag":
        return _malformed(path, where, f"{_describe(exc.value)}; expected a boolean")
    if exc.reason == "overflow":
        name = matched[exc.position]
        return CheckpointError(
            f"{path}: moving {name!r} back from MSAM's perturbed point overflows "
            f"{state[name].dtype} (coefficient {exc.value:.3g}); refused. Load with "
            "unperturb=False to take the perturbed weights as they are"
        )
    if exc.reason == "no_coefficient":
        return CheckpointError(
            f"{path}: the optimizer state says the weights are perturbed but records neither "
            "'perturbation_scale' nor 'rho'; cannot move them back (load with "
            "unperturb=False to take them as they are)"
        )
    return CheckpointError(f"{path}: {exc}")


_NOT_FINITE = ("the data needed to move MSAM's weights back is not finite (it would turn the "
               "weights into NaN); refused. Load with unperturb=False to take the perturbed "
               "weights as they are")
