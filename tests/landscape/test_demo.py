"""The bundled demo in quick mode (what `make demo` runs, shrunk to seconds)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import pytest
import torch

from analysis import TrackerHistory, evaluate
from landscape import load_checkpoint
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
    # training curves (test accuracy, lambda_max from the tracker), 1-D random + gradient
    # (all four overlaid), one 2-D per optimizer, the density
    assert text.count('class="plotly-graph-div"') == 2 + 2 + 4 + 1
    assert "lambda_max during training" in text and "20% of the labels flipped" in text
    assert text.index("<h2>Metrics</h2>") < text.index("<h2>Training</h2>") < text.index("1-D slices")
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
        # the tracker's curve: every track_every steps, also written as CSV
        steps = math.ceil(cfg.train_size / cfg.batch_size) * cfg.epochs
        assert [s for s, _ in run.lambda_max_curve] == list(range(cfg.track_every, steps + 1,
                                                                   cfg.track_every))
        hist = TrackerHistory.read_csv(pathlib.Path(run.checkpoint).parents[1] / "tracker"
                                       / f"{run.optimizer}.csv")
        assert [(r.step, r.lambda_max) for r in hist] == list(run.lambda_max_curve)
        assert all(lam > 0 for _, lam in run.lambda_max_curve) and run.tracker_hvps > 0


def test_demo_uses_the_reproduction_setting():
    """The full demo trains the reproduction's noisy-label problem with its recipe."""
    from landscape.reproduce import ReproConfig

    cfg, rc = DemoConfig(), ReproConfig()
    assert (cfg.label_noise, cfg.epochs, cfg.lr, cfg.sam_rho, cfg.msam_rho, cfg.batch_size) == (
        rc.label_noise, rc.epochs, rc.lr, rc.rho_sam, rc.rho_msam, rc.batch_size)
    assert cfg.label_noise > 0 and cfg.track_every > 0


def test_make_optimizer_types():
    from msam import MSAM, NAG, SAM

    params = list(digits_cnn(2).parameters())
    cfg = DemoConfig()
    kinds = {n: type(make_optimizer(n, params, cfg)) for n in OPTIMIZERS}
    assert kinds == {"sgd": torch.optim.SGD, "nag": NAG, "sam": SAM, "msam": MSAM}
    assert make_optimizer("msam", params, cfg).param_groups[0]["rho"] == cfg.msam_rho
    assert make_optimizer("sam", params, cfg).param_groups[0]["rho"] == cfg.sam_rho
    assert make_optimizer("sgd", params, cfg).param_groups[0]["lr"] == cfg.lr
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", params, cfg)
    with pytest.raises(ValueError, match="unknown optimizer"):
        run_demo("unused", optimizers=["adam"])


def test_demo_optimizers_are_the_reproduction_factory():
    """make_optimizer is build_optimizer with the demo's settings threaded through (non-default
    values, so a setting that is dropped on the way shows up)."""
    from landscape.reproduce import build_optimizer, optimizer_specs

    cfg = DemoConfig(lr=0.3, momentum=0.8, weight_decay=1e-3, sam_rho=0.2, msam_rho=2.5)
    rc = cfg.repro()
    labels = {"sgd": "SGD", "nag": "NAG", "sam": "SAM", "msam": "MSAM"}
    params = list(digits_cnn(2).parameters())
    for name in OPTIMIZERS:
        a = make_optimizer(name, params, cfg)
        b = build_optimizer(optimizer_specs(rc)[labels[name]], params, rc)
        assert type(a) is type(b)
        strip = [{k: v for k, v in g.items() if k != "params"} for g in a.param_groups]
        assert strip == [{k: v for k, v in g.items() if k != "params"} for g in b.param_groups]
        assert strip[0]["lr"] == 0.3 and strip[0]["momentum"] == 0.8
    assert make_optimizer("sam", params, cfg).param_groups[0]["rho"] == 0.2
    assert make_optimizer("msam", params, cfg).param_groups[0]["rho"] == 2.5


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
