"""The HTML report: self-contained, one plotly.js, every figure present, the metrics table right."""

import json
import re

import numpy as np
import pytest
import torch

from analysis import evaluate
from analysis.reference import dense_hessian
from landscape import ReportEntry, analyze_checkpoint, report_html, write_report
from tests.models import classification_data, mlp

PLOTLY_DIV = re.compile(r'<div id="(figure-\d+)" class="plotly-graph-div"')


def build_entries(n: int = 2) -> list[ReportEntry]:
    """Two tiny models analysed with small grids (shared by the browser test)."""
    data = classification_data(n=40, seed=0)
    entries = []
    for i in range(n):
        model = mlp(seed=i)
        entries.append(analyze_checkpoint(model, "cross_entropy", data, name=f"model-{i}",
                                          steps_1d=7, steps_2d=5, radius=0.5, seed=0,
                                          sharpness_options={"steps": 3, "m": 20}))
    return entries


@pytest.fixture(scope="module")
def entries():
    return build_entries()


def test_entry_numbers_match_references(entries):
    data = classification_data(n=40, seed=0)
    model = mlp(seed=0)
    e = entries[0]
    ev = evaluate(model, "cross_entropy", data)
    assert e.metrics["loss"] == pytest.approx(ev.loss, rel=1e-10)
    assert e.metrics["accuracy"] == pytest.approx(ev.accuracy)
    H = dense_hessian(model, "cross_entropy", data)
    lam = torch.linalg.eigvalsh(H).max().item()
    assert e.metrics["lambda_max"] == pytest.approx(lam, rel=1e-3)
    assert e.metrics["sharpness"] >= 0
    # the 1-D slices pass through L(w) at alpha = 0
    for s in e.slices_1d:
        i0 = int(np.argmin(np.abs(s.alphas)))
        assert s.alphas[i0] == 0 and s.loss[i0] == pytest.approx(ev.loss, rel=1e-10)
    assert {s.label for s in e.slices_1d} == {"random", "gradient"}
    assert e.slice_2d.loss.shape == (5, 5)
    json.dumps(e.to_dict())
    json.dumps(e.summary())
    assert "ReportEntry(name='model-0'" in repr(e)


def test_report_is_self_contained(entries, tmp_path):
    path = write_report(entries, tmp_path / "sub" / "r.html", title="T <&>", intro="hello")
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    assert not (tmp_path / "sub" / "r.html.tmp").exists()
    # plotly.js embedded exactly once, nothing fetched from the network
    assert text.count("plotly.js v") >= 1
    assert len(re.findall(r"<script[^>]*>\s*/\*\*\s*\n?\s*\* plotly\.js", text)) <= 1
    assert not re.search(r"<script[^>]+src=", text), "external script"
    assert not re.search(r"<link[^>]+href=[\"']https?:", text), "external stylesheet"
    assert "cdn.plot.ly" not in text.split("</head>")[0]
    assert "T &lt;&amp;&gt;" in text  # escaped title
    # figures: 1-D random, 1-D gradient, one 2-D per entry, the density if computed
    ids = PLOTLY_DIV.findall(text)
    expected = 2 + len(entries) + (1 if entries[0].density is not None else 0)
    assert len(ids) == expected and len(set(ids)) == expected
    # the metrics table holds each entry's numbers
    table = text[text.index("<table class='metrics'"):text.index("</table>")]
    for e in entries:
        assert e.name in table
        assert f"{e.metrics['lambda_max']:.4g}" in table


def test_plotlyjs_embedded_once(entries):
    import plotly.offline

    js = plotly.offline.get_plotlyjs()
    text = report_html(entries)
    marker = js[200:400]
    assert text.count(marker) == 1


def test_columns_and_extra_figures(entries):
    import plotly.graph_objects as go

    fig = go.Figure(go.Scatter(x=[1, 2], y=[3, 4]))
    text = report_html(entries, columns=["lambda_max", "missing"], extra_figures=[("curve", fig)],
                       notes=["a note"])
    head = text[text.index("<thead>"):text.index("</thead>")]
    assert "&lambda;<sub>max</sub>" in head and "missing" in head and "sharpness" not in head
    assert "&ndash;" in text  # the missing column shows a dash
    assert "a note" in text and "Training" in text
    assert len(PLOTLY_DIV.findall(text)) == len(PLOTLY_DIV.findall(report_html(entries))) + 1


def test_report_needs_entries(tmp_path):
    with pytest.raises(ValueError, match="at least one entry"):
        write_report([], tmp_path / "r.html")


def test_entry_without_slices():
    e = ReportEntry(name="bare", metrics={"loss": 1.0, "lambda_max": float("nan")})
    text = report_html([e])
    assert "bare" in text and "nan" in text
    assert PLOTLY_DIV.findall(text) == []


