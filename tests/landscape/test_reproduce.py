"""Tests of landscape.reproduce: every experiment in quick mode, and the pieces against references."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import momentum_direction
from landscape import reproduce as R
from landscape.reproduce.runs import _cosine_lr


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is faster and avoids oversubscription on shared CPUs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def quick():
    config = R.ReproConfig.quick()
    problem = R.digits_problem(config)
    cache = R.RunCache(problem, config, eager_probes=True)
    return config, problem, cache


# ------------------------------------------------------------------------------------------------
# every experiment in quick mode writes a valid JSON and a figure
# ------------------------------------------------------------------------------------------------
ORDER = ["curvature", "table", "cosine", "rho-sweep", "angle", "directions", "eigenvalues"]
VERDICTS = {"reproduced", "not reproduced", "inconclusive", "partly reproduced"}


@pytest.fixture(scope="module")
def quick_results(quick, tmp_path_factory):
    config, problem, cache = quick
    out = tmp_path_factory.mktemp("repro")
    results = {name: R.run_experiment(name, config, problem=problem, out=out, cache=cache)
               for name in ORDER}
    return out, results


@pytest.mark.parametrize("name", ORDER)
def test_quick_experiment_writes_json_and_figure(quick_results, name):
    out, results = quick_results
    res = results[name]
    assert res.experiment == name and res.verdict in VERDICTS
    doc = json.loads((out / f"{name}.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert doc == json.loads(json.dumps(res.to_dict()))  # the JSON is the returned result
    assert doc["verdict"] == res.verdict
    assert doc["config"]["smoke"] is True
    assert doc["command"].startswith(f"landscape reproduce {name} --quick")
    pngs = [f for f in doc["files"] if f.endswith(".png")]
    assert pngs, "no figure recorded"
    for f in pngs:
        with open(f, "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert res.ours and res.paper and res.rule


def test_quick_numbers_are_sane(quick_results, quick):
    _, results = quick_results
    config = quick[0]
    rows = results["table"].data["rows"]
    assert set(rows) == set(R.OPTIMIZERS)
    for r in rows.values():
        assert len(r["test_acc"]) == config.seeds
        assert all(0.0 <= a <= 1.0 for a in r["test_acc"] + r["train_acc"])
        assert all(t > 0 for t in r["seconds_per_epoch"])
    assert rows["SGD"]["speed_vs_sgd"] == pytest.approx(1.0)
    cos = results["cosine"].data["series"]["SGD"][0]
    assert len(cos) == config.epochs * math.ceil(192 / config.batch_size) - 1  # v_0 = 0: no cos
    assert all(-1.0 - 1e-6 <= c <= 1.0 + 1e-6 for c in cos)
    eig = results["eigenvalues"].data["eigenvalues"]
    for vals in eig.values():
        assert len(vals[0]) == config.top_k
        assert vals[0] == sorted(vals[0], reverse=True)
    angle = results["angle"].data
    assert len(angle["mean_angle"]) == len(config.angle_rhos)
    assert angle["mean_angle"][0] > 0  # rho = 0: g_MSAM = g_SGD lies on the g_SGD side
    curv = results["curvature"].data["rows"]
    assert all(len(row) == 4 for rows_ in curv.values() for row in rows_)
    assert curv["SGD"][0][0] == 1  # first probe after step 1


def _recomputed_verdict(name, data):
    """The experiment's rule (its module's decide) applied to the numbers it recorded."""
    from landscape.reproduce import (
        angle,
        cosine,
        curvature,
        directions,
        eigenvalues,
        rho_sweep,
        table,
    )

    if name == "table":
        overall, parts = table.decide(data["rows"])
        assert parts == data["verdicts"]
        return overall
    if name == "cosine":
        ps = data["per_seed"]
        return cosine.decide([p["fraction_negative"] for p in ps],
                             [p["mean_first_half"] for p in ps], [p["mean_last_10pct"] for p in ps])
    return {"rho-sweep": lambda: rho_sweep.decide(data["points"]),
            "angle": lambda: angle.decide(data["rho_0"], data["best_rho"]),
            "directions": lambda: directions.decide(data["sharpness"]),
            "eigenvalues": lambda: eigenvalues.decide(data["lambda_1"]),
            "curvature": lambda: curvature.decide(data["mean"])}[name]()


@pytest.mark.parametrize("name", ORDER)
def test_recorded_verdict_is_the_rule_on_the_recorded_numbers(quick_results, name):
    _, results = quick_results
    res = results[name]
    assert res.verdict == _recomputed_verdict(name, res.data)
    assert res.rule == R._RULES[name]


def test_markdown_report(quick_results, tmp_path):
    out, results = quick_results
    md = R.render_markdown(list(results.values()))
    for name in ORDER:
        assert f"| {name} |" in md and f"### {name}:" in md
    path = R.write_report(out, tmp_path / "docs" / "REPRODUCTION.md")
    text = path.read_text()
    assert "SMOKE RUN" in text
    assert text.count("![") == sum(len([f for f in r.files if f.endswith(".png")])
                                   for r in results.values())
    # figure links are relative to the markdown file and point at existing files
    for line in text.splitlines():
        if line.startswith("!["):
            rel = line[line.index("(") + 1:-1]
            assert (path.parent / rel).exists(), rel
    assert "## Discussion" not in text
    (out / "NOTES.md").write_text("hand-written caveat\n")
    text = R.write_report(out, tmp_path / "R2.md").read_text()
    assert "## Discussion" in text and "hand-written caveat" in text
    (out / "NOTES.md").unlink()
    with pytest.raises(ValueError, match="no experiment JSONs"):
        R.write_report(tmp_path / "empty", tmp_path / "x.md")


# ------------------------------------------------------------------------------------------------
# the training loop against an independent hand-written loop
# ------------------------------------------------------------------------------------------------
def _tiny_problem(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)

    def model_fn(s):
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    return R.Problem(model_fn, (x, y), (x[:16], y[:16]), name="tiny"), x, y


def _config(**kw):
    base = dict(epochs=3, batch_size=16, lr=0.2, momentum=0.9, weight_decay=1e-3, seeds=1,
                sweep_seeds=1, dtype="float64", curvature_every=2, probe_samples=32,
                angle_rhos=(0.0, 0.5, 2.0), angle_batches=2)
    base.update(kw)
    return R.ReproConfig(**base)


def test_sgd_run_matches_hand_written_loop():
    problem, x, y = _tiny_problem()
    config = _config()
    run = R.train_run(problem, R.optimizer_specs(config)["SGD"], 3, config)
    # reference: plain torch SGD, same init, same batch order, cosine lr per step
    torch.manual_seed(3)
    model = problem.model_fn(3).double()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=0.9, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(10_000 + 3)
    total, step, cos = config.epochs * 3, 0, []
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 16):
            idx = perm[i:i + 16]
            for group in opt.param_groups:
                group["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(model(x[idx].double()), y[idx]).backward()
            if step > 0:
                v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
                g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                cos.append(float(v @ g / (v.norm() * g.norm())))
            opt.step()
            step += 1
    for a, b in zip(run.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(run.history["cos"], cos, rtol=1e-10, atol=1e-12)
    assert len(run.history["epoch_seconds"]) == config.epochs
    with torch.no_grad():
        acc = float((model(x[:16].double()).argmax(1) == y[:16]).double().mean())
    assert run.final["test_acc"] == pytest.approx(acc)


def test_sam_run_matches_hand_written_two_pass_loop():
    """SAM through train_run (SAM.step via landscape.train_step) is the hand-written
    first_step / second pass with BatchNorm frozen / second_step loop, bit for bit."""
    from msam import SAM, frozen_batchnorm_stats

    x, y = _tiny_problem()[1:]

    def model_fn(s):
        torch.manual_seed(s)
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    problem = R.Problem(model_fn, (x, y), (x[:16], y[:16]), name="tiny-bn")
    config = _config(rho_sam=0.1)
    run = R.train_run(problem, R.optimizer_specs(config)["SAM"], 4, config)
    model = model_fn(4).double()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=config.lr, momentum=0.9,
              weight_decay=1e-3)
    gen = torch.Generator().manual_seed(10_000 + 4)
    total, step, cos = config.epochs * 3, 0, []
    for _ in range(config.epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 16):
            idx = perm[i:i + 16]
            xb, yb = x[idx].double(), y[idx]
            for group in opt.param_groups:
                group["lr"] = 0.5 * config.lr * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            if step > 0:  # cos(v, g) with g the gradient at w (before the ascent)
                v = torch.cat([opt.base_optimizer.state[p]["momentum_buffer"].reshape(-1)
                               for p in model.parameters()])
                g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
                cos.append(float(v @ g / (v.norm() * g.norm())))
            opt.first_step(zero_grad=True)
            with frozen_batchnorm_stats(model):
                F.cross_entropy(model(xb), yb).backward()
            opt.second_step(zero_grad=True)
            step += 1
    for a, b in zip(run.model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    np.testing.assert_allclose(run.history["cos"], cos, rtol=1e-10, atol=1e-12)


def test_msam_rho_zero_is_sgd_and_probes_do_not_change_the_run():
    problem, _, _ = _tiny_problem()
    config = _config()
    sgd = R.train_run(problem, R.optimizer_specs(config)["SGD"], 1, config)
    msam0 = R.train_run(problem, R.OptimizerSpec("m0", "msam", rho=0.0), 1, config)
    for a, b in zip(sgd.model.parameters(), msam0.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    spec = R.optimizer_specs(config)["MSAM"]
    plain = R.train_run(problem, spec, 1, config)
    probed = R.train_run(problem, spec, 1, config, curvature=True, angles=True)
    for a, b in zip(plain.model.parameters(), probed.model.parameters()):
        assert torch.equal(a, b)
    assert plain.history["cos"] == probed.history["cos"]
    # curvature rows at step 1 and every 2 steps; angle rows on 2 steps from mid-training
    assert [r[0] for r in probed.history["curvature"]] == [1, 2, 4, 6, 8]
    assert len(probed.history["angles"]) == 2


def test_msam_run_is_evaluated_at_the_unperturbed_point():
    problem, _, _ = _tiny_problem()
    config = _config(weight_decay=0.0)
    run = R.train_run(problem, R.optimizer_specs(config)["MSAM"], 0, config)
    assert run.optimizer.is_perturbed is False
    run.optimizer.train()  # back to w~ = w - rho v / ||v||
    v = momentum_direction(run.optimizer, run.model)
    w_tilde = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()])
    run.optimizer.eval()
    w = torch.cat([p.detach().reshape(-1) for p in run.model.parameters()])
    torch.testing.assert_close(w - w_tilde, config.rho_msam * v / v.norm(), rtol=1e-9, atol=1e-12)


def test_build_optimizer_ladder_end_is_nag():
    """The ladder's last step (unnormalized, lr-scaled, rho = mu) is NAG exactly."""
    problem, x, y = _tiny_problem()
    config = _config()
    a = R.train_run(problem, R.optimizer_specs(config)["NAG"], 2, config)
    b = R.train_run(problem, R.OptimizerSpec("ladder", "msam", rho=config.momentum,
                                             normalize=False, scale_by_lr=True), 2, config)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_experiments_use_the_cache_they_are_given_even_when_empty():
    problem, _, _ = _tiny_problem()
    config = _config(epochs=1)
    cache = R.RunCache(problem, config)
    assert len(cache) == 0
    R.run_table(config, problem=problem, cache=cache, optimizers=["SGD", "MSAM"])
    assert len(cache) == 2
    R.run_cosine(config, problem=problem, cache=cache)  # SGD and MSAM: nothing new to train
    assert len(cache) == 2


