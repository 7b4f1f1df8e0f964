"""Figure of per-layer Hessian spectra (:func:`analysis.per_layer_spectrum`).

Example:
    >>> from analysis import per_layer_spectrum              # doctest: +SKIP
    >>> from landscape import plot_layer_spectrum       # doctest: +SKIP
    >>> fig = plot_layer_spectrum(per_layer_spectrum(model, "cross_entropy", (x, y), k=3))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import numpy as np


def plot_layer_spectrum(result: Any, *, ax: Any = None, log: bool = True,
                        title: str | None = None, path: Any = None) -> Any:
    """Bars of the largest block eigenvalue and of the block trace per layer.

    Args:
        result: a :class:`~analysis.PerLayerSpectrum`.
        ax: a matplotlib axis to draw into (default: a new figure).
        log: symmetric-log value axis (block spectra span orders of magnitude).
        title: the title (default "Per-layer Hessian spectrum").
        path: save the figure there as well.

    Returns:
        The matplotlib Figure.

    Raises:
        TypeError: when ``result`` has no ``layers``.
    """
    layers = getattr(result, "layers", None)
    if layers is None:
        raise TypeError(f"expected a PerLayerSpectrum, got {type(result).__name__}")
    from .plots import figure_axes

    fig, ax = figure_axes(ax, figsize=(max(6.0, 0.5 * len(layers) + 2), 4.0))  # not kept open by pyplot
    x = np.arange(len(layers))
    top = [layer.eigenvalues[0] for layer in layers]
    has_trace = all(layer.trace is not None for layer in layers)
    width = 0.4 if has_trace else 0.8
    ax.bar(x - (width / 2 if has_trace else 0), top, width, label="top eigenvalue")
    if has_trace:
        ax.bar(x + width / 2, [layer.trace for layer in layers], width, label="trace",
               yerr=[layer.trace_std_error or 0.0 for layer in layers])
    ax.set_xticks(x)
    ax.set_xticklabels([layer.name or "(root)" for layer in layers], rotation=45, ha="right")
    if log:
        ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("curvature of the block")
    ax.set_title(title or "Per-layer Hessian spectrum")
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig
