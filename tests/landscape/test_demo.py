"""The bundled demo in quick mode (what `make demo` runs, shrunk to seconds)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from analysis.evaluation import evaluate
from landscape.checkpoints import load_checkpoint
from landscape.datasets import load_digits
from landscape.demo import OPTIMIZERS, DemoConfig, make_optimizer, run_demo
from landscape.models import digits_cnn

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    messages = []
    before = torch.get_num_threads()
    res = run_demo(out, quick=True, log=messages.append)
    assert torch.get_num_threads() == before  # the demo's one-thread setting is undone
    return out, res, messages


def test_quick_demo_outputs(quick):
    out, res, messages = quick
    assert [r.optimizer for r in res.runs] == list(OPTIMIZERS)
    assert len(messages) == 4 and all("trained" in m for m in messages)
    text = (out / "report.html").read_text()
    for label in ("SGD", "NAG", "SAM", "MSAM"):
        assert f"<td>{label}</td>" in text
    # training curves, 1-D random + gradient, one 2-D per optimizer, the density
    assert text.count('class="plotly-graph-div"') == 1 + 2 + 4 + 1
    summary = json.loads((out / "summary.json").read_text())
    assert [r["optimizer"] for r in summary["runs"]] == list(OPTIMIZERS)
    table = res.table()
    for col in ("test acc %", "s/epoch", "lambda_max", "sharpness"):
        assert col in table
    assert len(table.splitlines()) == 2 + 4


def test_quick_demo_numbers_are_the_checkpoints(quick):
    """Every reported test accuracy is that of the saved (unperturbed) checkpoint."""
    _, res, _ = quick
    cfg = DemoConfig.quick()
    digits = load_digits(seed=0, train_size=cfg.train_size)
    for run in res.runs:
        model = digits_cnn(cfg.width)
        ck = load_checkpoint(run.checkpoint, model)
        assert not ck.perturbed  # saved after optimizer.eval()
        ev = evaluate(model, "cross_entropy", digits.test)
        assert run.test_accuracy == pytest.approx(ev.accuracy)
        assert run.test_loss == pytest.approx(ev.loss, rel=1e-5)
        assert run.seconds_per_epoch > 0 and run.lambda_max > 0 and run.sharpness >= 0
        assert len(run.test_accuracy_history) == cfg.epochs


def test_make_optimizer_types():
    from msam.msam import MSAM, NAG
    from msam.sam import SAM

    params = list(digits_cnn(2).parameters())
    cfg = DemoConfig()
    kinds = {n: type(make_optimizer(n, params, cfg)) for n in OPTIMIZERS}
    assert kinds == {"sgd": torch.optim.SGD, "nag": NAG, "sam": SAM, "msam": MSAM}
    assert make_optimizer("msam", params, cfg).param_groups[0]["rho"] == cfg.msam_rho
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", params, cfg)
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_demo("unused", optimizers=["adam"])


@pytest.mark.slow
def test_demo_command_quick(tmp_path):
    """`landscape demo --quick` through the real entry point (what `make demo` runs, shrunk)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("OMP_NUM_THREADS", "1")
    res = subprocess.run([sys.executable, "-m", "landscape", "demo", "--quick", "--out",
                          str(tmp_path / "d"), "--quiet", "--json", str(tmp_path / "d.json")],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "optimizer" in res.stdout and "MSAM" in res.stdout and "report:" in res.stdout
    assert (tmp_path / "d" / "report.html").exists()
    doc = json.loads((tmp_path / "d.json").read_text())
    assert doc["schema"] == "landscape.demo/1" and len(doc["runs"]) == 4
