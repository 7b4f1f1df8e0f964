"""PCA directions of a training trajectory (Li et al. 2018, "Visualizing the Loss Landscape of
Neural Nets", Sec. 7), and the flat parameter vector of a model or a state_dict they are built
from. Re-exported by :mod:`analysis.directions`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from msam.batchnorm import BATCHNORM_BUFFERS

from .params import ParameterSpace
from .results import Result, to_jsonable

_BN_BUFFER_SUFFIXES = BATCHNORM_BUFFERS


def state_vector(obj: Any, space: ParameterSpace, what: str) -> torch.Tensor:
    """Flat parameter vector of a model or a state_dict, in ``space``'s order and dtype."""
    if isinstance(obj, nn.Module):
        named = dict(obj.named_parameters())
    elif isinstance(obj, Mapping):
        named = obj
    else:
        raise TypeError(f"{what} must be an nn.Module or a state_dict, got {type(obj).__name__}")
    parts = []
    for name, shape in zip(space.names, space.shapes):
        if name not in named:
            raise ValueError(f"{what} has no parameter {name!r}")
        t = named[name]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.shape != shape:
            raise ValueError(
                f"{what}[{name!r}] has shape {tuple(t.shape)}, expected {tuple(shape)}"
            )
        parts.append(t.detach().reshape(-1).to(device=space.device, dtype=space.dtype))
    return torch.cat(parts)


class _NameSpace:
    """A stand-in for ParameterSpace built from a state_dict (names, shapes, device, dtype)."""

    def __init__(self, sd: Mapping[str, torch.Tensor]):
        keys = [
            k for k, v in sd.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point()
            and not k.endswith(_BN_BUFFER_SUFFIXES)
        ]
        if not keys:
            raise ValueError("the checkpoint has no floating-point parameters")
        self.names = keys
        self.shapes = [sd[k].shape for k in keys]
        self.device = sd[keys[0]].device
        self.dtype = sd[keys[0]].dtype


@dataclass(frozen=True, repr=False)
class PCADirections(Result):
    """Principal directions of a trajectory (from :func:`pca_directions`).

    Attributes:
        directions: ``(k, n)`` tensor whose rows are unit-norm flat directions (first = largest
            variance), so ``d1, d2 = result.directions`` unpacks them.
        explained_variance_ratio: fraction of the trajectory's variance along each direction.
        singular_values: the singular values of the (centered) trajectory matrix.
        coordinates: ``(m, k)`` array, the projection ``(w_i - w_final) . d_j`` of each
            checkpoint (the final point sits at the origin), for drawing the path on a 2-D slice.
        names: names of the parameters spanning the space.
    """

    directions: torch.Tensor
    explained_variance_ratio: np.ndarray
    singular_values: np.ndarray
    coordinates: np.ndarray
    names: tuple

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (the direction vectors themselves are summarized by their length)."""
        out = {f: to_jsonable(getattr(self, f)) for f in
               ("explained_variance_ratio", "singular_values", "coordinates")}
        out["directions"] = [{"numel": int(d.numel()), "norm": float(d.norm())} for d in self.directions]
        out["names"] = list(self.names)
        return out


def pca_directions(
    checkpoints: Sequence[nn.Module | Mapping[str, torch.Tensor]],
    k: int = 2,
    *,
    final: nn.Module | Mapping[str, torch.Tensor] | None = None,
    model: nn.Module | None = None,
    center: bool = True,
) -> PCADirections:
    """The top-``k`` PCA directions of a training trajectory (Li et al. 2018, Sec. 7).

    With checkpoints ``w_1..w_m`` and the final point ``w_final`` (default: the last
    checkpoint), the rows ``x_i = w_i - w_final`` form ``M`` (``m x n``); with ``center=True``
    (default, as Li et al., who use scikit-learn's PCA) the row mean is subtracted first. The
    directions are the top right singular vectors of ``M`` (unit norm) and the explained
    variance ratio is ``s_j^2 / sum_i s_i^2``. Computed in float64 through the ``m x m`` Gram
    matrix, so memory is ``m * n`` floats.

    Args:
        checkpoints: models or state_dicts (at least 2).
        k: number of directions (at most ``m - 1`` when centered, ``m`` otherwise).
        final: the reference point (default: the last checkpoint).
        model: defines the parameter space (names, device, dtype). Default: the first checkpoint
            if it is a model; for state_dicts without a model, every floating-point entry except
            BatchNorm running statistics.
        center: subtract the mean of the rows before the decomposition.

    Returns:
        :class:`PCADirections` (directions in the space's device and dtype).

    Raises:
        ValueError: for fewer than 2 checkpoints, a bad ``k``, mismatched checkpoints, or a
            trajectory with no variance.
    """
    checkpoints = list(checkpoints)
    if len(checkpoints) < 2:
        raise ValueError(f"pca_directions needs at least 2 checkpoints, got {len(checkpoints)}")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    space = _trajectory_space(checkpoints[0], model)
    ref = final if final is not None else checkpoints[-1]
    w_final = state_vector(ref, space, "final").to(torch.float64)
    rows = torch.stack([
        state_vector(c, space, f"checkpoints[{i}]").to(torch.float64) - w_final
        for i, c in enumerate(checkpoints)
    ])
    m = rows.shape[0]
    mat = rows - rows.mean(dim=0, keepdim=True) if center else rows
    rank_max = m - 1 if center else m
    if k > rank_max:
        raise ValueError(f"k={k} exceeds the number of available components ({rank_max}) for {m} checkpoints")
    evals, s, dirs = _top_right_singular(mat, k)
    total = evals.sum()
    coords = rows @ dirs
    directions = dirs.T.to(device=space.device, dtype=space.dtype).contiguous()
    return PCADirections(
        directions=directions,
        explained_variance_ratio=(evals[:k] / total).cpu().numpy(),
        singular_values=s.cpu().numpy(),
        coordinates=coords.cpu().numpy(),
        names=tuple(space.names),
    )



def _trajectory_space(first: Any, model: nn.Module | None) -> Any:
    """The space of :func:`pca_directions`: ``model``'s, else the first checkpoint's (a model's
    parameters, or a state_dict's floating-point entries)."""
    if model is not None:
        return model if isinstance(model, ParameterSpace) else ParameterSpace(model)
    if isinstance(first, nn.Module):
        return ParameterSpace(first)
    if isinstance(first, Mapping):
        return _NameSpace(first)
    raise TypeError(f"checkpoints must be models or state_dicts, got {type(first).__name__}")


def _top_right_singular(mat: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(s^2 descending, s, V_k)`` of the ``m x n`` matrix ``mat`` through its ``m x m`` Gram
    matrix; the columns of ``V_k`` (``n x k``) are unit vectors whose largest-magnitude entry is
    positive (a deterministic sign)."""
    evals, evecs = torch.linalg.eigh(mat @ mat.T)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    if not evals.sum() > 0:
        raise ValueError("the checkpoints are all identical: the trajectory has no variance")
    s = evals.sqrt()
    if not s[k - 1] > 1e-12 * s[0]:
        raise ValueError(f"the trajectory spans fewer than k={k} dimensions")
    dirs = (mat.T @ evecs[:, :k]) / s[:k]  # (n, k), unit columns
    for j in range(k):  # deterministic sign: the largest-magnitude entry is positive
        col = dirs[:, j]
        if col[col.abs().argmax()] < 0:
            dirs[:, j] = -col
    return evals, s, dirs
