"""Safe checkpoint loading: ``weights_only`` pickles and safetensors, key and shape reports, MSAM.

:func:`load_checkpoint` reads

* ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` files with ``torch.load(weights_only=True)``: a plain
  ``state_dict``, or a dictionary holding one under ``"model"``, ``"state_dict"`` or
  ``"model_state_dict"`` (training checkpoints such as ``{"model": ..., "optimizer": ...,
  "epoch": 3}``), with ``nn.DataParallel`` / DDP ``"module."`` and ``torch.compile``
  ``"_orig_mod."`` prefixes removed;
* ``.safetensors`` files with :func:`safetensors.torch.load_file`.

Security: a pickle that references anything beyond tensors and plain containers (a class, a
function such as ``os.system``) is refused with :class:`UnsafeCheckpointError` *before* any of it
runs; ``weights_only=True`` unpickling never calls the referenced object. Loading such files is
possible only with the explicit opt-in ``allow_pickle=True`` (CLI: ``--trust-pickle``), meant
for legacy files you created yourself; it is never the default.

MSAM checkpoints: between steps MSAM keeps the parameters at the perturbed point
``w~ = w - rho * v / ||v||`` (Becker et al. 2024, Algorithm 1). A checkpoint saved from there
(``torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()})`` without calling
``opt.eval()`` first) holds ``w~``, not the weights the optimizer is training. When the
checkpoint's optimizer state says it was saved perturbed, the loader **moves the weights back**
to ``w = w~ + rho * v / ||v||`` using the momentum buffers and ``rho`` stored in that same
optimizer state, and emits a :class:`PerturbedCheckpointWarning`; the returned
:class:`Checkpoint` records ``perturbed=True, unperturbed=True``. We correct rather than refuse
because the optimizer state holds everything the correction needs exactly (the same formula the
optimizer's own ``eval()`` applies), while refusing would leave the user with no way to evaluate
the file. If the state cannot be matched to the parameters (different counts or shapes), the
file is refused with an explanation instead; ``unperturb=False`` loads the raw perturbed weights.
"""

from __future__ import annotations

