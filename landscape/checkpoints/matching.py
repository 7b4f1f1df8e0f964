"""Matching the checkpoint's keys to a model: a module-attribute prefix (explicit or detected,
such as Lightning's ``model.``), tied weights, and the missing / unexpected / mismatched keys."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .formats import strip_prefixes
from .result import CheckpointError, short_list


def storage_identity(t: torch.Tensor, key: str) -> tuple:
    """Equal for two tensors that are the same view of the same storage (tied weights)."""
    if not t.numel() or t.is_meta or t.data_ptr() == 0:
        return (key,)
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype)


def shared_groups(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Keys grouped by shared storage: tied weights (``torch.save`` keeps the sharing in a file)."""
    groups: dict[tuple, list[str]] = {}
    for k, t in tensors.items():
        groups.setdefault(storage_identity(t, k), []).append(k)
    return list(groups.values())


def tie_groups(model: nn.Module) -> list[list[str]]:
    """Model state_dict keys grouped by shared storage (tied weights such as a LM head)."""
    return shared_groups(model.state_dict(keep_vars=True))


def _covers(keys: set[str], groups: list[list[str]]) -> bool:
    return all(any(k in keys for k in g) for g in groups)


def _fitting_prefix(state: Mapping[str, Any], model: nn.Module, target: Mapping[str, Any]) -> str:
    """The dotted prefix whose removal makes the most checkpoint keys match ``target`` (name
    and shape), more than the keys as they are; "" when no prefix helps."""
    def fits(sub: Mapping[str, Any]) -> int:
        return sum(1 for k, v in sub.items()
                   if k in target and tuple(getattr(v, "shape", ())) == tuple(target[k].shape))

    prefixes = {".".join(k.split(".")[:i]) + "." for k in state
                for i in range(1, min(len(k.split(".")) - 1, 4) + 1)}
    best, best_count = "", fits(state)
    for p in sorted(prefixes):
        count = fits(_under(dict(state), p, model, set(target))[0])
        if count > best_count:
            best, best_count = p, count
    return best


def _prefix_hint(state: Mapping[str, Any], model: nn.Module, target: Mapping[str, Any]) -> str:
    """Suggest ``prefix=`` only when removing it makes keys match the model (checked)."""
    p = _fitting_prefix(state, model, target)
    if not p:
        return ""
    return f"; the weights seem to sit under a prefix: pass prefix={p!r} (command line: --prefix {p})"


def _under(
    state: dict[str, torch.Tensor], prefix: str, model: nn.Module | None, model_keys: set[str] | None = None
) -> tuple[dict, list[str]]:
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return strip_prefixes(sub, model, model_keys), [k for k in state if not k.startswith(prefix)]


def select_prefix(
    state: dict[str, torch.Tensor], model: nn.Module | None, prefix: str | None, path: pathlib.Path
) -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """(state under the prefix, the prefix, keys outside it) -- explicit, detected or none.

    Detection (``prefix=None`` with a model): when the keys as they are do not cover the model,
    every dotted prefix of the checkpoint keys is tried; one is used when it is the only prefix
    whose removal makes the keys cover the model (e.g. a Lightning module's ``"model."``).
    """
    if prefix is not None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if prefix == "":
            return state, "", []
        prefix = prefix if prefix.endswith(".") else prefix + "."
        sub, outside = _under(state, prefix, model)
        if not sub:
            heads = sorted({k.split(".", 1)[0] + "." for k in state})
            raise CheckpointError(
                f"{path}: no key starts with prefix {prefix!r}; the keys start with {short_list(heads, 6)}"
            )
        return sub, prefix, outside
    if model is None:
        return state, "", []
    groups = tie_groups(model)
    if _covers(set(state), groups):
        return state, "", []
    counts: dict[str, int] = {}
    for k in state:
        parts = k.split(".")[:-1]
        for i in range(1, min(len(parts), 4) + 1):
            if parts[i - 1] not in ("module", "_orig_mod"):
                p = ".".join(parts[:i]) + "."
                counts[p] = counts.get(p, 0) + 1
    model_keys = {k for g in groups for k in g}
    fits = []
    for p in sorted(p for p, n in counts.items() if n >= len(groups)):  # enough keys to cover
        sub, outside = _under(state, p, model, model_keys)
        if _covers(set(sub), groups):
            fits.append((p, sub, outside))
    if len(fits) == 1:
        return fits[0][1], fits[0][0], fits[0][2]
    if len(fits) > 1:
        raise CheckpointError(
            f"{path}: several prefixes make the keys match {type(model).__name__}: "
            f"{', '.join(repr(p) for p, _, _ in fits[:6])}; pass prefix= (command line: --prefix) "
            "to choose one"
        )
    return state, "", []


def refuse_untied(state: Mapping[str, torch.Tensor], model: nn.Module, path: pathlib.Path) -> None:
    """Refuse keys of one tied tensor of the model that hold different values in the file
    (``load_state_dict`` would keep whichever comes last, silently; and which of them is MSAM's
    ``w~`` to move back is unknowable). Keys whose shape does not fit the model are left to the
    shape check."""
    target = model.state_dict()
    for g in tie_groups(model):
        present = [k for k in g if k in state and tuple(state[k].shape) == tuple(target[k].shape)]
        for k in present[1:]:
            a, b = state[present[0]], state[k]
            if not torch.equal(a, b.to(a.device, a.dtype)):
                raise CheckpointError(
                    f"{path}: {present[0]!r} and {k!r} are one tied tensor of the model but hold "
                    "different values in the checkpoint (max difference "
                    f"{float((a.double() - b.to(a.device).double()).abs().max()):.3g}); it was "
                    "not saved from this tied model. Untie them in the model, or drop one key")


def compare_with_model(
    state: dict[str, torch.Tensor], model: nn.Module, strict: bool, path: pathlib.Path,
) -> tuple[dict[str, torch.Tensor], list[str], list[str], list[tuple[str, tuple[int, ...], tuple[int, ...]]]]:
    """(loadable tensors, missing keys, unexpected keys, shape mismatches) against ``model``.

    Tied weights absent from the checkpoint are not missing when one of their group is there.
    Refuses a checkpoint that matches no key at all, and (``strict``) any key problem.
    """
    target = model.state_dict()
    tied = {k: g for g in tie_groups(model) for k in g}
    missing = [k for k in target if k not in state and not any(j in state for j in tied.get(k, ()))]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        (k, tuple(state[k].shape), tuple(target[k].shape))
        for k in state
        if k in target and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    bad = {k for k, _, _ in mismatched}
    loadable = {k: v for k, v in state.items() if k in target and k not in bad}
    if not loadable and target:
        raise CheckpointError(
            f"{path} matches none of {type(model).__name__}'s keys (nothing would be loaded): "
            f"checkpoint keys {short_list(list(state), 4)}; model keys {short_list(list(target), 4)}"
            + ("; shape mismatches on every common key" if mismatched else "")
            + (_prefix_hint(state, model, target) or "; removing a prefix from its keys does not "
               "make them match either: it looks like a checkpoint of another architecture")
        )
    if strict and (missing or unexpected or mismatched):
        parts = []
        if missing:
            parts.append(f"missing keys: {short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {short_list(unexpected)}")
        if mismatched:
            parts.append(
                "shape mismatches: "
                + short_list([f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched])
            )
        raise CheckpointError(
            f"{path} does not match {type(model).__name__}: " + "; ".join(parts)
            + (_prefix_hint(state, model, target) if unexpected else "")
        )
    return loadable, missing, unexpected, mismatched