def test_run_cache_reuses_and_upgrades():
    problem, _, _ = _tiny_problem()
    config = _config(epochs=1)
    cache = R.RunCache(problem, config)
    spec = R.optimizer_specs(config)["SGD"]
    r1 = cache.get(spec, 0)
    assert cache.get(spec, 0) is r1 and len(cache) == 1
    r2 = cache.get(spec, 0, curvature=True)
    assert r2 is not r1 and r2.history["curvature"] and not r2.history["angles"]
    assert cache.get(spec, 0) is r2 and cache.get(spec, 0, curvature=True) is r2
    r3 = cache.get(spec, 0, angles=True)  # retrained with the union of the probes
    assert r3.history["curvature"] and r3.history["angles"]
    assert cache.get(spec, 0, curvature=True, angles=True) is r3
    for a, b in zip(r1.model.parameters(), r3.model.parameters()):
        assert torch.equal(a, b)  # probes never change the run


# ------------------------------------------------------------------------------------------------
# helpers, validation, CLI
# ------------------------------------------------------------------------------------------------
def test_experiment_names_agree():
    """The registry, the order run_all uses and the order load_results reads are one set."""
    from landscape.reproduce.driver import _ORDER
    from landscape.reproduce.results import EXPERIMENT_NAMES

    assert tuple(R.EXPERIMENTS) == EXPERIMENT_NAMES
    assert sorted(_ORDER) == sorted(EXPERIMENT_NAMES) and len(_ORDER) == len(EXPERIMENT_NAMES)
    assert _ORDER.index("rho-sweep") < _ORDER.index("angle")  # angle reads the sweep's best rho


