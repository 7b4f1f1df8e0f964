"""plot_tracker / plotly_tracker: lambda_max against the step and the 2/lr line."""

import matplotlib
import pytest

from analysis import TrackerHistory, TrackerRecord
from landscape import plot_tracker, plotly_tracker

matplotlib.use("Agg")


def _hist(lrs, lam):
    return TrackerHistory(tuple(
        TrackerRecord(step=10 * (i + 1), lambda_max=v, eigenvalues=(v,), lanczos_hvps=3, hvps=3,
                      converged=True, warm=i > 0, lr=lr) for i, (lr, v) in enumerate(zip(lrs, lam))))


def test_plot_tracker_draws_lambda_and_two_over_lr():
    h = _hist([0.1, 0.05, 0.02], [3.0, 5.0, 9.0])
    fig = plot_tracker(h, label="run")
    lines = fig.axes[0].get_lines()
    assert list(lines[0].get_xdata()) == [10, 20, 30] and list(lines[0].get_ydata()) == [3.0, 5.0, 9.0]
    assert list(lines[1].get_ydata()) == pytest.approx([20.0, 40.0, 100.0])  # 2 / lr per record
    fig2 = plot_tracker({"a": h, "b": h}, lr=0.5)
    assert len(fig2.axes[0].get_lines()) == 4
    assert list(fig2.axes[0].get_lines()[1].get_ydata()) == [4.0, 4.0, 4.0]
    matplotlib.pyplot.close("all")


def test_plotly_tracker_and_errors():
    h = _hist([0.1, 0.1], [1.0, 2.0])
    fig = plotly_tracker({"SGD": h})
    assert [t.name for t in fig.data] == ["SGD", "2/lr (SGD)"]
    assert list(fig.data[1].y) == pytest.approx([20.0, 20.0])
    no_lr = TrackerHistory((TrackerRecord(step=1, lambda_max=1.0, eigenvalues=(1.0,),
                                          lanczos_hvps=1, hvps=1, converged=True, warm=False),))
    assert len(plotly_tracker(no_lr).data) == 1  # no learning rate recorded: no line
    with pytest.raises(ValueError, match="no records"):
        plot_tracker(TrackerHistory())
    with pytest.raises(ValueError, match="lr must be a positive number"):
        plot_tracker(h, lr=-1.0)
    with pytest.raises(TypeError, match="TrackerRecord-like"):
        plot_tracker([1, 2])


def test_decaying_lr_keeps_the_curves_readable():
    """A schedule decaying to ~0 sends 2/lr to ~1e6: the y axis stops at 5x max lambda_max."""
    h = _hist([0.1, 0.01, 1e-6], [3.0, 4.0, 2.0])
    fig = plot_tracker(h, log=True)
    assert fig.axes[0].get_ylim()[1] == pytest.approx(20.0)
    pfig = plotly_tracker(h, log=True)
    assert 10 ** pfig.layout.yaxis.range[1] == pytest.approx(20.0)
    assert plotly_tracker(_hist([0.1, 0.1], [3.0, 4.0])).layout.yaxis.range is None
    matplotlib.pyplot.close("all")


def test_tracker_and_layer_figures_are_not_kept_open_by_pyplot():
    """Returned once in Jupyter: pyplot holds no reference (no double display, no pile-up)."""
    import matplotlib.pyplot as plt
    import torch

    from analysis import per_layer_spectrum
    from landscape import plot_layer_spectrum

    plt.close("all")
    fig = plot_tracker(_hist([0.5, 0.5], [1.0, 2.0]))
    assert plt.get_fignums() == [] and fig.axes
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    fig = plot_layer_spectrum(per_layer_spectrum(model, "cross_entropy", data, k=1))
    assert plt.get_fignums() == [] and fig.axes
