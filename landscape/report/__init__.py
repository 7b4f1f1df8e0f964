"""The self-contained HTML report, and the per-checkpoint analysis behind it.

Two modules; :func:`analyze_checkpoint`, :class:`ReportEntry`, :func:`report_html` and
:func:`write_report` are imported from :mod:`landscape`, the rest from ``landscape.report``:

* :mod:`landscape.report.compute` measures, no HTML: :func:`analyze_checkpoint` (loss, accuracy,
  ``lambda_max``, adaptive worst-case m-sharpness, optionally the trace, 1-D and 2-D slices and
  the spectral density of one model, as a :class:`ReportEntry`), and the CLI's
  :func:`checkpoint_metrics`, :func:`hessian_summary`, :func:`compute_slice`,
  :func:`checkpoint_keys`, :func:`describe_checkpoint_keys`, :data:`METRIC_NAMES`;
* :mod:`landscape.report.render` draws, no measurement: :func:`report_html` and
  :func:`write_report` (ONE offline page, plotly's JavaScript embedded once) and
  :func:`density_figure`.
"""

from __future__ import annotations

from .compute import (
    METRIC_NAMES,
    checkpoint_keys,
    checkpoint_metrics,
    compute_slice,
    describe_checkpoint_keys,
    hessian_summary,
)
from .render import density_figure

__all__ = [
    # the numbers of one checkpoint, as the CLI prints them
    "checkpoint_metrics", "hessian_summary", "compute_slice", "checkpoint_keys",
    "describe_checkpoint_keys", "METRIC_NAMES",
    # figures
    "density_figure",
]
