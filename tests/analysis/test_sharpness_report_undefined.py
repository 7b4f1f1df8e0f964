"""Issue 26 item 10: one undefined metric in ``sharpness_report`` (PAC-Bayes on a model near
chance accuracy) is reported as undefined with its reason; the other metrics are kept."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis import sharpness_report
from analysis.reference import dense_hessian
from tests.models import classification_data, mlp


def test_undefined_pac_bayes_keeps_lambda_max():
    model = mlp(seed=0)
    x, y = classification_data(seed=0)  # random labels: accuracy 0.29, near chance (1/3)
    rep = sharpness_report(model, "cross_entropy", (x, y), ["pac_bayes", "lambda_max"],
                           options={"pac_bayes": {"max_evaluations": 12}})
    assert "pac_bayes" in rep.undefined and "near chance" in rep.undefined["pac_bayes"]
    assert math.isnan(rep.values["pac_bayes"]) and "pac_bayes" not in rep.results
    # the defined metric is kept, and right: the dense float64 Hessian's top eigenvalue
    h = dense_hessian(model, torch.nn.functional.cross_entropy, (x, y))
    top = float(torch.linalg.eigvalsh(h)[-1])
    assert rep.values["lambda_max"] == pytest.approx(top, rel=1e-4)
    d = rep.to_dict()
    json.dumps(d)
    assert d["undefined"] == {"pac_bayes": rep.undefined["pac_bayes"]}
    assert d["values"]["pac_bayes"] is None and d["values"]["lambda_max"] == pytest.approx(top, rel=1e-4)
    assert "undefined" in repr(rep)


def test_bad_arguments_are_still_raised_not_called_undefined():
    model = mlp(seed=0)
    x, y = classification_data(seed=0)
    with pytest.raises(ValueError, match="target"):
        sharpness_report(model, "cross_entropy", (x, y), ["pac_bayes", "lambda_max"],
                         options={"pac_bayes": {"target": 1.5}})


def test_cli_table_json_and_html_report_show_the_undefined_metric(tmp_path, capsys):
    from landscape.cli import main

    torch.save(mlp(seed=0).state_dict(), tmp_path / "chance.pt")
    spec = ["--model", "tests.models:mlp", "--data", "tests.models:classification_data", "--quiet"]
    js = tmp_path / "s.json"
    code = main(["sharpness", str(tmp_path / "chance.pt"), *spec, "--metric", "pac_bayes",
                 "--metric", "lambda_max", "--json", str(js)])
    out, err = capsys.readouterr()
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("chance.pt"))
    assert "undefined" in row and "nan" not in row.lower()
    assert "pac_bayes: undefined for chance.pt: pac_bayes_flatness(): the accuracy" in out
    rec = json.loads(js.read_text())["checkpoints"][0]
    assert rec["metrics"]["pac_bayes"] is None and rec["metrics"]["lambda_max"] > 0
    assert "near chance" in rec["settings"]["pac_bayes"]["undefined"]
    # the HTML report of these numbers shows the undefined metric and its reason
    from landscape import ReportEntry, write_report

    entry = ReportEntry(name="chance.pt", metrics=rec["metrics"], settings=rec["settings"])
    text = write_report([entry], tmp_path / "r.html").read_text()
    assert "<td>undefined</td>" in text and "near chance accuracy" in text
