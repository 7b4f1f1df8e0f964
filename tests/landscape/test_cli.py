"""The ``landscape`` command line: end to end on a model this repository does not define.

Most tests call ``landscape.cli.main(argv)`` in-process (fast); a few run the real console entry
through ``sys.executable -m landscape`` in a subprocess, with the model named by file path.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from analysis import evaluate
from analysis.reference import dense_hessian
from landscape._format import format_table
from landscape.cli import load_object, main
from tests.landscape import cli_fixtures as fx

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIX = "tests.landscape.cli_fixtures"
SPEC = ["--model", f"{FIX}:model", "--data", f"{FIX}:data", "--quiet"]
SPEC64 = ["--model", f"{FIX}:model64", "--data", f"{FIX}:data", "--quiet"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.save({"model": fx.trained_state(20), "epoch": 1}, d / "a.pt")
    torch.save(fx.trained_state(60), d / "b.pt")
    return d


def _model(path, dtype=torch.float32):
    m = fx.model().to(dtype)
    sd = torch.load(path, weights_only=True)
    m.load_state_dict(sd.get("model", sd))
    return m


def _data(dtype=torch.float32):
    x, y = fx.data()
    return x.to(dtype), y


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# help and usage errors (exit 2)


@pytest.mark.parametrize("cmd", ["sharpness", "hessian", "slice", "report", "demo"])
def test_help_has_an_example(cmd, capsys):
    code, out, _ = _run([cmd, "--help"], capsys)
    assert code == 0
    assert "example:" in out and f"landscape {cmd}" in out


def test_top_level_help(capsys):
    code, out, _ = _run(["--help"], capsys)
    assert code == 0
    for cmd in ("sharpness", "hessian", "slice", "report", "demo"):
        assert cmd in out


@pytest.mark.parametrize(
    "argv",
    [
        pytest.param([], id="no-command"),
        pytest.param(["frobnicate"], id="unknown-command"),
        pytest.param(["sharpness", "x.pt", "--data", f"{FIX}:data"], id="missing-model"),
        pytest.param(["slice", "x.pt", *SPEC, "--out", "f.png", "--steps", "many"], id="bad-int"),
        pytest.param(["sharpness", "x.pt", *SPEC, "--metric", "bogus"], id="bad-metric"),
        pytest.param(["hessian", "x.pt", *SPEC, "--top-k", "0"], id="top-k-0"),
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert "error:" in err


def test_bad_values_exit_2(ckpts, tmp_path, capsys):
    a = str(ckpts / "a.pt")
    out = str(tmp_path / "f.png")
    cases = [
        ["sharpness", a, "--model", "no_colon_here", "--data", f"{FIX}:data", "--quiet"],
        ["slice", a, *SPEC, "--out", out, "--direction", "sideways"],
        ["slice", a, *SPEC, "--out", out, "--direction", "interpolate"],
        ["slice", a, *SPEC, "--out", out, "--range", "1", "-1"],
        ["slice", a, *SPEC, "--out", str(tmp_path / "f.txt")],
    ]
    for argv in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2, argv
        assert err.count("\n") == 1 and "error:" in err, err


# ---------------------------------------------------------------------------------------------
# runtime errors (exit 1, one line, no traceback unless --debug)


def _fails(argv, capsys, match):
    code, _, err = _run(argv, capsys)
    assert code == 1, (argv, err)
    lines = err.strip().splitlines()
    assert [ln for ln in lines if "error:" in ln] == lines[-1:], err  # one error line, last
    assert lines[-1].startswith(f"landscape {argv[0]}: error: ")
    assert "Traceback" not in err
    assert match in lines[-1], err
    return lines[-1]


def test_runtime_errors_are_one_line(ckpts, tmp_path, capsys):
    a = str(ckpts / "a.pt")
    empty = tmp_path / "empty"
    empty.mkdir()
    _fails(["sharpness", str(tmp_path / "nope.pt"), *SPEC], capsys, "checkpoint not found")
    _fails(["sharpness", str(empty), *SPEC], capsys, "no checkpoints in directory")
    _fails(["sharpness", a, "--model", "no_such_module_xyz:model", "--data", f"{FIX}:data"],
           capsys, "importing no_such_module_xyz failed")
    _fails(["sharpness", a, "--model", f"{FIX}:nothing", "--data", f"{FIX}:data"], capsys,
           "has no attribute 'nothing'")
    _fails(["sharpness", a, "--model", f"{FIX}:not_a_model", "--data", f"{FIX}:data"], capsys,
           "returned a dict, expected a torch.nn.Module")
    _fails(["sharpness", a, "--model", f"{FIX}:raising_model", "--data", f"{FIX}:data"], capsys,
           "cannot build the model today")
    _fails(["sharpness", a, "--model", f"{FIX}:model", "--data", f"{FIX}:wrong_shape_data"],
           capsys, "the data does not fit the model")
    err = _fails(["sharpness", a, "--model", f"{FIX}:model_wide", "--data", f"{FIX}:data"],
                 capsys, "does not match GatedNet: shape mismatches: inp.weight (checkpoint [6, 7] vs model [8, 7])")
    assert "head.weight" in err
    _fails(["sharpness", a, "--model", "landscape.models:digits_mlp", "--data", f"{FIX}:data"],
           capsys, "the data does not fit the model")
    _fails(["sharpness", a, *SPEC, "--model", f"{FIX}:model", "--data", str(tmp_path / "x.py:data")],
           capsys, "not found")
    # an output path that cannot be written: fails before any computation
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(["slice", a, *SPEC, "--out", str(blocker / "sub" / "f.png")], capsys, "cannot write")
    _fails(["report", a, *SPEC, "--out", str(tmp_path)], capsys, "is a directory")
    _fails(["sharpness", a, *SPEC, "--distributed"], capsys, "torchrun")


def test_debug_shows_traceback(tmp_path, capsys):
    code, _, err = _run(["--debug", "sharpness", str(tmp_path / "nope.pt"), *SPEC], capsys)
    assert code == 1 and "Traceback" in err


def test_malicious_checkpoint_refused_by_cli(tmp_path, capsys):
    from tests.landscape.test_checkpoints import _OsPayload

    marker = tmp_path / "pwned"
    torch.save({"model": fx.trained_state(1), "x": _OsPayload(marker)}, tmp_path / "evil.pt")
    err = _fails(["sharpness", str(tmp_path / "evil.pt"), *SPEC], capsys, "refused to load")
    assert "--trust-pickle" in err
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# results (checked against independent references)


def test_sharpness_json_schema_and_values(ckpts, capsys):
    code, out, err = _run(["sharpness", str(ckpts), *SPEC64, "--metric", "worst", "--metric",
                           "lambda_max", "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["schema"] == "landscape.sharpness/1" and doc["command"] == "sharpness"
    assert doc["metrics"] == ["worst", "lambda_max"]
    assert [pathlib.Path(c["checkpoint"]).name for c in doc["checkpoints"]] == ["a.pt", "b.pt"]
    x, y = _data(torch.float64)
    for rec in doc["checkpoints"]:
        assert set(rec) >= {"checkpoint", "perturbed", "loss", "accuracy", "num_samples", "metrics",
                            "seconds"}
        assert set(rec["metrics"]) == {"worst", "lambda_max"}
        model = _model(rec["checkpoint"], torch.float64)
        ev = evaluate(model, "cross_entropy", (x, y))
        assert rec["loss"] == pytest.approx(ev.loss, rel=1e-9)
        assert rec["accuracy"] == pytest.approx(ev.accuracy)
        lam = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x, y))).max().item()
        assert rec["metrics"]["lambda_max"] == pytest.approx(lam, rel=1e-3)
        assert rec["metrics"]["worst"] > 0
    # the table went to stderr because stdout carries the JSON
    assert "lambda_max" in err and "a.pt" in err


def test_hessian_top_k_matches_dense(ckpts, tmp_path, capsys):
    a = ckpts / "a.pt"
    code, out, err = _run(["hessian", str(a), *SPEC64, "--top-k", "3", "--tol", "1e-8",
                           "--json", str(tmp_path / "h.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["schema"] == "landscape.hessian/1" and doc["converged"] is True
    x, y = _data(torch.float64)
    ev = torch.linalg.eigvalsh(dense_hessian(_model(a, torch.float64), "cross_entropy", (x, y)))
    np.testing.assert_allclose(doc["eigenvalues"], ev.flip(0)[:3].numpy(), rtol=1e-6)
    assert "eigenvalue" in out


def test_slice_1d_json_and_figure(ckpts, tmp_path, capsys):
    a = ckpts / "a.pt"
    code, _, err = _run(["slice", str(a), *SPEC64, "--dims", "1", "--steps", "5", "--range", "-1", "1",
                         "--out", str(tmp_path / "s.png"), "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["schema"] == "landscape.slice/1"
    assert doc["grid"]["alphas"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    ev = evaluate(_model(a, torch.float64), "cross_entropy", _data(torch.float64))
    assert doc["grid"]["loss"][2] == pytest.approx(ev.loss, rel=1e-9)
    assert doc["loss_at_origin"] == pytest.approx(ev.loss, rel=1e-9)
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_slice_interpolate_endpoints(ckpts, tmp_path, capsys):
    a, b = ckpts / "a.pt", ckpts / "b.pt"
    code, _, err = _run(["slice", str(a), *SPEC64, "--direction", f"interpolate:{b}", "--range",
                         "0", "1", "--steps", "3", "--out", str(tmp_path / "i.html"), "--json",
                         str(tmp_path / "i.json")], capsys)
    assert code == 0, err
    loss = json.loads((tmp_path / "i.json").read_text())["grid"]["loss"]
    la = evaluate(_model(a, torch.float64), "cross_entropy", _data(torch.float64)).loss
    lb = evaluate(_model(b, torch.float64), "cross_entropy", _data(torch.float64)).loss
    assert loss[0] == pytest.approx(la, rel=1e-9) and loss[2] == pytest.approx(lb, rel=1e-6)
    assert "plotly" in (tmp_path / "i.html").read_text()[:5000].lower()


def test_slice_2d_store_resumes(ckpts, tmp_path, capsys):
    a = ckpts / "a.pt"
    argv = ["slice", str(a), *SPEC, "--dims", "2", "--steps", "4", "--out", str(tmp_path / "s.html"),
            "--store", str(tmp_path / "grid.npz"), "--json", "-"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    first = json.loads(out)
    assert first["grid"]["resumed_rows"] == 0 and np.array(first["grid"]["loss"]).shape == (4, 4)
    code, out, err = _run(argv, capsys)
    second = json.loads(out)
    assert code == 0 and second["grid"]["resumed_rows"] == 4
    assert second["grid"]["loss"] == first["grid"]["loss"]


@pytest.mark.parametrize("data", ["loader", "batches"])
def test_data_forms_give_the_same_loss(ckpts, data, capsys):
    a = str(ckpts / "a.pt")
    outs = []
    for spec in ("data", data):
        code, out, err = _run(["sharpness", a, "--model", f"{FIX}:model64", "--data", f"{FIX}:{spec}",
                               "--metric", "lambda_max", "--quiet", "--json", "-"], capsys)
        assert code == 0, err
        outs.append(json.loads(out)["checkpoints"][0])
    assert outs[0]["loss"] == pytest.approx(outs[1]["loss"], rel=1e-12)
    assert outs[0]["num_samples"] == outs[1]["num_samples"] == 96


def test_custom_loss_and_max_samples(ckpts, capsys):
    a = str(ckpts / "a.pt")
    code, out, err = _run(["sharpness", a, *SPEC64, "--loss", f"{FIX}:my_loss", "--max-samples", "50",
                           "--metric", "lambda_max", "--json", "-"], capsys)
    assert code == 0, err
    rec = json.loads(out)["checkpoints"][0]
    x, y = _data(torch.float64)
    ev = evaluate(_model(a, torch.float64), fx.my_loss, (x[:50], y[:50]))
    assert rec["num_samples"] == 50 and rec["loss"] == pytest.approx(ev.loss, rel=1e-9)


def test_report_command(ckpts, tmp_path, capsys):
    out = tmp_path / "r" / "report.html"
    code, stdout, err = _run(["report", str(ckpts / "a.pt"), str(ckpts / "b.pt"), *SPEC, "--out", str(out),
                              "--steps-1d", "5", "--steps-2d", "3", "--no-density", "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(stdout)
    assert doc["schema"] == "landscape.report/1" and [c["name"] for c in doc["checkpoints"]] == ["a.pt", "b.pt"]
    assert {"loss", "accuracy", "lambda_max", "sharpness"} <= set(doc["checkpoints"][0])
    text = out.read_text()
    assert "a.pt" in text and "b.pt" in text and text.count('class="plotly-graph-div"') == 4


def test_perturbed_msam_checkpoint_warns(tmp_path, capsys):
    from msam import MSAM

    net = fx.model()
    x, y = fx.data()
    opt = MSAM(net.parameters(), lr=0.1, rho=0.5)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "m.pt")
    opt.eval()
    ref = evaluate(net, "cross_entropy", (x, y)).loss
    code, out, err = _run(["sharpness", str(tmp_path / "m.pt"), "--model", f"{FIX}:model", "--data",
                           f"{FIX}:data", "--metric", "lambda_max", "--json", "-"], capsys)
    assert code == 0, err
    assert "warning:" in err and "perturbed" in err
    rec = json.loads(out)["checkpoints"][0]
    assert rec["perturbed"] is True and rec["loss"] == pytest.approx(ref, rel=1e-5)


def test_format_table_and_load_object():
    t = format_table(["name", "x"], [["a", 1.0], ["bb", None], ["c", 1.5e-7]])
    lines = t.splitlines()
    assert [ln.split() for ln in lines] == [["name", "x"], ["----", "-" * 9], ["a", "1"], ["bb", "-"],
                                            ["c", "1.500e-07"]]  # None is shown as "-"
    from landscape.models import digits_cnn

    assert load_object("landscape.models:digits_cnn") is digits_cnn
    assert load_object(f"{FIX}:GatedNet.forward") is fx.GatedNet.forward


# ---------------------------------------------------------------------------------------------
# the real entry point, in a subprocess, with the model named by its file path


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.slow
def test_subprocess_file_spec_end_to_end(ckpts, tmp_path):
    net = tmp_path / "elsewhere" / "net.py"
    net.parent.mkdir()
    shutil.copy(pathlib.Path(fx.__file__), net)
    res = subprocess.run(
        [sys.executable, "-m", "landscape", "sharpness", str(ckpts / "a.pt"), "--model", f"{net}:model",
         "--data", f"{net}:data", "--metric", "lambda_max", "--json", str(tmp_path / "o.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert res.returncode == 0, res.stderr
    assert "lambda_max" in res.stdout and "a.pt" in res.stdout
    assert "lambda_max" in res.stderr or "computing" in res.stderr  # progress on stderr
    doc = json.loads((tmp_path / "o.json").read_text())
    assert doc["checkpoints"][0]["metrics"]["lambda_max"] > 0
    bad = subprocess.run([sys.executable, "-m", "landscape", "sharpness", str(tmp_path / "missing.pt"),
                          "--model", f"{net}:model", "--data", f"{net}:data"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr
    usage = subprocess.run([sys.executable, "-m", "landscape", "slice"], capture_output=True, text=True,
                           timeout=300, cwd=tmp_path, env=_env())
    assert usage.returncode == 2


def test_hessian_trace_and_density(ckpts, tmp_path, capsys):
    a = ckpts / "a.pt"
    code, out, err = _run(["hessian", str(a), *SPEC64, "--trace", "--density", str(tmp_path / "d.png"),
                           "--density-runs", "2", "--density-iter", "20", "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    H = dense_hessian(_model(a, torch.float64), "cross_entropy", _data(torch.float64))
    # Hutch++ with 99 products on a 105-parameter model: within a few standard errors
    assert abs(doc["trace"] - torch.trace(H).item()) <= 4 * doc["trace_stderr"] + 1e-6 * abs(doc["trace"])
    grid, dens = np.array(doc["density"]["grid"]), np.array(doc["density"]["density"])
    assert grid.shape == dens.shape and (dens >= 0).all()
    assert np.trapezoid(dens, grid) == pytest.approx(1.0, rel=0.05)  # a probability density
    assert grid.max() >= torch.linalg.eigvalsh(H).max().item() * 0.99
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_torchrun_two_processes_match_one(ckpts, tmp_path, capsys):
    """`torchrun --nproc_per_node 2 -m landscape ...`: sharded data, all-reduced numbers, one
    table and one JSON (rank 0 only), equal to the single-process run."""
    torchrun = shutil.which("torchrun", path=str(pathlib.Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    a = str(ckpts / "a.pt")
    common = ["hessian", a, "--model", f"{FIX}:model64", "--data", f"{FIX}:data", "--top-k", "2",
              "--tol", "1e-8", "--quiet"]
    code, out, err = _run([*common, "--json", "-"], capsys)
    assert code == 0, err
    single = json.loads(out)
    from analysis.distributed import find_free_port

    res = subprocess.run(
        [torchrun, "--nproc_per_node=2", f"--master_port={find_free_port()}", "-m", "landscape",
         *common, "--json", str(tmp_path / "d.json")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=_env())
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("eigenvalue") == 1  # printed by rank 0 only
    multi = json.loads((tmp_path / "d.json").read_text())
    np.testing.assert_allclose(multi["eigenvalues"], single["eigenvalues"], rtol=1e-8)


def test_slice_along_top_eigenvector_has_curvature_lambda_max(ckpts, tmp_path, capsys):
    a = ckpts / "a.pt"
    h = 1e-3
    code, out, err = _run(["slice", str(a), *SPEC64, "--direction", "eigen", "--range", str(-h), str(h),
                           "--steps", "3", "--out", str(tmp_path / "e.png"), "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["directions"][0]["name"].startswith("eigenvector 1")
    lo, mid, hi = doc["grid"]["loss"]
    H = dense_hessian(_model(a, torch.float64), "cross_entropy", _data(torch.float64))
    lam = torch.linalg.eigvalsh(H).max().item()
    assert (lo - 2 * mid + hi) / h**2 == pytest.approx(lam, rel=1e-3)


def test_slice_2d_on_pca_of_a_trajectory(tmp_path, capsys):
    traj = tmp_path / "traj"
    traj.mkdir()
    for i, steps in enumerate((2, 5, 10, 20, 40)):
        torch.save(fx.trained_state(steps), traj / f"step{i}.pt")
    code, out, err = _run(["slice", str(traj / "step4.pt"), *SPEC64, "--dims", "2", "--direction",
                           f"pca:{traj}", "--steps", "3", "--out", str(tmp_path / "p.html"), "--json", "-"],
                          capsys)
    assert code == 0, err
    doc = json.loads(out)
    names = [d["name"] for d in doc["directions"]]
    assert names[0].startswith("PC1") and names[1].startswith("PC2")
    assert abs(doc["directions"][0]["norm"] - 1.0) < 1e-9
    ev = evaluate(_model(traj / "step4.pt", torch.float64), "cross_entropy", _data(torch.float64))
    assert doc["grid"]["loss"][1][1] == pytest.approx(ev.loss, rel=1e-9)  # the centre is w


# ---------------------------------------------------------------------------------------------
# problems a new user reported (each fails fast, in one line)


@pytest.fixture
def no_compute(monkeypatch):
    """Any model/data setup (the start of every computation) fails the test."""
    from landscape.cli import setup as cli_setup

    def boom(*a, **k):
        raise AssertionError("the command computed before checking its output paths")

    monkeypatch.setattr(cli_setup.Setup, "__init__", boom)


def test_output_paths_checked_before_any_computation(ckpts, tmp_path, capsys, no_compute):
    a = str(ckpts / "a.pt")
    afile = tmp_path / "afile"
    afile.write_text("x")
    err = _fails(["sharpness", a, *SPEC, "--json", str(afile / "s.json")], capsys, "cannot write --json")
    assert "is a file, not a directory" in err
    _fails(["hessian", a, *SPEC, "--json", str(tmp_path)], capsys, "is a directory")
    _fails(["slice", a, *SPEC, "--dims", "2", "--out", str(tmp_path / "f.png"),
            "--store", str(afile / "g.npz")], capsys, "cannot write --store")
    if pathlib.Path("/proc").is_dir():  # a directory no file can be created in, even as root
        _fails(["hessian", a, *SPEC, "--json", "/proc/h.json"], capsys, "cannot write --json /proc/h.json")
        err = _fails(["report", a, *SPEC, "--out", "/proc/r.html"], capsys, "cannot write --out /proc/r.html")
        assert ".tmp" not in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if not os.access(ro, os.W_OK) or os.geteuid() != 0:
            _fails(["sharpness", a, *SPEC, "--json", str(ro / "s.json")], capsys, "not writable")
    finally:
        ro.chmod(0o700)
    assert not list(tmp_path.glob("**/.landscape-probe-*"))  # the probe file is removed


def test_report_and_slice_option_checks_exit_2(ckpts, tmp_path, capsys, no_compute):
    a = str(ckpts / "a.pt")
    cases = {
        ("report", "--out", str(tmp_path / "r.pdf")): "use a .html or .htm file",
        ("report", "--out", str(tmp_path / "r.html"), "--steps-2d", "1"): "--steps-2d 1: need at least 2",
        ("report", "--out", str(tmp_path / "r.html"), "--steps-1d", "0"): "--steps-1d 0: need at least 2",
        ("report", "--out", str(tmp_path / "r.html"), "--radius", "-1"): "--radius -1.0: need a finite number > 0",
        ("report", "--out", str(tmp_path / "r.html"), "--radius", "nan"): "--radius nan",
        ("slice", "--dims", "1", "--out", str(tmp_path / "f.png"), "--store", str(tmp_path / "big.npz")):
            "--store applies to --dims 2",
        ("sharpness", "--rho", "0"): "--rho 0.0: need a finite number > 0",
    }
    for (cmd, *rest), match in cases.items():
        code, _, err = _run([cmd, a, *SPEC, *rest], capsys)
        assert code == 2, (cmd, rest, err)
        assert err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "r.pdf").exists() and not (tmp_path / "big.npz").exists()


def test_hessian_of_a_directory_says_one_checkpoint(ckpts, capsys, no_compute):
    for cmd, extra in (("hessian", []), ("slice", ["--out", "never.png"])):
        code, _, err = _run([cmd, str(ckpts), *SPEC, *extra], capsys)
        assert code == 2, err
        assert f"{cmd} takes one checkpoint; {ckpts} holds 2 (a.pt, b.pt)" in err
        assert "unpack" not in err


def test_non_checkpoint_file_is_named_not_pickle_refused(ckpts, tmp_path, capsys):
    net = tmp_path / "net.py"
    net.write_text("import torch\n")
    err = _fails(["sharpness", str(net), *SPEC], capsys, f"{net} is not a checkpoint")
    assert "--trust-pickle" not in err and "text" in err
    # the content decides, not the suffix: a torch.save file named .model still loads
    other = tmp_path / "weights.model"
    shutil.copy(ckpts / "b.pt", other)
    code, out, err = _run(["sharpness", str(other), *SPEC, "--metric", "lambda_max"], capsys)
    assert code == 0 and "weights.model" in out, err
    from safetensors.torch import save_file

    # and safetensors content under another suffix loads as safetensors
    save_file(fx.trained_state(5), str(tmp_path / "w.weights"))
    code, out, err = _run(["hessian", str(tmp_path / "w.weights"), *SPEC, "--top-k", "1"], capsys)
    assert code == 0 and "eigenvalue" in out, err


def test_shuffled_loader_error_names_no_library_keyword(ckpts, tmp_path, capsys):
    spec = tmp_path / "shuffled.py"
    spec.write_text(
        "import torch\n"
        "from tests.landscape.cli_fixtures import data\n"
        "def loader():\n"
        "    x, y = data()\n"
        "    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,\n"
        "                                       shuffle=True)\n")
    err = _fails(["hessian", str(ckpts / "a.pt"), "--model", f"{FIX}:model", "--data", f"{spec}:loader",
                  "--quiet"], capsys, "shuffle=False")
    assert "check_deterministic" not in err


def test_mse_on_class_labels_is_one_line(ckpts, capsys):
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # a warning would print 3 lines
        warnings.simplefilter("always")
        code, _, err = _run(["sharpness", str(ckpts / "a.pt"), *SPEC, "--loss", "mse"], capsys)
    assert code == 1
    assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
    assert err.strip().count("\n") == 0 and "UserWarning" not in err, err
    assert "the data does not fit the model" in err and "class labels need cross_entropy" in err


def test_help_examples_are_valid_and_defaults_shown(capsys):
    import re
    import shlex

    from landscape.cli import build_parser

    parser = build_parser()
    for cmd in ("sharpness", "hessian", "slice", "report", "demo"):
        code, out, _ = _run([cmd, "--help"], capsys)
        assert code == 0
        example = out.split("example:", 1)[1].replace("\\\n", " ")
        for line in example.strip().splitlines():
            argv = shlex.split(line.split("#", 1)[0])
            assert argv[0] == "landscape"
            parser.parse_args(argv[1:])  # exits 2 on an invalid choice (was --metric adaptive_worst)
        # every option documents itself; defaults are shown
        for opt in re.findall(r"^  (--[a-z0-9-]+)", out, flags=re.M):
            assert not re.search(rf"^  {opt}( [A-Z.{{}}0-9,_ ]+)?$", out, flags=re.M), (cmd, opt)
    _, out, _ = _run(["hessian", "--help"], capsys)
    assert "(default: 5)" in out and "Hutch++" in out and "Hutchinson" not in out
    _, out, _ = _run(["slice", "--help"], capsys)
    assert "(default: -1.0 1.0)" in out and "(default: 41)" in out
    _, out, _ = _run(["report", "--help"], capsys)
    assert "(default: 21)" in out and "(default: Loss landscape report)" in out


def test_hessian_table_shows_residuals(ckpts, capsys):
    code, out, err = _run(["hessian", str(ckpts / "b.pt"), *SPEC64, "--top-k", "2", "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert "residual" in err
    for r in doc["residuals"]:
        assert format_table(["x"], [[r]]).splitlines()[-1].strip() in err


def test_sharpness_records_the_settings_used(ckpts, capsys):
    code, out, err = _run(["sharpness", str(ckpts / "a.pt"), *SPEC64, "--metric", "worst", "--metric",
                           "average", "--metric", "lambda_max", "--m", "48", "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    s = doc["checkpoints"][0]["settings"]
    from analysis import sharpness

    # the defaults the library used, not null: the same call reproduces the value
    # (sharpness_report's documented defaults: rho 0.1 worst, 0.05 average, 64 noise samples)
    assert s["worst"]["rho"] == 0.1 and s["worst"]["m"] == 48 and s["worst"]["num_batches"] == 2
    assert s["average"]["rho"] == 0.05 and s["average"]["m"] == 48 and s["average"]["samples"] == 64
    assert {"rho", "m", "steps", "samples", "stderr", "num_batches"} <= set(s["worst"])
    assert doc["settings"]["worst"] == s["worst"] and doc["m"] == 48
    x, y = _data(torch.float64)
    ref = sharpness(_model(str(ckpts / "a.pt"), torch.float64), "cross_entropy", (x, y), rho=s["worst"]["rho"],
                    kind="worst", adaptive=True, m=48, steps=s["worst"]["steps"], seed=0)
    assert doc["checkpoints"][0]["metrics"]["worst"] == pytest.approx(ref.value, rel=1e-9)
    # the table says which rho and m each column used
    assert f"worst: rho={s['worst']['rho']:g}, m=48" in err
    assert f"average: rho={s['average']['rho']:g}, m=48" in err
    code, out, err = _run(["sharpness", str(ckpts / "a.pt"), *SPEC64, "--metric", "worst", "--rho", "0.02",
                           "--json", "-"], capsys)
    assert json.loads(out)["checkpoints"][0]["settings"]["worst"]["rho"] == 0.02


# ---------------------------------------------------------------------------------------------
# issue 15 (reliability) and 13.8 (shared defaults)


def _usage(argv, capsys, match):
    code, _, err = _run(argv, capsys)
    assert code == 2, (argv, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert match in lines[0], err
    return lines[0]


def test_range_accepts_negative_scientific_notation(ckpts, tmp_path, capsys):
    from landscape.cli import build_parser

    for lo, hi in [("-1e-3", "1e-3"), ("-2E+1", "-1.5e-2"), ("-.5", "-1"), ("-1", "2")]:
        args = build_parser().parse_args(["slice", "c.pt", "--model", "m:f", "--data", "d:f",
                                          "--out", "x.png", "--range", lo, hi])
        assert args.range == [float(lo), float(hi)]
    js = tmp_path / "s.json"
    code, _, err = _run(["slice", str(ckpts / "a.pt"), *SPEC, "--range", "-1e-3", "1e-3", "--steps", "3",
                         "--out", str(tmp_path / "s.png"), "--json", str(js)], capsys)
    assert code == 0, err
    doc = json.loads(js.read_text())
    assert doc["grid"]["alphas"] == [-1e-3, 0.0, 1e-3]
    ref = evaluate(_model(ckpts / "a.pt"), "cross_entropy", _data()).loss
    assert doc["grid"]["loss"][1] == pytest.approx(ref, rel=1e-6)


def test_tol_top_k_and_m_are_usage_errors_before_any_data_pass(ckpts, capsys, monkeypatch):
    from landscape.cli import setup as cli_setup

    a = str(ckpts / "a.pt")
    for tol in ("0", "-1e-3", "nan", "inf", "1", "2"):  # a relative tolerance: (0, 1)
        _usage(["hessian", a, *SPEC, "--tol", tol], capsys, f"--tol: expected a number in (0, 1), got '{tol}'")

    def no_data_pass(self, model):
        raise AssertionError("a forward pass ran before the option was checked")

    monkeypatch.setattr(cli_setup.Setup, "check_fit", no_data_pass)
    n = sum(p.numel() for p in fx.model().parameters())
    _usage(["hessian", a, *SPEC, "--top-k", "1000000"], capsys,
           f"--top-k 1000000 is larger than the model's {n} trainable parameters; pass --top-k {n} or less")
    _usage(["sharpness", a, *SPEC, "--m", "100000"], capsys,
           "--m 100000 is larger than the 96 samples of --data; pass --m 96 or less")
    _usage(["sharpness", a, *SPEC, "--m", "60", "--max-samples", "50"], capsys,
           "--m 60 is larger than the 50 samples of --data after --max-samples 50")


def test_default_m_capped_at_small_data_is_said(ckpts, capsys):
    code, out, err = _run(["sharpness", str(ckpts / "a.pt"), *SPEC, "--metric", "worst"], capsys)
    assert code == 0, err
    assert "m=96 (the default 128 capped at the 96 samples; set --m to choose)" in out
    code, out, err = _run(["sharpness", str(ckpts / "a.pt"), *SPEC, "--metric", "worst", "--m", "48"], capsys)
    assert code == 0 and "m=48," in out and "capped" not in out


def test_a_stray_rank_silences_nothing_and_rank_1_of_torchrun_leaves_usage_errors_to_rank_0(
        ckpts, tmp_path, capsys, monkeypatch):
    a = str(ckpts / "a.pt")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "1")  # without the rest of torchrun's variables: not a rank
    code, out, err = _run(["hessian", a, *SPEC, "--tol", "0"], capsys)  # argparse
    assert code == 2 and "--tol" in err and err.count("error:") == 1
    code, out, err = _run(["slice", a, *SPEC, "--out", str(tmp_path / "f.png"), "--range", "1", "0"], capsys)
    assert code == 2 and "error:" in err
    code, out, err = _run(["sharpness", str(tmp_path / "nope.pt"), *SPEC], capsys)
    assert code == 1 and "nope.pt" in err
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun's rank 1, but no MASTER_ADDR: a clear error
    code, out, err = _run(["sharpness", str(tmp_path / "nope.pt"), *SPEC], capsys)
    assert code == 1 and "MASTER_ADDR" in err
    # a complete torchrun environment of rank 1: the same usage error is rank 0's to print
    for name, value in (("LOCAL_RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")):
        monkeypatch.setenv(name, value)
    assert _run(["hessian", a, *SPEC, "--tol", "0"], capsys) == (2, "", "")
    monkeypatch.setenv("RANK", "0")
    assert _run(["hessian", a, *SPEC, "--tol", "0"], capsys)[2].count("error:") == 1


def test_bad_checkpoints_listed_with_reasons_and_the_good_ones_computed(ckpts, tmp_path, capsys):
    """Issue 26 item 6: a truncated checkpoint (a save killed midway) among good ones: the good
    ones are computed and written, the bad ones listed with their reason, exit non-zero."""
    d = tmp_path / "runs"
    d.mkdir()
    shutil.copy(ckpts / "a.pt", d / "a.pt")
    (d / "c.pt").write_bytes((ckpts / "b.pt").read_bytes()[:500])  # truncated copy
    (d / "e.pt").write_bytes(b"")
    js = tmp_path / "s.json"
    code, out, err = _run(["sharpness", str(d), *SPEC, "--metric", "lambda_max", "--json", str(js)], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "landscape sharpness: error: 2 of 3 checkpoints failed (c.pt, e.pt); the others were computed")
    doc = json.loads(js.read_text())
    assert [pathlib.Path(r["checkpoint"]).name for r in doc["checkpoints"]] == ["a.pt"]
    reasons = {pathlib.Path(e["checkpoint"]).name: e["error"] for e in doc["errors"]}
    assert "damaged or truncated zip archive" in reasons["c.pt"] and "is empty" in reasons["e.pt"]
    ref = evaluate(_model(ckpts / "a.pt"), "cross_entropy", _data()).loss
    assert doc["checkpoints"][0]["loss"] == pytest.approx(ref, rel=1e-6)
    assert "c.pt (failed)" in out and "failed: c.pt: " in out


def test_all_bad_checkpoints_refused_up_front_naming_every_file(ckpts, tmp_path, capsys, no_compute):
    d = tmp_path / "runs"
    d.mkdir()
    (d / "c.pt").write_bytes((ckpts / "b.pt").read_bytes()[:500])  # truncated copy
    (d / "e.pt").write_bytes(b"")
    js = tmp_path / "s.json"
    err = _fails(["sharpness", str(d), *SPEC, "--json", str(js)], capsys, "2 of 2 checkpoints cannot be used")
    assert f"{d / 'c.pt'} is a damaged or truncated zip archive" in err
    assert f"{d / 'e.pt'} is empty" in err
    assert not js.exists()


def test_sharpness_mid_run_failure_keeps_results_and_errors(ckpts, tmp_path, capsys):
    from tests.landscape.cli_fixtures import model_wide

    d = tmp_path / "runs"
    d.mkdir()
    shutil.copy(ckpts / "a.pt", d / "a.pt")
    shutil.copy(ckpts / "b.pt", d / "b.pt")
    torch.save(model_wide().state_dict(), d / "c.pt")  # a valid file that does not fit the model
    js = tmp_path / "s.json"
    code, out, err = _run(["sharpness", str(d), *SPEC, "--metric", "lambda_max", "--json", str(js)], capsys)
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("landscape sharpness: error: 1 of 3 checkpoints failed (c.pt)")
    assert "written to --json" in last and "Traceback" not in err
    doc = json.loads(js.read_text())
    assert [pathlib.Path(r["checkpoint"]).name for r in doc["checkpoints"]] == ["a.pt", "b.pt"]
    assert [pathlib.Path(e["checkpoint"]).name for e in doc["errors"]] == ["c.pt"]
    assert "shape mismatches" in doc["errors"][0]["error"]
    ref = evaluate(_model(ckpts / "b.pt"), "cross_entropy", _data()).loss
    assert doc["checkpoints"][1]["loss"] == pytest.approx(ref, rel=1e-6)
    assert "c.pt (failed)" in out


def test_report_mid_run_failure_writes_the_computed_entries(ckpts, tmp_path, capsys):
    from tests.landscape.cli_fixtures import model_wide

    d = tmp_path / "runs"
    d.mkdir()
    shutil.copy(ckpts / "a.pt", d / "a.pt")
    torch.save(model_wide().state_dict(), d / "c.pt")
    out, js = tmp_path / "r.html", tmp_path / "r.json"
    argv = ["report", str(d), *SPEC, "--out", str(out), "--steps-1d", "3", "--steps-2d", "3",
            "--no-density", "--json", str(js)]
    code, _, err = _run(argv, capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(
        "landscape report: error: 1 of 2 checkpoints failed (c.pt); the others were computed and "
        "written to the report and --json")
    page = out.read_text()
    assert "a.pt" in page and "failed: c.pt: " in page
    doc = json.loads(js.read_text())
    assert [c["name"] for c in doc["checkpoints"]] == ["a.pt"]
    assert [pathlib.Path(e["checkpoint"]).name for e in doc["errors"]] == ["c.pt"]
    (d / "a.pt").unlink()
    torch.save(model_wide().state_dict(), d / "e.pt")
    code, _, err = _run(argv, capsys)
    assert code == 1 and "all 2 checkpoints failed; first error: " in err.strip().splitlines()[-1]


def test_missing_and_unexpected_keys_reported(ckpts, tmp_path, capsys):
    sd = fx.trained_state(20)
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(2)
    torch.save(sd, tmp_path / "partial.pt")
    js = tmp_path / "s.json"
    code, out, err = _run(["sharpness", str(tmp_path / "partial.pt"), *SPEC, "--non-strict",
                           "--metric", "lambda_max", "--json", str(js)], capsys)
    assert code == 0, err
    assert "partial.pt *" in out
    assert ("* partial.pt: 1 missing key left as initialized (head.bias); 1 unexpected key ignored "
            "(extra.weight)") in out
    rec = json.loads(js.read_text())["checkpoints"][0]
    assert rec["checkpoint_keys"] == {"missing_keys": ["head.bias"], "unexpected_keys": ["extra.weight"],
                                      "shape_mismatches": []}
    html_out = tmp_path / "r.html"
    code, out, err = _run(["report", str(tmp_path / "partial.pt"), *SPEC, "--non-strict", "--out",
                           str(html_out), "--steps-1d", "3", "--steps-2d", "3", "--no-density",
                           "--json", str(js)], capsys)
    assert code == 0, err
    assert "partial.pt: loaded non-strictly: 1 missing key left as initialized (head.bias)" in html_out.read_text()
    assert json.loads(js.read_text())["checkpoints"][0]["checkpoint_keys"]["unexpected_keys"] == ["extra.weight"]
    # a clean load has no footnote and empty lists
    code, out, err = _run(["hessian", str(ckpts / "b.pt"), *SPEC, "--top-k", "1", "--json", str(js)], capsys)
    assert code == 0 and "*" not in out
    assert json.loads(js.read_text())["checkpoint_keys"]["missing_keys"] == []


def test_cli_defaults_match_the_python_api():
    import argparse

    from landscape.cli import build_parser
    from landscape.defaults import DEFAULTS, python_default

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = set()
    for row in DEFAULTS:
        commands = ["sharpness", "hessian", "slice", "report"] if row.command == "*" else [row.command]
        for cmd in commands:
            action = next(a for a in sub.choices[cmd]._actions if row.option in a.option_strings)
            cli = action.default
            if row.option == "--m":  # None in both: min(value, N) at run time
                from analysis.sharpness.m_sharpness import DEFAULT_M

                assert cli is None and python_default(row) is None and row.value == DEFAULT_M
                continue
            want = list(row.value) if isinstance(row.value, tuple) else row.value
            assert cli == want, (cmd, row.option, cli, want)
            py = python_default(row)
            assert (list(py) if isinstance(py, tuple) else py) == want, (row.function, row.parameter, py)
            seen.add(row.option)
    assert {"--tol", "--top-k", "--steps", "--range", "--radius", "--steps-1d", "--steps-2d"} <= seen


def test_atomic_cli_writers_keep_the_old_file(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from landscape.cli import CLIError
    from landscape.cli.output import save_figure, write_text

    png = tmp_path / "f.png"
    fig = plt.figure()
    save_figure(fig, png)
    before = png.read_bytes()

    def full_disk(self, fname, *a, **k):
        pathlib.Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(fig), "savefig", full_disk)
    with pytest.raises(CLIError, match="No space left"):
        save_figure(plt.figure(), png)
    assert png.read_bytes() == before
    js = tmp_path / "o.json"
    write_text(js, "{}\n")
    monkeypatch.setattr("landscape._atomic.os.replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        write_text(js, '{"new": 1}\n')
    assert js.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "o.json"]


def test_slice_restart_replaces_a_damaged_store(ckpts, tmp_path, capsys):
    store = tmp_path / "g.npz"
    store.write_bytes(b"PK\x03\x04 damaged")
    argv = ["slice", str(ckpts / "a.pt"), *SPEC, "--dims", "2", "--steps", "3", "--out",
            str(tmp_path / "s.png"), "--store", str(store)]
    err = _fails(argv, capsys, f"the landscape store {store} is damaged")
    assert "--restart" in err
    code, _, err = _run([*argv, "--restart"], capsys)
    assert code == 0, err
    code, _, err = _run([*argv, "--json", str(tmp_path / "s.json")], capsys)  # resumes all rows
    assert code == 0 and json.loads((tmp_path / "s.json").read_text())["grid"]["resumed_rows"] == 3
    _usage(["slice", str(ckpts / "a.pt"), *SPEC, "--out", str(tmp_path / "s.png"), "--restart"], capsys,
           "--restart applies to --store")


@pytest.mark.parametrize("typo,hint", [
    (["--topk", "1"], "(did you mean --top-k?)"),
    (["--trce"], "(did you mean --trace?)"),
    (["--top-kk", "1", "--denisty", "d.png"], "(did you mean --top-k for --top-kk, --density for --denisty?)"),
    (["--qiet"], "(did you mean --quiet?)"),  # a shared option of the subcommand
])
def test_a_mistyped_option_gets_the_closest_one(typo, hint, capsys):
    code, out, err = _run(["hessian", "a.pt", *SPEC, *typo], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"unrecognized arguments: {' '.join(typo)} {hint}" in err


def test_an_option_close_to_none_gets_no_suggestion(capsys):
    code, out, err = _run(["hessian", "a.pt", *SPEC, "--zzzz", "1"], capsys)
    assert code == 2 and "landscape hessian: error: unrecognized arguments: --zzzz 1 (see landscape hessian --help)" in err
    assert "did you mean" not in err


def test_a_mistyped_choice_gets_the_closest_one(capsys):
    code, out, err = _run(["hesian", "a.pt"], capsys)
    assert code == 2 and "invalid choice: 'hesian'" in err and "(did you mean 'hessian'?)" in err
    code, out, err = _run(["slice", "a.pt", *SPEC, "--normalization", "filtr", "--out", "s.png"], capsys)
    assert code == 2 and "(did you mean 'filter'?)" in err and len(err.strip().splitlines()) == 1


@pytest.fixture()
def lm_spec(tmp_path):
    from tests.lm_models import lm_model

    spec = tmp_path / "lm_spec.py"
    spec.write_text(
        "from tests.lm_models import lm_model, pad_batch, token_sequences\n"
        "def model():\n"
        "    return lm_model()\n"
        "def tokens():\n"
        "    return pad_batch(token_sequences((5, 3, 4, 5)))\n"
        "def ids():\n"
        "    ids = tokens()['input_ids']\n"
        "    return ids, ids\n")
    torch.save(lm_model().state_dict(), tmp_path / "lm.pt")
    return tmp_path


@pytest.mark.parametrize("data", ["tokens", "ids"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_language_model_under_a_classification_loss_says_use_loss_lm(lm_spec, capsys, loss, data):
    # regression: a raw torch error, and for mse the hint "class labels need cross_entropy"
    spec = lm_spec / "lm_spec.py"
    argv = ["sharpness", str(lm_spec / "lm.pt"), "--model", f"{spec}:model", "--data",
            f"{spec}:{data}", "--loss", loss, "--quiet"]
    err = _fails(argv, capsys, "--loss lm (next-token, shifted) or --loss model_lm (the model "
                               "computes its own loss from labels)")
    assert "language model's (B, T, V) logits" in err and "class labels need" not in err, err
    code, out, err = _run(["hessian", *argv[1:5], f"{spec}:{data}", "--loss", "lm", "--quiet",
                           "--top-k", "1"], capsys)
    assert code == 0 and "eigenvalue" in out, err
