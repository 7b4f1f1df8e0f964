"""The results of a slice: :class:`Slice1D` (a line) and :class:`Slice2D` (a plane)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.results import Result

#: Metrics a slice can record.
METRICS = ("loss", "accuracy")


@dataclass(frozen=True, repr=False)
class Slice1D(Result):
    """Loss (and accuracy) along ``w + alpha d`` (from :func:`slice_1d` or :func:`interpolate`).

    Attributes:
        alphas: the coordinates, shape ``(m,)``.
        loss: ``loss[i] = L(w + alphas[i] d)``; NaN where non-finite.
        accuracy: same shape, or ``None`` (not requested, or targets are not class indices).
        loss_at_origin: ``L(w)``.
        accuracy_at_origin: accuracy at ``w`` (or ``None``).
        direction: metadata of ``d``: ``name``, ``norm``, ``numel`` (and the parameter norm
            ``weight_norm`` for scale).
        num_samples: the data size ``N`` (samples).
        num_terms: the loss terms the losses are averaged over (``N`` for classification, the
            counted tokens for a language-model loss; accuracy is per term, too).
        mode: ``"eval"``, ``"train"`` or ``None`` (the model mode used).
        recalibrate_bn: whether BatchNorm statistics were recomputed per point.
        nonfinite: number of points whose loss was not finite.
        seconds: wall time of the grid.
        label: a label for legends.
    """

    alphas: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    loss_at_origin: float
    accuracy_at_origin: float | None
    direction: dict
    num_samples: int
    mode: str | None
    recalibrate_bn: bool
    nonfinite: int
    seconds: float
    label: str = ""
    num_terms: int | None = None

    def plot(self, ax: Any = None, **kwargs: Any) -> Any:
        """Matplotlib curve (see :func:`landscape.plot_1d`); returns the figure."""
        from ..plots import plot_1d

        return plot_1d(self, ax=ax, **kwargs)

    def plot_interactive(self, **kwargs: Any) -> Any:
        """Plotly curve with hover values (see :func:`landscape.plotly_1d`)."""
        from ..plots import plotly_1d

        return plotly_1d(self, **kwargs)


@dataclass(frozen=True, repr=False)
class Slice2D(Result):
    """Loss (and accuracy) on the plane ``w + x d1 + y d2`` (from :func:`slice_2d`).

    Attributes:
        xs, ys: the coordinates along ``d1`` and ``d2``.
        loss: ``loss[i, j] = L(w + xs[i] d1 + ys[j] d2)``, shape ``(len(xs), len(ys))``; NaN
            where non-finite.
        accuracy: same shape, or ``None``.
        loss_at_origin, accuracy_at_origin: the values at ``w``.
        directions: metadata of ``(d1, d2)``: ``name``, ``norm``, ``numel``, ``weight_norm``.
        cosine: ``cos(d1, d2)`` (0 for orthogonalized directions).
        num_samples, mode, recalibrate_bn, nonfinite, seconds, num_terms: as in :class:`Slice1D`.
        store: path of the store file (or ``None``).
        resumed_rows: rows loaded from the store instead of computed.
        label: a label for titles.
    """

    xs: np.ndarray
    ys: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray | None
    loss_at_origin: float
    accuracy_at_origin: float | None
    directions: tuple
    cosine: float
    num_samples: int
    mode: str | None
    recalibrate_bn: bool
    nonfinite: int
    seconds: float
    store: str | None = None
    resumed_rows: int = 0
    label: str = ""
    num_terms: int | None = None

    def plot(self, kind: str = "contour", **kwargs: Any) -> Any:
        """Matplotlib figure: ``kind="contour"`` (labelled lines), ``"filled"`` (also
        ``"contourf"``) or ``"surface"`` (see :mod:`landscape.plots`); returns the figure."""
        from .. import plots

        kinds = {"contour": plots.plot_contour, "filled": plots.plot_contourf, "contourf": plots.plot_contourf,
                 "surface": plots.plot_surface}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        return kinds[kind](self, **kwargs)

    def plot_interactive(self, kind: str = "surface", **kwargs: Any) -> Any:
        """Plotly figure (``kind="surface"`` or ``"contour"``) with hover values."""
        from .. import plots

        kinds = {"surface": plots.plotly_surface, "contour": plots.plotly_contour}
        if kind not in kinds:
            raise ValueError(f"kind must be one of {sorted(kinds)}, got {kind!r}")
        return kinds[kind](self, **kwargs)
