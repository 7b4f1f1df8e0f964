"""The self-contained HTML report, and the per-checkpoint analysis behind it.

:func:`analyze_checkpoint` measures one trained model: loss and accuracy, ``lambda_max`` (Lanczos),
worst-case adaptive m-sharpness (Andriushchenko et al. 2023), optionally the Hessian trace, 1-D
slices along a filter-normalized random direction and along the (filter-normalized) gradient, a
2-D slice on two orthogonal filter-normalized random directions (Li et al. 2018), and the Hessian
spectral density (stochastic Lanczos quadrature, Ghorbani et al. 2019). It returns a
:class:`ReportEntry`.

:func:`write_report` renders entries into ONE offline HTML page: a metrics table, the 1-D slices
of all checkpoints overlaid (one figure per direction kind), one 2-D contour per checkpoint and
the spectral densities overlaid, plus optional extra figures (the demo adds training curves).
plotly's JavaScript is embedded exactly once (in the first figure), so the page needs no
network; figures are 2-D SVG plots (contours, not WebGL surfaces), which render in any browser,
headless ones included.

The package: :mod:`landscape.report.compute` measures (every number of the report, no HTML) and
:mod:`landscape.report.render` draws (figures and the HTML page, no measurement); every name is
importable from ``landscape.report``.
"""

from __future__ import annotations

from .compute import (
    METRIC_NAMES,
    ReportEntry,
    analyze_checkpoint,
    checkpoint_keys,
    checkpoint_metrics,
    compute_slice,
    describe_checkpoint_keys,
    hessian_summary,
)
from .render import density_figure, report_html, write_report

__all__ = [
    "ReportEntry",
    "analyze_checkpoint",
    "write_report",
    "report_html",
    "checkpoint_metrics",
    "hessian_summary",
    "compute_slice",
    "density_figure",
    "checkpoint_keys",
    "describe_checkpoint_keys",
    "METRIC_NAMES",
]
