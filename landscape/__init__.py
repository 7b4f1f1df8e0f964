"""landscape: what people touch.

1-D and 2-D loss slices with a resumable store, matplotlib and plotly figures, safe checkpoint
loading, the self-contained HTML report, the bundled digits demo, the paper's experiments
(:mod:`landscape.reproduce`) and the ``landscape`` command line. May import :mod:`analysis` and
:mod:`msam`.

What users call is importable from ``landscape``; the rest has one home each:
:mod:`landscape.models` (reference architectures and synthetic data), :mod:`landscape.datasets`
(the bundled digits), :mod:`landscape.demo` (the demo run), :mod:`landscape.store` (the on-disk
grid), :mod:`landscape.checkpoints` (formats, unsafe-file errors), :mod:`landscape.report` (the
numbers behind the report), :mod:`landscape.reproduce` (the paper's experiments),
:mod:`landscape.integrations` (Lightning, Hugging Face) and :mod:`landscape.cli`.
"""

from .checkpoints.finding import find_checkpoints
from .checkpoints.loading import load_checkpoint
from .checkpoints.result import Checkpoint, CheckpointError
from .layer_plots import plot_layer_spectrum
from .plots import (
    plot_1d,
    plot_contour,
    plot_contourf,
    plot_spectral_density,
    plot_surface,
    plotly_1d,
    plotly_contour,
    plotly_surface,
    save_html,
)
from .report.compute import ReportEntry, analyze_checkpoint
from .report.render import report_html, write_report
from .slices import Slice1D, Slice2D, interpolate, slice_1d, slice_2d
from .training import train_step
from .training_plots import plot_tracker, plotly_tracker

__all__ = [
    # slices
    "slice_1d", "slice_2d", "interpolate", "Slice1D", "Slice2D",
    # figures
    "plot_1d", "plot_contour", "plot_contourf", "plot_surface", "plot_spectral_density",
    "plot_layer_spectrum", "plot_tracker", "plotly_1d", "plotly_surface", "plotly_contour",
    "plotly_tracker", "save_html",
    # checkpoints and reports
    "load_checkpoint", "find_checkpoints", "Checkpoint", "CheckpointError", "write_report",
    "report_html", "analyze_checkpoint", "ReportEntry",
    # one training step for every optimizer (SAM through SAM.step)
    "train_step",
]
