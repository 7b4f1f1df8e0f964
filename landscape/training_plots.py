"""Figures of curvature during training: ``lambda_max`` against the step, with the ``2 / lr`` line.

* :func:`plot_tracker` (matplotlib): one or several :class:`analysis.TrackerHistory`
  curves of ``lambda_max`` against the training step, each with its edge-of-stability line
  ``2 / lr`` (dashed; it follows a learning-rate schedule when the records' ``lr`` changes).
  Gradient descent with step ``lr`` on a quadratic diverges once ``lambda_max > 2 / lr``;
  full-batch training drives ``lambda_max`` up to about that value and hovers there ("edge of
  stability", Cohen et al. 2021).
* :func:`plotly_tracker`: the same as an interactive plotly figure (used by the demo's report).

Both accept a history, a list of records, or a ``{label: history}`` dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _series(history: Any, label: str | None) -> list[tuple[str, list[int], list[float], list[float | None]]]:
    if isinstance(history, Mapping):
        items = list(history.items())
    else:
        items = [(label or "lambda_max", history)]
    if not items:
        raise ValueError("nothing to plot: no history given")
    out = []
    for name, h in items:
        recs = list(getattr(h, "records", h))
        if not recs:
            raise ValueError(f"the history {name!r} has no records")
        for r in recs:
            if not hasattr(r, "step") or not hasattr(r, "lambda_max"):
                raise TypeError(f"expected TrackerRecord-like items, got {type(r).__name__}")
        out.append((str(name), [int(r.step) for r in recs], [float(r.lambda_max) for r in recs],
                    [getattr(r, "lr", None) for r in recs]))
    return out


def _eos(lrs: list[float | None], lr: float | None) -> list[float] | None:
    if lr is not None:
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        return [2.0 / float(lr)] * len(lrs)
    if all(v is not None and v > 0 for v in lrs):
        return [2.0 / float(v) for v in lrs]
    return None


def _y_limits(series, lr) -> tuple[float, float] | None:
    """Axis limits that keep the lambda_max curves readable when 2/lr shoots up (an lr schedule
    decaying to 0): at most 5x the largest lambda_max; None when no limit is needed."""
    lam = [v for _, _, ls, _ in series for v in ls if v == v]
    eos = [v for _, _, _, lrs in series for v in (_eos(lrs, lr) or [])]
    if not lam or not eos or max(eos) <= 5 * max(lam):
        return None
    low = min(min(lam), min(eos))
    return (low if low > 0 else min(lam)), 5 * max(lam)


def plot_tracker(history: Any, *, lr: float | None = None, label: str | None = None,
                 ax: Any = None, title: str | None = None, log: bool = False):
    """``lambda_max`` against the step with the ``2 / lr`` line (matplotlib).

    Args:
        history: a :class:`~analysis.TrackerHistory` (or list of records), or a dict
            ``{label: history}`` for several runs on one axis.
        lr: a constant learning rate for the ``2 / lr`` line (default: each record's ``lr``;
            no line when the records have none).
        label: legend label of a single history.
        ax: draw into this axis (default: a new figure).
        title: the title (default ``"lambda_max during training"``).
        log: logarithmic y axis.

    Returns:
        The matplotlib ``Figure``.
    """
    from .plots import figure_axes

    series = _series(history, label)
    fig, ax = figure_axes(ax, figsize=(6.0, 4.0))  # returned once, not kept open by pyplot
    for name, steps, lam, lrs in series:
        line, = ax.plot(steps, lam, marker="o", ms=3, label=name)
        eos = _eos(lrs, lr)
        if eos is not None:
            ax.plot(steps, eos, ls="--", color=line.get_color(), alpha=0.8,
                    label=f"2/lr ({name})" if len(series) > 1 else "2/lr")
    ax.set_xlabel("training step")
    ax.set_ylabel("lambda_max of the Hessian")
    if log:
        ax.set_yscale("log")
    limits = _y_limits(series, lr)
    if limits is not None:
        ax.set_ylim(limits[0] * (0.8 if log else 0.0), limits[1])
    ax.set_title(title or "lambda_max during training")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def plotly_tracker(history: Any, *, lr: float | None = None, label: str | None = None,
                   title: str | None = None, log: bool = False):
    """The interactive (plotly) version of :func:`plot_tracker`; returns a plotly ``Figure``."""
    import plotly.graph_objects as go

    series = _series(history, label)
    fig = go.Figure()
    palette = ["#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#19d3f3", "#ff6692"]
    for i, (name, steps, lam, lrs) in enumerate(series):
        color = palette[i % len(palette)]
        fig.add_trace(go.Scatter(x=steps, y=lam, mode="lines+markers", name=name,
                                 line={"color": color}))
        eos = _eos(lrs, lr)
        if eos is not None:
            fig.add_trace(go.Scatter(x=steps, y=eos, mode="lines", name=f"2/lr ({name})",
                                     line={"color": color, "dash": "dash"}, opacity=0.6))
    fig.update_layout(title=title or "lambda_max during training (dashed: 2/lr)",
                      xaxis_title="training step", yaxis_title="lambda_max",
                      yaxis_type="log" if log else "linear", template="plotly_white")
    limits = _y_limits(series, lr)
    if limits is not None:
        import math

        fig.update_yaxes(range=[math.log10(0.8 * limits[0]), math.log10(limits[1])] if log
                         else [0.0, limits[1]])
    return fig