def test_cosine_lr_by_hand():
    assert _cosine_lr(0.1, 0, 10) == pytest.approx(0.1)
    assert _cosine_lr(0.1, 5, 10) == pytest.approx(0.05)
    assert _cosine_lr(0.1, 10, 10) == pytest.approx(0.0)
    assert _cosine_lr(0.1, 0, 0) == pytest.approx(0.1)  # no division by zero


def test_config_and_problem_validation():
    with pytest.raises(ValueError, match="epochs"):
        R.ReproConfig(epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        R.ReproConfig(momentum=1.0)
    with pytest.raises(ValueError, match="dtype"):
        R.ReproConfig(dtype="float16")
    with pytest.raises(ValueError, match="angle_rhos"):
        R.ReproConfig(angle_rhos=(1.0, 2.0))
    assert R.ReproConfig(seeds=1, sweep_seeds=3).sweep_seeds == 1
    with pytest.raises(TypeError, match="model_fn"):
        R.Problem(None, (torch.zeros(2, 3), torch.zeros(2)), (torch.zeros(2, 3), torch.zeros(2)))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    p = R.Problem(lambda s: nn.Linear(6, 3), loader, (x, y))
    with pytest.raises(ValueError, match="probe is required"):
        p.probe_data(R.ReproConfig())
    with pytest.raises(ValueError, match="unknown experiment"):
        R.run_experiment("nope")
    with pytest.raises(ValueError, match="unknown optimizer"):
        R.run_table(_config(), problem=_tiny_problem()[0], optimizers=["SGD", "Adam"])


def test_dataloader_problem_trains():
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    problem = R.Problem(lambda s: nn.Sequential(nn.Linear(6, 3)), loader, (x, y), probe=(x, y))
    run = R.train_run(problem, R.optimizer_specs(_config())["MSAM"], 0, _config(epochs=2),
                      curvature=True)
    assert len(run.history["cos"]) == 2 * 4 - 1
    assert run.history["curvature"]


def test_cli(tmp_path, capsys):
    from landscape.cli import main

    assert main(["reproduce", "nope", "--quick", "--out", str(tmp_path)]) == 2
    assert main(["reproduce", "report", "--out", str(tmp_path)]) == 2  # needs --markdown
    assert main(["reproduce", "report", "--out", str(tmp_path / "none"),
                 "--markdown", str(tmp_path / "R.md")]) == 1  # nothing to render
    assert main(["reproduce", "cosine", "--quick", "--quiet", "--out", str(tmp_path),
                 "--markdown", str(tmp_path / "R.md"), "--json", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "cosine.json").exists() and (tmp_path / "cosine.png").exists()
    assert "| cosine |" in (tmp_path / "R.md").read_text()
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["results"][0]["experiment"] == "cosine"
    assert "| cosine |" in capsys.readouterr().out


def test_library_does_not_import_the_cli():
    """landscape.reproduce and landscape.demo stand without the command line (which imports
    them): importing them in a fresh interpreter loads no landscape.cli module."""
    import subprocess
    import sys

    code = ("import sys, landscape.reproduce, landscape.demo, landscape.training; "
            "print(sorted(m for m in sys.modules if m.startswith('landscape.cli')))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
