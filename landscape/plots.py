"""Figures for landscape slices and Hessian spectra: matplotlib (static) and plotly (interactive).

matplotlib (each returns the ``Figure``; pass ``ax=`` to draw into an existing axis):

* :func:`plot_1d`: one or several 1-D slices on one axis (e.g. SGD vs. MSAM), linear or log
  scale, the origin marked;
* :func:`plot_contour`: labelled contour lines of a 2-D slice, optionally with a path of points
  (e.g. the PCA coordinates of a training trajectory);
* :func:`plot_contourf`: filled contours; :func:`plot_surface`: a 3-D surface;
* :func:`plot_spectral_density`: the Hessian eigenvalue density from stochastic Lanczos
  quadrature (fields ``grid``, ``density`` and optionally ``nodes``, ``weights``).

plotly (each returns a ``plotly.graph_objects.Figure``, which Jupyter shows inline; hover shows
the coordinates and the value): :func:`plotly_1d`, :func:`plotly_surface`,
:func:`plotly_contour`; :func:`save_html` writes a self-contained HTML file (plotly.js embedded,
works offline).

Every figure has a title, axis labels with the direction names, and a colorbar where colors
carry values. Results are read by attribute (``xs``, ``ys``, ``loss``, ``accuracy``,
``directions``, ...), so any object with those fields can be plotted.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _values(result: Any, metric: str) -> np.ndarray:
    if metric not in ("loss", "accuracy"):
        raise ValueError(f"metric must be 'loss' or 'accuracy', got {metric!r}")
    values = getattr(result, metric, None)
    if values is None:
        raise ValueError(f"this result has no {metric!r} values (not recorded)")
    return np.asarray(values, dtype=np.float64)


def _transform(z: np.ndarray, log: bool) -> np.ndarray:
    if not log:
        return z
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(z > 0, np.log10(np.where(z > 0, z, 1.0)), np.nan)


def _zlabel(metric: str, log: bool) -> str:
    return f"log10 {metric}" if log else metric


def _dir_names(result: Any) -> tuple[str, str]:
    dirs = getattr(result, "directions", None) or ({"name": "d1"}, {"name": "d2"})
    return str(dirs[0].get("name", "d1")), str(dirs[1].get("name", "d2"))


def _title(result: Any, default: str, title: str | None) -> str:
    if title is not None:
        return title
    label = getattr(result, "label", "")
    return f"{default}: {label}" if label else default


def figure_axes(ax: Any, projection: str | None = None, figsize=(6.0, 4.5)):
    """``(figure, axes)``: those of ``ax``, or a new figure of ``figsize`` with one subplot
    (``projection``, e.g. ``"3d"``) that pyplot does not keep."""
    import matplotlib.pyplot as plt

    if ax is not None:
        return ax.figure, ax
    fig = plt.figure(figsize=figsize)
    plt.close(fig)  # returned, not kept by pyplot: shown once in Jupyter, no pile-up of figures
    ax = fig.add_subplot(111, projection=projection) if projection else fig.add_subplot(111)
    return fig, ax


def _require(result: Any, fields: Sequence[str], what: str, func: str) -> None:
    """TypeError naming the value when ``result`` lacks the attributes a plot reads."""
    missing = [f for f in fields if not hasattr(result, f)]
    if missing:
        shown = repr(result) if len(repr(result)) <= 60 else type(result).__name__
        raise TypeError(f"{func} expects {what}, got {shown} ({type(result).__name__}, "
                        f"without {', '.join(missing)})")


def _slices_1d(results: Any, func: str) -> list:
    items = list(results) if isinstance(results, (list, tuple)) else [results]
    if not items:
        raise ValueError(f"{func} needs at least one result")
    for r in items:
        _require(r, ("alphas",), "a Slice1D or a list of them", func)
    return items


def _check_2d(result: Any, metric: str, func: str = "plot") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    _require(result, ("xs", "ys"), "a Slice2D", func)
    xs = np.asarray(result.xs, dtype=np.float64)
    ys = np.asarray(result.ys, dtype=np.float64)
    z = _values(result, metric)
    if z.shape != (len(xs), len(ys)):
        raise ValueError(f"{metric} has shape {z.shape}, expected {(len(xs), len(ys))}")
    if not np.isfinite(z).any():
        raise ValueError(f"every {metric} value is NaN; nothing to plot")
    # sort the axes so that plotting routines get monotone coordinates
    ix, iy = np.argsort(xs, kind="stable"), np.argsort(ys, kind="stable")
    return xs[ix], ys[iy], z[np.ix_(ix, iy)]


# --------------------------------------------------------------------------------------------
# matplotlib
# --------------------------------------------------------------------------------------------
def plot_1d(
    results: Any | Sequence[Any],
    *,
    ax: Any = None,
    metric: str = "loss",
    log: bool = False,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    mark_origin: bool = True,
    **line_kwargs: Any,
):
    """Curves ``metric(alpha)`` of one or several :class:`~landscape.Slice1D` on one axis.

    Args:
        results: a Slice1D or a sequence of them (e.g. the same direction for several models).
        ax: a matplotlib axis to draw into (default: a new figure).
        metric: ``"loss"`` (default) or ``"accuracy"``.
        log: logarithmic y axis.
        labels: legend labels (default: each result's ``label`` or direction name).
        title: figure title (default: "1-D loss slice").
        mark_origin: draw a dotted vertical line at ``alpha = 0``.
        **line_kwargs: passed to ``ax.plot``.

    Returns:
        The matplotlib Figure.
    """
    items = _slices_1d(results, "plot_1d")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} results")
    fig, ax = figure_axes(ax)
    names = set()
    for k, r in enumerate(items):
        a = np.asarray(r.alphas, dtype=np.float64)
        v = _values(r, metric)
        order = np.argsort(a, kind="stable")
        name = r.direction.get("name", "d") if isinstance(getattr(r, "direction", None), dict) else "d"
        names.add(name)
        label = labels[k] if labels is not None else (getattr(r, "label", "") or name)
        ax.plot(a[order], v[order], marker="." if len(a) <= 60 else None, label=label, **line_kwargs)
    if mark_origin:
        ax.axvline(0.0, color="0.6", lw=0.8, ls=":")
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("alpha along " + ", ".join(sorted(names)))
    ax.set_ylabel(metric)
    ax.set_title(title if title is not None else "1-D " + metric + " slice")
    if len(items) > 1 or labels is not None:
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


def plot_contour(
    result: Any,
    *,
    ax: Any = None,
    metric: str = "loss",
    levels: int | Sequence[float] = 20,
    log: bool = False,
    clabel: bool = True,
    path: np.ndarray | None = None,
    title: str | None = None,
    cmap: str = "viridis",
):
    """Labelled contour lines of a 2-D slice, with a colorbar and the origin marked.

    Args:
        result: a :class:`~landscape.Slice2D` (``loss[i, j]`` at ``(xs[i], ys[j])``).
        ax: an axis to draw into (default: a new figure).
        metric: ``"loss"`` or ``"accuracy"``.
        levels: number of levels or explicit levels.
        log: contour ``log10`` of the values.
        clabel: write the level values on the lines.
        path: optional ``(m, 2)`` array of points to draw as a line with markers (e.g.
            ``pca_directions(...).coordinates``).
        title: the title (default: "2-D loss landscape").
        cmap: a matplotlib colormap name.

    Returns:
        The matplotlib Figure.
    """
    xs, ys, z = _check_2d(result, metric, "plot_contour")
    zt = _transform(z, log).T
    fig, ax = figure_axes(ax)
    cs = ax.contour(xs, ys, zt, levels=levels, cmap=cmap)
    if clabel:
        ax.clabel(cs, inline=True, fontsize=7, fmt="%.3g")
    fig.colorbar(cs, ax=ax, label=_zlabel(metric, log))
    _decorate_2d(ax, result, metric, title, path)
    return fig


def plot_contourf(
    result: Any,
    *,
    ax: Any = None,
    metric: str = "loss",
    levels: int | Sequence[float] = 30,
    log: bool = False,
    lines: bool = True,
    path: np.ndarray | None = None,
    title: str | None = None,
    cmap: str = "viridis",
):
    """Filled contours of a 2-D slice (thin lines on top with ``lines=True``) and a colorbar.

    Arguments as in :func:`plot_contour`. Returns the matplotlib Figure.
    """
    xs, ys, z = _check_2d(result, metric, "plot_contourf")
    zt = _transform(z, log).T
    fig, ax = figure_axes(ax)
    cf = ax.contourf(xs, ys, zt, levels=levels, cmap=cmap)
    if lines:
        ax.contour(xs, ys, zt, levels=cf.levels, colors="k", linewidths=0.3, alpha=0.5)
    fig.colorbar(cf, ax=ax, label=_zlabel(metric, log))
    _decorate_2d(ax, result, metric, title, path)
    return fig


def _decorate_2d(ax: Any, result: Any, metric: str, title: str | None, path: Any) -> None:
    n1, n2 = _dir_names(result)
    if path is not None:
        p = np.asarray(path, dtype=np.float64)
        if p.ndim != 2 or p.shape[1] != 2:
            raise ValueError(f"path must have shape (m, 2), got {p.shape}")
        ax.plot(p[:, 0], p[:, 1], "o-", color="tab:red", ms=3, lw=1, label="path")
    ax.plot([0.0], [0.0], marker="*", color="white", mec="k", ms=10, ls="none")
    ax.set_xlabel(n1)
    ax.set_ylabel(n2)
    ax.set_title(_title(result, f"2-D {metric} landscape", title))


def plot_surface(
    result: Any,
    *,
    ax: Any = None,
    metric: str = "loss",
    log: bool = False,
    title: str | None = None,
    cmap: str = "viridis",
    elev: float = 35.0,
    azim: float = -60.0,
):
    """A 3-D surface of a 2-D slice with a colorbar.

    Args:
        result: a :class:`~landscape.Slice2D`.
        ax: a 3-D axis (``projection="3d"``) to draw into (default: a new figure).
        metric, log, title, cmap: as in :func:`plot_contour`.
        elev, azim: the view angles.

    Returns:
        The matplotlib Figure.
    """
    xs, ys, z = _check_2d(result, metric, "plot_surface")
    zt = _transform(z, log).T
    fig, ax = figure_axes(ax, projection="3d", figsize=(7.0, 5.5))
    X, Y = np.meshgrid(xs, ys)
    surf = ax.plot_surface(X, Y, np.ma.masked_invalid(zt), cmap=cmap, linewidth=0, antialiased=True)
    fig.colorbar(surf, ax=ax, shrink=0.6, pad=0.12, label=_zlabel(metric, log))
    n1, n2 = _dir_names(result)
    ax.set_xlabel(n1)
    ax.set_ylabel(n2)
    ax.set_zlabel(_zlabel(metric, log))
    ax.view_init(elev=elev, azim=azim)
    ax.set_title(_title(result, f"2-D {metric} landscape", title))
    return fig


def plot_spectral_density(
    result: Any,
    *,
    ax: Any = None,
    log: bool = True,
    show_nodes: bool = True,
    title: str | None = None,
    label: str | None = None,
):
    """The Hessian eigenvalue density (stochastic Lanczos quadrature; Ghorbani et al. 2019).

    Args:
        result: an object with ``grid`` (eigenvalue axis) and ``density`` (same length), and
            optionally ``nodes`` and ``weights`` (the quadrature's Ritz values and weights, 1-D
            or one row per probe vector), e.g. ``analysis.spectral_density(...)``.
        ax: an axis to draw into (default: a new figure).
        log: logarithmic density axis (default; the spectrum spans many decades).
        show_nodes: draw the quadrature nodes (those with a positive weight) as a rug along the
            bottom.
        title: the title (default: "Hessian spectral density").
        label: legend label for the curve.

    Returns:
        The matplotlib Figure.
    """
    if not isinstance(result, dict):
        _require(result, ("grid", "density"), "a spectral density result (or a dict with "
                 "'grid' and 'density')", "plot_spectral_density")
    grid = np.asarray(_get(result, "grid"), dtype=np.float64).reshape(-1)
    dens = np.asarray(_get(result, "density"), dtype=np.float64).reshape(-1)
    if grid.shape != dens.shape or grid.size == 0:
        raise ValueError(f"grid {grid.shape} and density {dens.shape} must be equal, non-empty")
    fig, ax = figure_axes(ax)
    if log:
        floor = max(np.nanmax(dens), 1e-300) * 1e-12
        ax.semilogy(grid, np.maximum(dens, floor), label=label)
    else:
        ax.plot(grid, dens, label=label)
    nodes = _get(result, "nodes", None)
    if show_nodes and nodes is not None:
        nd = np.asarray(nodes, dtype=np.float64).reshape(-1)
        weights = _get(result, "weights", None)
        if weights is not None and np.size(weights) == nd.size:
            nd = nd[np.asarray(weights, dtype=np.float64).reshape(-1) > 0]  # drop padding
        nd = nd[np.isfinite(nd)]
        if nd.size:
            ax.plot(nd, np.zeros_like(nd), "|", color="tab:red", ms=8,
                    transform=ax.get_xaxis_transform(), label="quadrature nodes")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)" if log else "density")
    ax.set_title(title if title is not None else "Hessian spectral density")
    if label is not None or (show_nodes and nodes is not None):
        ax.legend()
    ax.grid(alpha=0.3)
    return fig


def _get(obj: Any, name: str, *default: Any) -> Any:
    if isinstance(obj, dict):
        if name in obj:
            return obj[name]
    elif hasattr(obj, name):
        value = getattr(obj, name)
        return value.detach().cpu().numpy() if hasattr(value, "detach") else value
    if default:
        return default[0]
    raise ValueError(f"the density result has no field {name!r}")


# --------------------------------------------------------------------------------------------
# plotly
# --------------------------------------------------------------------------------------------
def plotly_1d(
    results: Any | Sequence[Any],
    *,
    metric: str = "loss",
    log: bool = False,
    labels: Sequence[str] | None = None,
    title: str | None = None,
):
    """Interactive curves of one or several 1-D slices (hover: alpha and value).

    Returns a ``plotly.graph_objects.Figure``.
    """
    import plotly.graph_objects as go

    items = _slices_1d(results, "plotly_1d")
    if labels is not None and len(labels) != len(items):
        raise ValueError(f"got {len(labels)} labels for {len(items)} results")
    fig = go.Figure()
    for k, r in enumerate(items):
        a = np.asarray(r.alphas, dtype=np.float64)
        v = _values(r, metric)
        order = np.argsort(a, kind="stable")
        name = labels[k] if labels is not None else (getattr(r, "label", "") or r.direction.get("name", "d"))
        fig.add_trace(go.Scatter(
            x=a[order], y=v[order], mode="lines+markers", name=name,
            hovertemplate="alpha=%{x:.4g}<br>" + metric + "=%{y:.6g}<extra>%{fullData.name}</extra>",
        ))
    fig.update_layout(
        title=title if title is not None else f"1-D {metric} slice",
        xaxis_title="alpha", yaxis_title=metric, template="plotly_white",
    )
    if log:
        fig.update_yaxes(type="log")
    return fig


def _plotly_grid(result: Any, metric: str, log: bool, func: str = "plotly"):
    xs, ys, z = _check_2d(result, metric, func)
    zt = _transform(z, log).T  # plotly: rows follow y
    n1, n2 = _dir_names(result)
    hover = n1 + "=%{x:.4g}<br>" + n2 + "=%{y:.4g}<br>" + _zlabel(metric, log) + "=%{z:.6g}<extra></extra>"
    return xs, ys, zt, n1, n2, hover


def plotly_surface(
    result: Any,
    *,
    metric: str = "loss",
    log: bool = False,
    title: str | None = None,
    colorscale: str = "Viridis",
):
    """Interactive 3-D surface of a 2-D slice with hover values and a colorbar.

    Returns a ``plotly.graph_objects.Figure`` (shown inline in Jupyter; see :func:`save_html`).
    """
    import plotly.graph_objects as go

    xs, ys, zt, n1, n2, hover = _plotly_grid(result, metric, log, "plotly_surface")
    zl = _zlabel(metric, log)
    fig = go.Figure(go.Surface(
        x=xs, y=ys, z=zt, colorscale=colorscale, hovertemplate=hover,
        colorbar={"title": {"text": zl}},
        contours={"z": {"show": True, "usecolormap": True, "project": {"z": True}}},
    ))
    fig.update_layout(
        title=_title(result, f"2-D {metric} landscape", title),
        scene={"xaxis_title": n1, "yaxis_title": n2, "zaxis_title": zl},
        template="plotly_white",
    )
    return fig


def plotly_contour(
    result: Any,
    *,
    metric: str = "loss",
    log: bool = False,
    title: str | None = None,
    colorscale: str = "Viridis",
    ncontours: int = 25,
):
    """Interactive filled contour of a 2-D slice with labelled levels, hover values, colorbar.

    Returns a ``plotly.graph_objects.Figure``.
    """
    import plotly.graph_objects as go

    xs, ys, zt, n1, n2, hover = _plotly_grid(result, metric, log, "plotly_contour")
    fig = go.Figure(go.Contour(
        x=xs, y=ys, z=zt, colorscale=colorscale, hovertemplate=hover, ncontours=ncontours,
        contours={"showlabels": True, "labelfont": {"size": 9, "color": "white"}},
        colorbar={"title": {"text": _zlabel(metric, log)}},
    ))
    fig.add_trace(go.Scatter(x=[0.0], y=[0.0], mode="markers", name="w",
                             marker={"symbol": "star", "size": 12, "color": "white",
                                     "line": {"color": "black", "width": 1}},
                             hoverinfo="skip", showlegend=False))
    fig.update_layout(
        title=_title(result, f"2-D {metric} landscape", title),
        xaxis_title=n1, yaxis_title=n2, template="plotly_white",
    )
    return fig


def save_html(fig: Any, path: str | os.PathLike) -> Path:
    """Write a plotly figure to a self-contained HTML file (plotly.js embedded, works offline).

    Args:
        fig: a ``plotly.graph_objects.Figure``.
        path: the output file (parent folders are created; written atomically).

    Returns:
        The path written.
    """
    if not hasattr(fig, "write_html"):
        raise TypeError(f"expected a plotly Figure, got {type(fig).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {path!r}")
    from ._atomic import atomic_write

    p = Path(path)
    with atomic_write(p) as f:  # temp file + rename: an old file survives a failed write
        fig.write_html(f, include_plotlyjs=True, full_html=True)
    return p
