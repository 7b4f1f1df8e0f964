"""landscape: what people touch.

1-D and 2-D loss slices with a resumable store, matplotlib and plotly figures, safe checkpoint
loading, the self-contained HTML report, the bundled digits demo, the paper's experiments
(:mod:`landscape.reproduce`) and the ``landscape`` command line. May import :mod:`analysis` and
:mod:`msam`.
"""

from .checkpoints import (
    Checkpoint,
    CheckpointError,
    PerturbedCheckpointWarning,
    UnsafeCheckpointError,
    checkpoint_format,
    find_checkpoints,
    load_checkpoint,
)
from .datasets import Digits, load_digits
from .demo import DemoConfig, DemoResult, run_demo
from .layer_plots import plot_layer_spectrum
from .models import digits_cnn, digits_mlp, gpt, hf_gpt2, resnet, vit
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
from .report import ReportEntry, analyze_checkpoint, report_html, write_report
from .slices import Slice1D, Slice2D, interpolate, slice_1d, slice_2d
from .store import GridStore, StoreCorruptError, StoreMismatchError
from .training import train_step
from .training_plots import plot_tracker, plotly_tracker

__all__ = [
    # slices
    "slice_1d", "slice_2d", "interpolate", "Slice1D", "Slice2D", "GridStore", "StoreMismatchError",
    # figures
    "plot_1d", "plot_contour", "plot_contourf", "plot_surface", "plot_spectral_density",
    "plotly_1d", "plotly_surface", "plotly_contour", "save_html", "plot_layer_spectrum",
    # checkpoints and reports
    "load_checkpoint", "find_checkpoints", "Checkpoint", "CheckpointError",
    "UnsafeCheckpointError", "PerturbedCheckpointWarning", "write_report", "report_html",
    "analyze_checkpoint", "ReportEntry", "checkpoint_format",
    # data, models and the demo
    "Digits", "load_digits", "digits_cnn", "digits_mlp", "DemoConfig", "DemoResult", "run_demo",
    # reference models for CIFAR-shaped images and language (more in landscape.models)
    "resnet", "vit", "gpt", "hf_gpt2",
    # damaged store files
    "StoreCorruptError",
    # curvature during training
    "plot_tracker", "plotly_tracker",
    # one training step for every optimizer (SAM through SAM.step)
    "train_step",
]
