"""Figures render headless (Agg) with titles, labels and colorbars; plotly HTML is self-contained."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from landscape import (  # noqa: E402
    Slice1D,
    Slice2D,
    plots,  # noqa: E402
)


def _slice2d(nan=False, label="demo"):
    xs, ys = np.linspace(-1, 1, 7), np.linspace(-2, 2, 5)
    X, Y = np.meshgrid(xs, ys, indexing="ij")
    loss = 1.0 + X**2 + 0.5 * Y**2 + 0.1 * X * Y
    if nan:
        loss[0, 0] = np.nan
    return Slice2D(
        xs=xs, ys=ys, loss=loss, accuracy=1.0 / loss, loss_at_origin=1.0, accuracy_at_origin=1.0,
        directions=({"name": "random A"}, {"name": "random B"}), cosine=0.0, num_samples=10,
        mode="eval", recalibrate_bn=False, nonfinite=int(nan), seconds=0.1, label=label,
    )


def _slice1d(shift=0.0, label=""):
    a = np.linspace(-1, 1, 9)
    return Slice1D(
        alphas=a, loss=(a - shift) ** 2 + 0.1, accuracy=None, loss_at_origin=0.1 + shift**2,
        accuracy_at_origin=None, direction={"name": "gradient"}, num_samples=5, mode="eval",
        recalibrate_bn=False, nonfinite=0, seconds=0.0, label=label,
    )


def _check_saved(fig, tmp_path, name):
    path = tmp_path / f"{name}.png"
    fig.savefig(path)
    assert path.stat().st_size > 1000
    plt.close(fig)


@pytest.mark.parametrize("kind,nan", [("contour", False), ("contour", True), ("filled", True),
                                      ("surface", False)])
def test_2d_matplotlib_figures(tmp_path, kind, nan):
    s = _slice2d(nan=nan)
    fig = s.plot(kind)
    main = fig.axes[0]
    assert main.get_xlabel() == "random A" and main.get_ylabel() == "random B"
    assert "demo" in main.get_title() and "loss" in main.get_title()
    assert len(fig.axes) == 2  # the colorbar
    assert fig.axes[1].get_ylabel() == "loss"
    _check_saved(fig, tmp_path, f"{kind}-{nan}")


def test_contour_levels_match_values_and_log_option(tmp_path):
    s = _slice2d()
    fig = plots.plot_contour(s, levels=[1.5, 2.0, 3.0], path=np.array([[0.0, 0.0], [0.5, 1.0]]))
    levels = [c for c in fig.axes[0].get_children() if hasattr(c, "levels")][0].levels
    np.testing.assert_allclose(levels, [1.5, 2.0, 3.0])
    assert len(fig.axes[0].texts) > 0  # level labels
    _check_saved(fig, tmp_path, "levels")
    fig = plots.plot_contourf(s, log=True, metric="accuracy")
    assert fig.axes[1].get_ylabel() == "log10 accuracy"
    _check_saved(fig, tmp_path, "log")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_contour(s, path=np.zeros((3, 3)))


def test_1d_several_curves_and_log(tmp_path):
    a, b = _slice1d(0.0, "SGD"), _slice1d(0.3, "MSAM")
    fig = plots.plot_1d([a, b], log=True)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "alpha along gradient"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SGD", "MSAM"]
    line = ax.get_lines()[1]
    np.testing.assert_allclose(line.get_ydata(), b.loss)
    _check_saved(fig, tmp_path, "1d")
    fig, ax = plt.subplots()
    assert a.plot(ax=ax) is fig
    plt.close(fig)
    with pytest.raises(ValueError, match="accuracy"):
        plots.plot_1d(a, metric="accuracy")
    with pytest.raises(ValueError, match="labels"):
        plots.plot_1d([a, b], labels=["x"])


def _plotly_json_from_html(text):
    """The figure data passed to Plotly.newPlot in a write_html file."""

    class Scripts(HTMLParser):
        def __init__(self):
            super().__init__()
            self.scripts, self._in = [], False

        def handle_starttag(self, tag, attrs):
            if tag == "script":
                self._in = True
                self.scripts.append([dict(attrs), ""])

        def handle_endtag(self, tag):
            if tag == "script":
                self._in = False

        def handle_data(self, data):
            if self._in:
                self.scripts[-1][1] += data

    p = Scripts()
    p.feed(text)
    return p.scripts


def _decode(value):
    """Plotly >= 6 writes numpy arrays as base64 typed arrays; older versions as lists."""
    if isinstance(value, dict) and "bdata" in value:
        arr = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = [int(v) for v in str(value.get("shape", arr.size)).split(",")]
        return arr.reshape(shape).astype(float)
    return np.array([[np.nan if v is None else v for v in row] for row in value], dtype=float)


@pytest.mark.parametrize("kind", ["surface", "contour"])
def test_plotly_html_is_self_contained_and_parseable(tmp_path, kind):
    s = _slice2d(nan=True)
    fig = s.plot_interactive(kind)
    path = plots.save_html(fig, tmp_path / "out" / f"{kind}.html")
    text = path.read_text(encoding="utf-8")
    scripts = _plotly_json_from_html(text)
    assert not any("src" in attrs for attrs, _ in scripts), "plotly.js must be embedded"
    assert len(text) > 1_000_000  # the library itself is inside
    call = [body for _, body in scripts if "Plotly.newPlot" in body]
    assert call
    data = json.loads(re.search(r"Plotly\.newPlot\(\s*\"[^\"]+\",\s*(\[.*?\]),\s*\{", call[0], re.S).group(1))
    trace = data[0]
    assert trace["type"] == kind
    assert "random A" in trace["hovertemplate"] and "random B" in trace["hovertemplate"]
    z = _decode(trace["z"])
    assert z.shape == (len(s.ys), len(s.xs))  # plotly rows follow y
    np.testing.assert_allclose(z[1:, 1:], s.loss.T[1:, 1:])
    layout = fig.to_dict()["layout"]
    assert "demo" in layout["title"]["text"]
    assert hasattr(fig, "_repr_html_") or hasattr(fig, "_ipython_display_")


def test_plotly_1d_and_errors(tmp_path):
    fig = plots.plotly_1d([_slice1d(0.0, "a"), _slice1d(0.2, "b")], log=True)
    assert [t.name for t in fig.data] == ["a", "b"]
    assert fig.layout.yaxis.type == "log"
    with pytest.raises(TypeError):
        plots.save_html(object(), tmp_path / "x.html")
    with pytest.raises(ValueError, match="kind"):
        _slice2d().plot_interactive("wireframe")
    with pytest.raises(ValueError, match="kind"):
        _slice2d().plot("heatmap")
    s = _slice2d()
    all_nan = Slice2D(**{**s.__dict__, "loss": np.full_like(s.loss, np.nan)})
    with pytest.raises(ValueError, match="NaN"):
        plots.plot_contour(all_nan)


@dataclass
class _Density:
    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray


def test_spectral_density(tmp_path):
    grid = np.linspace(-1, 10, 200)
    dens = np.exp(-0.5 * (grid - 0.2) ** 2 / 0.01) + 1e-3 * np.exp(-0.5 * (grid - 8) ** 2)
    r = _Density(grid, dens, np.array([[0.1, 0.3, 8.0], [0.2, 0.25, 7.9]]), np.ones((2, 3)) / 3)
    fig = plots.plot_spectral_density(r)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "eigenvalue" and ax.get_title()
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), grid)
    _check_saved(fig, tmp_path, "density")
    fig = plots.plot_spectral_density({"grid": grid, "density": dens}, log=False, label="SGD")
    assert fig.axes[0].get_yscale() == "linear"
    plt.close(fig)
    with pytest.raises(ValueError, match="density"):
        plots.plot_spectral_density({"grid": grid, "density": dens[:-1]})
    with pytest.raises(ValueError, match="grid"):
        plots.plot_spectral_density({"density": dens})


def test_spectral_density_of_the_hessian_engine(tmp_path):
    density = pytest.importorskip("analysis.density")
    from tests.models import random_spd

    res = density.spectral_density(random_spd(12, seed=0), num_iter=6, num_runs=2)
    fig = plots.plot_spectral_density(res)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.get_lines()[0].get_xdata(), res.grid)
    rug = ax.get_lines()[1].get_xdata()
    assert len(rug) == int((np.asarray(res.weights) > 0).sum())
    _check_saved(fig, tmp_path, "slq")


# ---------------------------------------------------------------------------------------------
# wrong argument types (issue 15.14) and atomic writing (15.8)


@pytest.mark.parametrize("func", ["plot_1d", "plotly_1d", "plot_contour", "plot_contourf",
                                  "plot_surface", "plotly_contour", "plotly_surface",
                                  "plot_spectral_density"])
@pytest.mark.parametrize("value", [None, "loss.npz", 3.5])
def test_wrong_argument_type_is_a_type_error_naming_it(func, value):
    import landscape.plots as P

    with pytest.raises(TypeError, match=func) as info:
        getattr(P, func)(value)
    assert repr(value) in str(info.value) and "\n" not in str(info.value)
    plt.close("all")


def test_a_list_with_one_bad_item_is_a_type_error():
    from landscape import plot_1d

    with pytest.raises(TypeError, match="Slice1D"):
        plot_1d([_slice1d(), _slice2d()])
    plt.close("all")


def test_contourf_kind_is_accepted():
    fig = _slice2d().plot("contourf")
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "random A"
    plt.close(fig)


def test_save_html_is_atomic(tmp_path, monkeypatch):
    from landscape import plotly_contour, save_html

    path = tmp_path / "fig.html"
    save_html(plotly_contour(_slice2d()), path)
    before = path.read_bytes()
    assert b"plotly" in before
    fig = plotly_contour(_slice2d())

    def full_disk(self, file, *a, **k):
        file.write("<html>half a page")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(fig), "write_html", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_html(fig, path)
    assert path.read_bytes() == before  # the old figure survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.html"]  # no temporary left
    with pytest.raises(TypeError, match="path"):
        save_html(plotly_contour(_slice2d()), None)