def test_sharpness_settings_recorded_and_shown(entries):
    from analysis import sharpness

    e = entries[0]
    st = e.settings["sharpness"]
    assert st["rho"] == 0.1 and st["m"] == 20 and st["steps"] == 3 and st["adaptive"] is True
    assert st["num_batches"] == 2  # 40 samples in batches of m = 20
    ref = sharpness(mlp(seed=0), "cross_entropy", classification_data(n=40, seed=0), rho=st["rho"],
                    kind="worst", adaptive=True, m=st["m"], steps=st["steps"], seed=0)
    assert e.metrics["sharpness"] == pytest.approx(ref.value, rel=1e-9)
    assert e.summary()["settings"]["sharpness"]["rho"] == 0.1
    assert json.loads(json.dumps(e.to_dict()))["settings"] == e.summary()["settings"]
    text = report_html(entries)
    notes = re.findall(r"<p class='note'>([^<]*)</p>", text)
    # one note for both entries (same settings), naming rho and m next to the table
    assert notes.count("adaptive worst-case sharpness: rho=0.1, m=20, 3 ascent steps, adaptive, c = |w|") == 1
    bare = ReportEntry(name="bare", metrics={"loss": 1.0})
    assert "rho=" not in report_html([bare])


# ---------------------------------------------------------------------------------------------
# wrong arguments (issue 15.14), atomic writing (15.8), checkpoint keys (15.5)


@pytest.mark.parametrize("bad", [["x"], "report.html", None, [None]])
def test_write_report_wrong_types_are_type_errors(bad, tmp_path):
    with pytest.raises(TypeError, match="ReportEntry") as info:
        write_report(bad, tmp_path / "r.html")
    assert repr(bad if not isinstance(bad, list) else bad[0]) in str(info.value)
    assert not (tmp_path / "r.html").exists()
    e = ReportEntry(name="bare", metrics={"loss": 1.0})
    with pytest.raises(TypeError, match="list"):
        write_report(e, tmp_path / "r.html")
    with pytest.raises(TypeError, match="path"):
        write_report([e], 42)


@pytest.mark.parametrize("kw,match", [
    ({"radius": 0.0}, "radius=0.0"), ({"radius": -1.0}, "radius=-1.0"),
    ({"radius": float("nan")}, "radius=nan"), ({"steps_1d": 1}, "steps_1d=1"),
    ({"steps_2d": 1}, "steps_2d=1"), ({"sharpness_rho": 0}, "sharpness_rho=0"),
])
def test_analyze_checkpoint_refuses_bad_values_before_work(kw, match, monkeypatch):
    import analysis.evaluation

    def boom(*a, **k):
        raise AssertionError("computed before checking the arguments")

    monkeypatch.setattr(analysis.evaluation, "evaluate", boom)
    with pytest.raises(ValueError, match=match):
        analyze_checkpoint(mlp(seed=0), "cross_entropy", classification_data(n=8, seed=0),
                           name="m", **kw)
    with pytest.raises(TypeError, match="steps_1d"):
        analyze_checkpoint(mlp(seed=0), "cross_entropy", None, name="m", steps_1d=2.5)


def test_write_report_is_atomic(tmp_path, monkeypatch):
    import landscape.report.render as R  # the rendering module write_report calls

    e = ReportEntry(name="bare", metrics={"loss": 1.0})
    path = tmp_path / "r.html"
    write_report([e], path)
    before = path.read_bytes()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, "report_html", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report([e], path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.html"]


def test_checkpoint_keys_shown_in_report_and_summary():
    from landscape.report import checkpoint_keys, describe_checkpoint_keys

    class Ck:
        missing_keys = ("head.weight", "head.bias")
        unexpected_keys = ("extra.w",)
        shape_mismatches = (("inp.weight", (6, 7), (8, 7)),)

    keys = checkpoint_keys(Ck())
    assert keys == {"missing_keys": ["head.weight", "head.bias"], "unexpected_keys": ["extra.w"],
                    "shape_mismatches": [["inp.weight", [6, 7], [8, 7]]]}
    line = describe_checkpoint_keys(keys)
    assert line == ("2 missing keys left as initialized (head.weight, head.bias); 1 unexpected key "
                    "ignored (extra.w); 1 shape mismatch left as initialized (inp.weight)")
    assert describe_checkpoint_keys(checkpoint_keys(object())) is None
    e = ReportEntry(name="a.pt", metrics={"loss": 1.0}, checkpoint_keys=keys)
    assert json.loads(json.dumps(e.summary()))["checkpoint_keys"] == keys
    notes = re.findall(r"<p class='note'>([^<]*)</p>", report_html([e]))
    assert f"a.pt: loaded non-strictly: {line}" in notes
