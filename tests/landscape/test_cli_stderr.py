"""Data-sampling standard errors on the command line and in the HTML report (issue 26 item 14):
``value +- SE`` cells, the JSON fields, equal to what the library computes."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from analysis import hessian_trace, sharpness, top_eigenpairs
from landscape import ReportEntry, write_report
from landscape._format import WithError, format_table, format_value
from landscape.cli import main
from tests.landscape import cli_fixtures as fx

FIX = "tests.landscape.cli_fixtures"
SPEC64 = ["--model", f"{FIX}:model64", "--data", f"{FIX}:data", "--quiet"]
PM = re.compile(r"(-?\d[\d.e+-]*) \+- (\d[\d.e+-]*|nan)")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.save(fx.trained_state(30), d / "a.pt")
    return d / "a.pt"


def _model(path):
    m = fx.model64()
    m.load_state_dict(torch.load(path, weights_only=True))
    return m


def _data():
    x, y = fx.data()
    return x.double(), y


def test_with_error_formats_and_aligns_as_a_number():
    assert format_value(WithError(1.23456, 0.0123)) == "1.235 +- 0.0123"
    assert format_value(WithError(2.0, None)) == "2" or format_value(WithError(2.0, None)) == "2.0"
    assert format_value(WithError(1.5, math.nan)) == "1.5 +- nan"
    assert format_value(WithError(None, 0.1)) == "-"
    table = format_table(["m", "v"], [["a", WithError(1.0, 0.5)], ["bb", WithError(10.0, 0.25)]])
    assert table.splitlines()[2].endswith(" 1 +- 0.5")  # right-aligned like numbers


def test_hessian_table_and_json_carry_the_library_stderr(ckpt, tmp_path, capsys):
    code = main(["hessian", str(ckpt), *SPEC64, "--top-k", "2", "--trace", "--json",
                 str(tmp_path / "h.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((tmp_path / "h.json").read_text())
    model, data = _model(ckpt), _data()
    ref = top_eigenpairs(model, "cross_entropy", data, k=2, tol=1e-3)
    assert doc["eigenvalue_stderr"] == pytest.approx(ref.data_stderr.tolist(), rel=1e-6)
    assert all(s > 0 for s in doc["eigenvalue_stderr"]) and doc["stderr_units"] == 16
    tr = hessian_trace(model, "cross_entropy", data, data_stderr=True)
    assert doc["trace_data_stderr"] == pytest.approx(tr.data_stderr, rel=1e-6)
    cells = PM.findall(out)
    assert [float(se) for _, se in cells[:2]] == pytest.approx(doc["eigenvalue_stderr"], rel=1e-3)
    assert "trace ~" in out and f"+- {format_value(doc['trace_data_stderr'])}" in out
    assert "+- SE: the data-sampling standard error" in out


def test_sharpness_table_and_json_carry_the_library_stderr(ckpt, capsys):
    code = main(["sharpness", str(ckpt), *SPEC64, "--metric", "worst", "--metric", "lambda_max",
                 "--m", "8", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out)["checkpoints"][0]
    model, data = _model(ckpt), _data()
    worst = sharpness(model, "cross_entropy", data, rho=0.1, m=8, progress=False)
    assert rec["stderr"]["worst"] == pytest.approx(worst.stderr, rel=1e-9)
    ref = top_eigenpairs(model, "cross_entropy", data, k=1)
    assert rec["stderr"]["lambda_max"] == pytest.approx(float(ref.data_stderr[0]), rel=1e-6)
    assert "worst +- SE" in err and "lambda_max +- SE" in err  # the table: stderr (JSON on stdout)
    assert len(PM.findall(err)) == 2


def test_sharpness_table_says_why_an_se_is_undefined(ckpt, capsys):
    # 96 samples, m=64: one batch of m, the unit of m-sharpness, which cannot be split
    code = main(["sharpness", str(ckpt), *SPEC64, "--metric", "worst", "--m", "64", "--json", "-"])
    out, err = capsys.readouterr()
    assert code == 0, err
    rec = json.loads(out)["checkpoints"][0]
    assert rec["stderr"]["worst"] is None and "one batch of m=64" in rec["stderr_reason"]["worst"]
    assert " +- nan" in err and "worst: SE undefined: one batch of m=64 samples" in err


def test_report_shows_value_plus_minus_stderr(tmp_path):
    entry = ReportEntry(name="run", metrics={"loss": 0.5, "lambda_max": 3.25, "trace": 7.0},
                        stderr={"lambda_max": 0.125})
    path = write_report([entry], tmp_path / "r.html")
    text = path.read_text() if hasattr(path, "read_text") else (tmp_path / "r.html").read_text()
    assert "3.25 \u00b1 0.125" in text and ">7<" in text  # the trace has no SE here
    assert "data-sampling standard error" in text
    assert entry.summary()["stderr"] == {"lambda_max": 0.125}


def test_analyze_checkpoint_entry_carries_the_library_stderr(ckpt):
    from analysis import HessianOperator
    from landscape import analyze_checkpoint

    model, data = _model(ckpt), _data()
    entry = analyze_checkpoint(model, "cross_entropy", data, name="a", steps_1d=0, steps_2d=0,
                               density=False, trace=True)
    op = HessianOperator(model, "cross_entropy", data)
    assert entry.stderr["lambda_max"] == pytest.approx(
        float(top_eigenpairs(op, k=1).data_stderr[0]), rel=1e-6)
    assert entry.stderr["trace"] == pytest.approx(
        hessian_trace(op, data_stderr=True).data_stderr, rel=1e-6)
    worst = sharpness(model, "cross_entropy", data, rho=0.1, m=64, progress=False)
    assert entry.stderr["sharpness"] == pytest.approx(worst.stderr, nan_ok=True)


def test_torchrun_two_processes_give_the_single_process_stderr(ckpt, tmp_path, capsys):
    import os
    import pathlib
    import shutil
    import subprocess
    import sys

    from analysis.distributed import find_free_port

    torchrun = shutil.which("torchrun", path=str(pathlib.Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    common = ["hessian", str(ckpt), *SPEC64, "--top-k", "2", "--tol", "1e-8", "--trace"]
    assert main([*common, "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[2]),
           "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [torchrun, "--nproc_per_node=2", f"--master_port={find_free_port()}", "-m", "landscape",
         *common, "--json", str(tmp_path / "two.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    one = json.loads((tmp_path / "one.json").read_text())
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["stderr_units"] == one["stderr_units"] == 16
    assert two["eigenvalue_stderr"] == pytest.approx(one["eigenvalue_stderr"], rel=1e-6)
    assert two["trace_data_stderr"] == pytest.approx(one["trace_data_stderr"], rel=1e-6)
