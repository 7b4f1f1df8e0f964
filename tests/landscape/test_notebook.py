"""examples/quickstart.ipynb runs top to bottom without errors (nbclient + ipykernel)."""

import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
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


@pytest.mark.slow  # about 6 s of CPU, but the kernel start makes it 10-17 s on a busy machine
def test_edge_of_stability_notebook_executes(tmp_path, monkeypatch):
    """examples/edge_of_stability.ipynb: two learning rates, lambda_max reaches about 2/lr."""
    import re

    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(ROOT / "examples" / "edge_of_stability.ipynb", as_version=4)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
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
