"""Argument checks of the slices (one-line errors before any work) and small helpers."""

from __future__ import annotations

import os
import pathlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from analysis import distributed as dist
from analysis.directions import as_direction
from analysis.evaluation import progress_bar
from analysis.params import ParameterSpace

from ._results import METRICS


def check_coords(values: Any, what: str) -> np.ndarray:
    """``values`` as a finite, non-empty 1-D float64 array; ``TypeError`` / ``ValueError`` naming
    ``what`` otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{what} must be a sequence of numbers, got {type(values).__name__}") from err
    if arr.ndim == 0:
        raise ValueError(f"{what} must be a 1-D array of coordinates, got the scalar {values!r}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty; pass at least one coordinate")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contains non-finite values")
    return arr


def check_direction(d: Any, space: ParameterSpace, what: str) -> torch.Tensor:
    """A slice's direction, checked by the toolkit's one validator (nonzero required)."""
    return as_direction(d, space, what, nonzero="a slice needs a nonzero direction")


def check_plane(d1: Any, d2: Any, space: ParameterSpace) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The checked directions of a plane and their cosine; refuses parallel directions."""
    t1 = check_direction(d1, space, "d1")
    t2 = check_direction(d2, space, "d2")
    # float64 accumulation, over all shards (FSDP2), without float64 copies of the directions
    cosine = float(space.dot(t1, t2) / (space.norm(t1) * space.norm(t2)))
    if abs(cosine) > 1 - 1e-9:
        raise ValueError(f"d1 and d2 are parallel (cosine {cosine:.12f}); the plane is degenerate")
    return t1, t2, cosine


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """``metrics`` as a tuple, checked: ``"loss"`` among them and each one of :data:`METRICS`."""
    if isinstance(metrics, str):
        metrics = (metrics,)
    metrics = tuple(metrics)
    bad = [m for m in metrics if m not in METRICS]
    if bad or "loss" not in metrics:
        raise ValueError(f"metrics must include 'loss' and be among {METRICS}, got {metrics!r}")
    return metrics


def loss_name(loss_fn: Any) -> str:
    """A stable name of the loss for a store's fingerprint: the name given, or the qualified
    name of the callable."""
    if isinstance(loss_fn, str) or loss_fn is None:
        return str(loss_fn or "cross_entropy")
    name = getattr(loss_fn, "__qualname__", None) or type(loss_fn).__qualname__
    return f"{getattr(loss_fn, '__module__', '') or type(loss_fn).__module__}.{name}"


def check_bool(name: str, value: Any) -> None:
    """Raise ``TypeError`` naming ``name`` and the value unless ``value`` is ``True`` or ``False``."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def check_label(name: str, value: Any) -> None:
    """Raise ``TypeError`` naming ``name`` and the value unless ``value`` is a string."""
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, got {type(value).__name__} {value!r}")


def check_store_path(store: Any) -> None:
    """Refuse, before computing, a ``store`` that cannot be written (as the CLI does).

    A directory (existing, or named with a trailing separator) or the parent of a ``.npz``
    path must be, or be creatable under, a writable directory; an existing store file must be a
    writable regular file. Skipped under ``torch.distributed`` (rank 0 alone writes and its
    errors reach every rank).
    """
    if not isinstance(store, (str, os.PathLike)):
        raise TypeError(f"store must be a path (str or os.PathLike), got {type(store).__name__}")
    raw = os.fspath(store)
    if not raw:
        raise ValueError("store is an empty path")
    if dist.is_distributed():
        return
    p = pathlib.Path(raw)
    is_dir = p.is_dir() or raw.endswith(("/", os.sep))
    if not is_dir:
        target = p if p.suffix == ".npz" else p.with_name(p.name + ".npz")
        if target.exists() and (not target.is_file() or not os.access(target, os.W_OK)):
            raise ValueError(f"store {target} exists but is not a writable regular file")
    folder = p if is_dir else (p.parent if str(p.parent) else pathlib.Path("."))
    anc = folder
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise ValueError(f"cannot write store {raw}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write store {raw}: directory {anc} is not writable")


def point_bar(total: int, progress: bool, desc: str):
    """A tqdm bar over ``total`` grid points (``None`` when ``progress`` is off, the grid is empty
    or this is not the main process)."""
    if not progress or total == 0 or not dist.is_main_process():
        return None
    return progress_bar(iter(()), enabled=True, total=total, desc=desc, unit="pt")


def warn_nonfinite(count: int, total: int) -> None:
    """Warn (``RuntimeWarning``) when ``count`` of the ``total`` grid points were non-finite."""
    if count:
        warnings.warn(
            f"{count} of {total} grid points gave a non-finite loss; they are stored as NaN",
            RuntimeWarning,
            stacklevel=3,
        )