import math
import pathlib
import pickle
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from analysis.results import Result, to_jsonable

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "UnsafeCheckpointError",
    "PerturbedCheckpointWarning",
    "load_checkpoint",
    "find_checkpoints",
    "CHECKPOINT_SUFFIXES",
]

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")
_OPTIMIZER_KEYS = ("optimizer", "optimizer_state_dict", "optim", "opt")
_PREFIXES = ("module.", "_orig_mod.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (unreadable, wrong layout, keys or shapes that differ)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would import or call arbitrary objects; it was refused and nothing ran."""


class PerturbedCheckpointWarning(UserWarning):
    """The checkpoint was saved at MSAM's perturbed point and has been moved back."""


@dataclass(frozen=True, repr=False)
class Checkpoint(Result):
    """A loaded checkpoint.

    Attributes:
        path: the file.
        format: ``"torch"`` or ``"safetensors"``.
        state_dict: the model's tensors (prefixes stripped, MSAM perturbation undone).
        optimizer_state: the optimizer ``state_dict`` stored beside the model, if any.
        metadata: the other top-level entries (``epoch``, ``step``...) or safetensors metadata.
        missing_keys: model keys absent from the checkpoint (only when a model was given).
        unexpected_keys: checkpoint keys the model does not have.
        shape_mismatches: ``(key, checkpoint_shape, model_shape)`` triples.
        perturbed: the optimizer state says the weights were saved at MSAM's perturbed point.
        unperturbed: the loader moved them back to ``w = w~ + rho * v / ||v||``.
    """

    path: str
    format: str
    state_dict: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    missing_keys: tuple[str, ...] = ()
    unexpected_keys: tuple[str, ...] = ()
    shape_mismatches: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    perturbed: bool = False
    unperturbed: bool = False

    @property
    def num_tensors(self) -> int:
        return len(self.state_dict)

    @property
    def num_parameters(self) -> int:
        """Number of scalars in floating-point tensors of the state dict."""
        return sum(t.numel() for t in self.state_dict.values() if t.is_floating_point())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe summary (tensor values are not included)."""
        return {
            "path": self.path,
            "format": self.format,
            "num_tensors": self.num_tensors,
            "num_parameters": self.num_parameters,
            "has_optimizer_state": self.optimizer_state is not None,
            "metadata": to_jsonable(
                {k: v for k, v in self.metadata.items() if not isinstance(v, (torch.Tensor, Mapping))}
            ),
            "missing_keys": list(self.missing_keys),
            "unexpected_keys": list(self.unexpected_keys),
            "shape_mismatches": [[k, list(a), list(b)] for k, a, b in self.shape_mismatches],
            "perturbed": self.perturbed,
            "unperturbed": self.unperturbed,
        }

    def __repr__(self) -> str:
        d = self.to_dict()
        keys = ("path", "format", "num_tensors", "num_parameters", "perturbed", "unperturbed")
        extra = ", ".join(f"{k}={d[k]!r}" for k in keys)
        problems = len(self.missing_keys) + len(self.unexpected_keys) + len(self.shape_mismatches)
        return f"Checkpoint({extra}, key_problems={problems})"

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
            f"<td style='text-align:left'>{html.escape(str(v))}</td></tr>"
            for k, v in self.to_dict().items()
        )
        return f"<table><caption>Checkpoint</caption>{rows}</table>"


# --------------------------------------------------------------------------------------------
# reading files


def _names(items: list[str], limit: int = 8) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" ... and {len(items) - limit} more" if len(items) > limit else "")


def _unsafe_reason(exc: BaseException) -> str:
    text = str(exc)
    m = re.search(r"GLOBAL ([\w.]+)", text)
    if m:
        return f"it references {m.group(1)}, which weights_only loading does not allow"
    m = re.search(r"Unsupported operand \d+|Unsupported class [\w.]+|Trying to call [\w.]+", text)
    if m:
        return m.group(0)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip() and "Weights only" not in ln), "")
    return first[:200] or "it holds objects other than tensors and plain containers"


def _torch_load(path: pathlib.Path, map_location: Any, allow_pickle: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=not allow_pickle)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            raise UnsafeCheckpointError(
                f"refused to load {path}: {_unsafe_reason(exc)}; nothing in it was run. "
                "If you created this file yourself and trust it, pass allow_pickle=True "
                "(command line: --trust-pickle)"
            ) from None
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {exc}") from None
    except Exception as exc:  # any parse failure of a corrupt file: report it in one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {msg}") from None


def _safetensors_load(path: pathlib.Path, map_location: Any) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    device = str(map_location) if isinstance(map_location, (str, torch.device)) else "cpu"
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=device) as fh:
            meta = dict(fh.metadata() or {})
            for k in fh.keys():
                out[k] = fh.get_tensor(k)
        return out, meta
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file: {exc}") from None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        and all(isinstance(v, torch.Tensor) for v in obj.values())
    )


def _split(obj: Any, path: pathlib.Path) -> tuple[dict, dict | None, dict]:
    """(state_dict, optimizer_state, metadata) from whatever torch.load returned."""
    if isinstance(obj, nn.Module):  # only reachable with allow_pickle=True
        return dict(obj.state_dict()), None, {}
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}; expected a state_dict or a dict with a "
            f"'model' / 'state_dict' / 'model_state_dict' entry"
        )
    if _is_state_dict(obj):
        return dict(obj), None, {}
    for key in _WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, nn.Module):
            inner = inner.state_dict()
        if _is_state_dict(inner):
            opt = next((obj[k] for k in _OPTIMIZER_KEYS if isinstance(obj.get(k), Mapping)), None)
            meta = {k: v for k, v in obj.items() if k != key and k not in _OPTIMIZER_KEYS}
            return dict(inner), (dict(opt) if opt is not None else None), meta
    # a state dict mixed with a few non-tensor extras (e.g. a version number)
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) - 2 and not any(isinstance(v, Mapping) for v in obj.values()):
        return tensors, None, {k: v for k, v in obj.items() if k not in tensors}
    keys = [str(k) for k in obj][:10]
    raise CheckpointError(
        f"{path} has no model weights: top-level keys are {keys}; expected a state_dict or a "
        f"dict with a 'model' / 'state_dict' / 'model_state_dict' entry"
    )


def _strip_prefixes(state: dict[str, torch.Tensor], model: nn.Module | None) -> dict[str, torch.Tensor]:
    model_keys = set(model.state_dict()) if model is not None else set()
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if state and all(k.startswith(prefix) for k in state):
                stripped = {k[len(prefix):]: v for k, v in state.items()}
                # keep the prefix if the model itself is wrapped and the names already match
                if model is not None and set(state) <= model_keys and not set(stripped) <= model_keys:
                    continue
                state, changed = stripped, True
    return state


# --------------------------------------------------------------------------------------------
# MSAM: saved at the perturbed point


def _perturbed_flag(opt_state: Mapping[str, Any]) -> bool:
    """Whether an optimizer state_dict says its parameters were saved at a perturbed point."""
    for key in ("perturbed", "is_perturbed", "msam_perturbed"):
        if key in opt_state:
            return bool(_scalar(opt_state[key]))
    for g in opt_state.get("param_groups", []) or []:
        for key in ("perturbed", "is_perturbed"):
            if isinstance(g, Mapping) and key in g and bool(_scalar(g[key])):
                return True
    return False


def _scalar(x: Any) -> Any:
    return x.item() if isinstance(x, torch.Tensor) and x.numel() == 1 else x


def _perturbation_buffer(st: Mapping[str, Any]) -> torch.Tensor | None:
    for key in ("momentum_buffer", "exp_avg"):
        if isinstance(st.get(key), torch.Tensor):
            return st[key]
    return None


def _parameter_names(state: dict[str, torch.Tensor], model: nn.Module | None) -> list[str]:
    if model is not None:
        return [n for n, _ in model.named_parameters()]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return [k for k, v in state.items() if v.is_floating_point() and not k.endswith(buffers)]


def _strip_name(name: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def _match_optimizer_params(
    groups: list, per_param: Mapping, order: list[tuple[Any, int]], names: list[str],
    state: Mapping[str, torch.Tensor], path: pathlib.Path, explain: str,
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
        known = set(names)
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
        buf = _perturbation_buffer(st) if isinstance(st, Mapping) else None
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


def _unperturb(
    state: dict[str, torch.Tensor], opt_state: Mapping[str, Any], model: nn.Module | None, path: pathlib.Path
) -> dict[str, torch.Tensor]:
    """Move ``w~`` back to ``w = w~ + c_g * d`` for every parameter group ``g``.

    ``d`` is the stored direction buffer (``momentum_buffer`` for MSAM / NAG, ``exp_avg`` for
    AdamW-MSAM) and ``c_g`` the coefficient the optimizer actually applied, stored in the group
    as ``"perturbation_scale"`` (``rho / ||v||`` for default MSAM, with the global norm over all
    groups). Without that entry, ``c_g = rho_g / ||d||`` (the paper's definition; times ``lr``
    with ``scale_by_lr`` and without the norm when ``normalize`` is False) is used.
    """
    groups = opt_state.get("param_groups") or []
    per_param = opt_state.get("state") or {}
    order: list[tuple[Any, int]] = []
    for gi, g in enumerate(groups):
        order += [(pid, gi) for pid in g.get("params", [])]
    names = _parameter_names(state, model)
    explain = (
        "cannot match the optimizer state to the parameters to undo MSAM's perturbation "
        "(was the optimizer built from model.parameters()?); save after optimizer.eval(), or "
        "load with unperturb=False to take the perturbed weights as they are"
    )
    if len(order) != len(names):
        raise CheckpointError(
            f"{path}: the optimizer has {len(order)} parameters but the model {len(names)}; {explain}"
        )
    matched = _match_optimizer_params(groups, per_param, order, names, state, path, explain)
    bufs: list[tuple[str, torch.Tensor, int]] = []
    for (pid, gi), name in zip(order, matched):
        st = per_param.get(pid, per_param.get(str(pid), {}))
        buf = _perturbation_buffer(st) if isinstance(st, Mapping) else None
        if buf is None:
            continue  # no momentum yet for this parameter: it was not perturbed
        if name not in state or tuple(state[name].shape) != tuple(buf.shape):
            got = tuple(state[name].shape) if name in state else "absent"
            raise CheckpointError(
                f"{path}: momentum of optimizer parameter {pid} has shape {tuple(buf.shape)} but "
                f"{name!r} is {got}; {explain}"
            )
        bufs.append((name, buf, gi))
    if not bufs:
        return state
    scales: list[float] = []
    norm: float | None = None
    for g in groups:
        if "perturbation_scale" in g:
            c = _scalar(g["perturbation_scale"])
            scales.append(0.0 if c is None else float(c))
            continue
        rho = g.get("rho")
        if rho is None:
            raise CheckpointError(
                f"{path}: the optimizer state says the weights are perturbed but records neither "
                "'perturbation_scale' nor 'rho'; cannot move them back (load with "
                "unperturb=False to take them as they are)"
            )
        if norm is None:
            norm = math.sqrt(sum(float(b.double().pow(2).sum()) for _, b, _ in bufs))
        coef = float(_scalar(rho)) * (float(_scalar(g.get("lr", 1.0))) if g.get("scale_by_lr") else 1.0)
        if g.get("normalize", True):
            coef = coef / norm if norm > 0 else 0.0
        scales.append(coef)
    state = dict(state)
    for name, buf, gi in bufs:
        if scales[gi] == 0.0:
            continue
        w = state[name]
        state[name] = (w.double() + scales[gi] * buf.to(w.device).double()).to(w.dtype)
    return state


# --------------------------------------------------------------------------------------------
# public API


def load_checkpoint(
    path: str | pathlib.Path,
    model: nn.Module | None = None,
    *,
    map_location: Any = "cpu",
    strict: bool = True,
    allow_pickle: bool = False,
    unperturb: bool = True,
) -> Checkpoint:
    """Load a checkpoint safely and (optionally) into ``model``.

    Args:
        path: a ``.pt`` / ``.pth`` / ``.ckpt`` / ``.bin`` file (read with
            ``torch.load(weights_only=True)``) or a ``.safetensors`` file.
        model: if given, the weights are copied into it (``load_state_dict``).
        map_location: where tensors are loaded (default ``"cpu"``).
        strict: with a model, refuse missing / unexpected keys and shape mismatches (all listed
            by name in the error). With ``strict=False`` the matching tensors are loaded and the
            rest is reported on the returned object.
        allow_pickle: load arbitrary pickles (``weights_only=False``). **Runs code from the
            file**; only for legacy files you trust. Default False.
        unperturb: undo MSAM's perturbation when the optimizer state says the weights were saved
            perturbed (see the module docstring). Default True.

    Returns:
        :class:`Checkpoint`.

    Raises:
        FileNotFoundError: the path does not exist or is a directory.
        UnsafeCheckpointError: the pickle references code; it was not run.
        CheckpointError: unreadable file, no weights in it, or (strict) keys / shapes that do not
            match the model.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a directory, not a checkpoint file")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if path.suffix == ".safetensors":
        state, meta = _safetensors_load(path, map_location)
        fmt, opt_state = "safetensors", None
    else:
        obj = _torch_load(path, map_location, allow_pickle)
        state, opt_state, meta = _split(obj, path)
        fmt = "torch"
    state = _strip_prefixes(state, model)

    sam_state = opt_state.get("sam") if isinstance(opt_state, Mapping) else None
    if isinstance(sam_state, Mapping) and bool(_scalar(sam_state.get("perturbed", False))):
        raise CheckpointError(
            f"{path} was saved between SAM's first_step() and second_step(): its weights are at "
            "the ascent point w + e, not at w; save after second_step() (or after "
            "optimizer.unperturb())"
        )
    perturbed = bool(opt_state) and _perturbed_flag(opt_state)  # type: ignore[arg-type]
    unperturbed = False
    if perturbed and unperturb:
        state = _unperturb(state, opt_state, model, path)  # type: ignore[arg-type]
        unperturbed = True
        warnings.warn(
            f"{path} was saved while MSAM's parameters were perturbed; moved back to "
            "w = w~ + rho*v/||v|| using the optimizer state stored in the checkpoint",
            PerturbedCheckpointWarning,
            stacklevel=2,
        )

    missing: list[str] = []
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    if model is not None:
        target = model.state_dict()
        missing = [k for k in target if k not in state]
        unexpected = [k for k in state if k not in target]
        mismatched = [
            (k, tuple(state[k].shape), tuple(target[k].shape))
            for k in state
            if k in target and tuple(state[k].shape) != tuple(target[k].shape)
        ]
        if strict and (missing or unexpected or mismatched):
            parts = []
            if missing:
                parts.append(f"missing keys: {_names(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_names(unexpected)}")
            if mismatched:
                parts.append(
                    "shape mismatches: "
                    + _names([f"{k} (checkpoint {list(a)} vs model {list(b)})" for k, a, b in mismatched])
                )
            raise CheckpointError(
                f"{path} does not match {type(model).__name__}: " + "; ".join(parts)
            )
        bad = {k for k, _, _ in mismatched}
        model.load_state_dict({k: v for k, v in state.items() if k in target and k not in bad}, strict=False)

    return Checkpoint(
        path=str(path),
        format=fmt,
        state_dict=state,
        optimizer_state=opt_state,
        metadata=meta,
        missing_keys=tuple(missing),
        unexpected_keys=tuple(unexpected),
        shape_mismatches=tuple(mismatched),
        perturbed=perturbed,
        unperturbed=unperturbed,
    )


def find_checkpoints(paths: list[str | pathlib.Path]) -> list[pathlib.Path]:
    """Expand files and directories into a sorted list of checkpoint files.

    A directory contributes its files ending in one of :data:`CHECKPOINT_SUFFIXES` (not
    recursive). Raises ``FileNotFoundError`` for a missing path and ``CheckpointError`` for a
    directory without checkpoints.
    """
    out: list[pathlib.Path] = []
    for p in map(pathlib.Path, paths):
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix in CHECKPOINT_SUFFIXES)
            if not found:
                raise CheckpointError(
                    f"no checkpoints in directory {p} (looked for {', '.join(CHECKPOINT_SUFFIXES)})"
                )
            out += found
        else:
            out.append(p)
    return out

