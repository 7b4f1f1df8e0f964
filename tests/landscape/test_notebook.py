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
