"""examples/quickstart.ipynb runs top to bottom without errors (nbclient + ipykernel)."""

import os
import pathlib
import types

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


def _execute(path, tmp_path, monkeypatch, *, timeout, extra_cells=()):
    """Run a notebook top to bottom in a fresh kernel (cells appended in memory, not saved)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(path, as_version=4)
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in extra_cells)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    return nb


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nb = _execute(NOTEBOOK, tmp_path, monkeypatch, timeout=600, extra_cells=_EXTRA_CELLS)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "SGD   test accuracy" in text and "MSAM  test accuracy" in text
    assert "top-3 Hessian eigenvalues" in text
    # rich displays: Result objects as HTML tables, the plotly surface, the matplotlib figure
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<table><caption>SharpnessResult</caption>" in h for h in html)
    assert any("<table><caption>EigenResult</caption>" in h for h in html)
    assert any("application/vnd.plotly.v1+json" in o.get("data", {}) for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    _check_figures_shown_once(nb)


@pytest.mark.slow  # about 6 s of CPU, but the kernel start makes it 10-17 s on a busy machine
def test_edge_of_stability_notebook_executes(tmp_path, monkeypatch):
    """examples/edge_of_stability.ipynb: two learning rates, lambda_max reaches about 2/lr."""
    import re

    nb = _execute(ROOT / "examples" / "edge_of_stability.ipynb", tmp_path, monkeypatch, timeout=120)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "\n".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    found = re.findall(r"lr=([\d.]+): 2/lr = ([\d.]+), max lambda_max = ([\d.]+)", text)
    assert [lr for lr, _, _ in found] == ["0.2", "0.5"]
    for lr, eos, lam in found:
        # edge of stability: the top eigenvalue climbs to about 2/lr (and not far beyond)
        assert 0.8 * float(eos) <= float(lam) <= 4 * float(eos), (lr, eos, lam)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    html = [o["data"]["text/html"] for o in outputs if "text/html" in o.get("data", {})]
    assert any("<caption>TrackerRecord</caption>" in h for h in html)
    _check_images_shown_once(nb)


# figures the library returns, a progress bar, then what pyplot still holds open
_EXTRA_CELLS = [
    'surface.plot("contour")',
    'surface.plot("surface")',
    "from landscape.plots import plot_1d\n"
    "plot_1d(slice_1d(msam_model, 'cross_entropy', probe, d1, radii, progress=True))",
    "import matplotlib.pyplot as plt\nprint('open figures', plt.get_fignums())",
]


def _check_images_shown_once(nb):
    """Every cell that draws shows exactly one image (no pyplot double display)."""
    for cell in (c for c in nb.cells if c.cell_type == "code"):
        images = [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
        draws = any(s in cell.source for s in (".plot(", "plot_1d(", "plot_tracker(", "plt.show()"))
        assert len(images) == (1 if draws else 0), (cell.source[:80], cell.get("outputs"))


def _check_figures_shown_once(nb):
    """Every cell that draws shows exactly one image (no pyplot double display), progress
    bars are widgets with ipywidgets (text without it, and no warning), no figure stays open."""
    _check_images_shown_once(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    *figures, last = code[-len(_EXTRA_CELLS):]
    stderr = "".join(o.get("text", "") for c in code for o in c.get("outputs", [])
                     if o.get("name") == "stderr")
    assert "IProgress" not in stderr and "TqdmWarning" not in stderr, stderr
    try:
        import ipywidgets  # noqa: F401
    except ImportError:
        pass
    else:  # tqdm.auto: a notebook widget, not stderr text
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {})
                   for o in figures[-1].get("outputs", []))
    assert [o.get("text") for o in last.outputs] == ["open figures []\n"]


def test_plot_functions_leave_no_open_figures():
    """The returned figures are not registered with pyplot (no double display, no pile-up),
    and they still save."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from landscape import plots

    plt.close("all")
    s1 = types.SimpleNamespace(alphas=np.linspace(-1, 1, 5), loss=np.linspace(1, 2, 5) ** 2,
                               accuracy=None, label="a", direction={"name": "d"},
                               loss_at_origin=1.0)
    grid = np.linspace(-1, 1, 4)
    s2 = types.SimpleNamespace(xs=grid, ys=grid, loss=np.add.outer(grid**2, grid**2) + 1.0,
                               accuracy=None, label="b", directions=({"name": "x"}, {"name": "y"}))
    figs = [plots.plot_1d(s1), plots.plot_contour(s2), plots.plot_contourf(s2), plots.plot_surface(s2)]
    assert plt.get_fignums() == []
    for fig in figs:
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        assert buf.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
