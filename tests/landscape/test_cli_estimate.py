"""The cost estimates the CLI prints before a long run (landscape/cli/estimate.py).

The formulas are compared with what the routines really did: the products counted by the
operators, the forward/backward passes counted by m-sharpness, the forward passes seen by a
hook, and the memory bounds the results report; the hand-written numbers check the formulas.
"""

import json
import re

import numpy as np
import pytest
import torch

from analysis import (
    HessianOperator,
    hessian_trace,
    random_direction,
    sharpness,
    spectral_density,
    top_eigenpairs,
)
from landscape import slice_1d, slice_2d
from landscape.cli import estimate as E
from landscape.cli import main
from tests.landscape import cli_fixtures as fx

FIX = "tests.landscape.cli_fixtures"
SPEC = ["--model", f"{FIX}:model", "--data", f"{FIX}:data"]
N = 123  # trainable parameters of cli_fixtures.model (7*6+6 + 6*6+6 + 2*6 + 6*3+3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("est") / "a.pt"
    torch.save(fx.trained_state(20), path)
    return path


def _spd(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return A @ A.T / n + torch.diag(torch.linspace(0.1, 5.0, n, dtype=torch.float64))


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------
# the formulas against the routines


def test_memory_formulas_by_hand():
    # Lanczos: (max_basis + 3) n itemsize with max_basis = min(n, max(2k + 1, 20))
    assert E.lanczos_cost(1000, 5, 4).memory_bytes == (20 + 3) * 1000 * 4
    assert E.lanczos_cost(1000, 30, 8).memory_bytes == (61 + 3) * 1000 * 8
    assert E.lanczos_cost(1000, 5, 2).memory_bytes == 23 * 1000 * 4  # half: a float32 basis
    assert E.lanczos_cost(15, 5, 8).memory_bytes == (15 + 3) * 15 * 8  # the basis capped at n
    # max_iter products, plus k in one pass for the data-sampling standard errors
    assert E.lanczos_cost(1000, 5, 4).hvps == 305 and E.lanczos_cost(1000, 20, 4).hvps == 620
    assert E.lanczos_cost(1000, 5, 4, data_stderr=False).hvps == 300
    assert E.lanczos_cost(12, 1, 4).hvps == 120 + 1  # at most 10 n, plus k for the SE
    # Hutch++: s = num_matvecs // 3, (s + 4 b) n itemsize; Hutchinson 3 b n itemsize
    assert E.trace_cost(1000, 4, num_matvecs=99, block_size=16).memory_bytes == (33 + 64) * 1000 * 4
    assert E.trace_cost(1000, 8, num_matvecs=40, method="hutchinson", block_size=4).memory_bytes == 96000
    # SLQ: (num_iter + 5) n itemsize per run held at once
    assert E.density_cost(N, 4, num_iter=80, num_runs=10).memory_bytes == 85 * N * 4
    assert E.density_cost(N, 8, num_iter=20, num_runs=6, block_size=3).memory_bytes == 3 * 25 * N * 8
    assert E.slice_cost(N, 4, dims=2, steps=5).memory_bytes == 3 * N * 4


@pytest.mark.parametrize("n,num_matvecs,method,block", [
    (50, 99, "hutch++", None), (50, 30, "hutch++", 4), (20, 99, "hutch++", 5),  # s >= n: 2n
    (50, 17, "hutchinson", 4), (50, 99, "hutchinson", None)])
def test_trace_cost_is_the_products_counted(n, num_matvecs, method, block):
    res = hessian_trace(_spd(n), num_matvecs=num_matvecs, method=method, block_size=block)
    cost = E.trace_cost(n, 8, num_matvecs=num_matvecs, method=method, block_size=block)
    assert cost.exact and cost.hvps == res.num_matvecs
    assert cost.memory_bytes == res.memory_bound_bytes


@pytest.mark.parametrize("method,block", [("hutch++", None), ("hutch++", 5), ("hutchinson", 8)])
def test_trace_cost_data_passes_are_the_blocks_applied(method, block):
    op = HessianOperator(fx.model(), "cross_entropy", fx.data())
    blocks = []
    matmat = op.matmat

    def counted(V):  # one weighted pass over the data per block (HessianOperator.matmat)
        blocks.append(V.shape[1])
        return matmat(V)

    op.matmat = counted
    unit_products = op.unit_products

    def counted_units(V, reduce, **kw):  # the same pass, unit by unit (the data-sampling SE)
        blocks.append(V.shape[1])
        return unit_products(V, reduce, **kw)

    op.unit_products = counted_units
    res = hessian_trace(op, method=method, block_size=block)
    cost = E.trace_cost(N, 4, method=method, block_size=block)
    assert cost.data_passes == len(blocks) and cost.hvps == sum(blocks) == res.num_matvecs
    assert cost.memory_bytes == res.memory_bound_bytes


@pytest.mark.parametrize("n,num_iter,num_runs", [(60, 20, 3), (60, 7, 5), (15, 40, 2)])
def test_density_cost_is_the_products_counted(n, num_iter, num_runs):
    res = spectral_density(_spd(n), num_iter=num_iter, num_runs=num_runs)
    cost = E.density_cost(n, 8, num_iter=num_iter, num_runs=num_runs)
    assert cost.hvps == res.num_matvecs == num_runs * min(num_iter, n)


@pytest.mark.parametrize("k,max_iter", [(1, None), (5, None), (3, 7)])
def test_lanczos_cost_is_an_upper_bound(k, max_iter):
    n = 80
    res = top_eigenpairs(_spd(n), k=k, max_iter=max_iter)
    cost = E.lanczos_cost(n, k, 8, max_iter=max_iter, data_stderr=False)  # a matrix: no data
    assert not cost.exact and 1 <= res.num_matvecs <= cost.hvps
    if max_iter is not None:  # a run that does not converge uses the whole budget
        assert res.num_matvecs == cost.hvps == max_iter
    assert cost.memory_bytes == res.memory_bound_bytes


def test_lanczos_cost_bounds_a_hessian_run():
    model, (x, y) = fx.model(), fx.data()
    res = top_eigenpairs(HessianOperator(model, "cross_entropy", (x, y)), k=2)
    cost = E.lanczos_cost(N, 2, 4)
    assert res.num_matvecs <= cost.hvps and cost.memory_bytes == res.memory_bound_bytes


@pytest.mark.parametrize("kw", [dict(kind="worst", m=32), dict(kind="worst", m=40, steps=5),
                                dict(kind="worst", m=32, init="zero", steps=4),
                                dict(kind="worst", m=48, restarts=2, steps=3),
                                dict(kind="average", m=32, samples=5),
                                dict(kind="worst", m=16, n_eval=50, steps=2)])
def test_m_sharpness_cost_is_the_passes_counted(kw):
    x, y = fx.data()  # 96 samples
    res = sharpness(fx.model(), "cross_entropy", (x, y), rho=0.05, progress=False, **kw)
    cost = E.m_sharpness_cost(96, **kw)
    assert (cost.forward_passes, cost.backward_passes) == (res.forward_passes, res.backward_passes)
    assert cost.forward_passes > 0


@pytest.mark.parametrize("dims,steps", [(1, 7), (2, 4)])
def test_slice_cost_is_the_forward_passes_seen(dims, steps):
    model, data = fx.model(), fx.data()  # one batch: one forward call per pass
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    d1, d2 = random_direction(model, seed=0), random_direction(model, seed=1)
    coords = np.linspace(-1, 1, steps)
    if dims == 1:
        slice_1d(model, "cross_entropy", data, d1, coords, progress=False)
    else:
        slice_2d(model, "cross_entropy", data, d1, d2, coords, coords, progress=False)
    cost = E.slice_cost(N, 4, dims=dims, steps=steps)
    # plus the determinism check: the first batch evaluated twice (analysis.checks)
    assert len(calls) == cost.forward_passes + 2 == steps ** dims + 1 + 2


def test_describe_says_bounds_and_exact_counts():
    line = E.describe(E.lanczos_cost(1000, 5, 4))
    assert line == ("cost estimate: top-5 eigenvalues (Lanczos): <= 305 Hessian-vector products, "
                    "<= 302 data passes, peak extra memory <= 92000 bytes (the max_iter cap; it stops at "
                    "the tolerance, usually far earlier)")
    line = E.describe(E.trace_cost(N, 4, num_matvecs=99, block_size=16), " (each of 2 checkpoints)")
    assert line == ("cost estimate: trace (Hutch++, 99 products): 99 Hessian-vector products, "
                    "9 data passes, peak extra memory 47724 bytes (each of 2 checkpoints)")
    assert "not predicted" in E.describe(E.unknown_cost("epsilon"))


# ---------------------------------------------------------------------------------------------
# the command line: the line on stderr, the JSON field, --quiet


def _lines(err):
    """stderr's lines; a progress bar's carriage returns split lines too."""
    return re.split(r"[\r\n]+", err)


def _estimates(err):
    return [ln for ln in _lines(err) if ln.startswith("cost estimate: ")]


def test_hessian_prints_the_estimate_and_the_counts_agree(ckpt, tmp_path, capsys):
    argv = ["hessian", str(ckpt), *SPEC, "--top-k", "2", "--trace", "--density", str(tmp_path / "d.png"),
            "--density-iter", "12", "--density-runs", "3", "--json", "-"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    doc = json.loads(out)
    lanczos, trace, density = doc["estimate"]
    assert [e["analysis"] for e in doc["estimate"]] == [
        "top-2 eigenvalues (Lanczos)", "trace (Hutch++, 99 products)",
        "spectral density (SLQ, 3 runs x 12 steps)"]
    assert trace["hvps"] == 99 and density["hvps"] == 36 and lanczos["hvps"] == 302
    assert lanczos["memory_bytes"] == (20 + 3) * N * 4 and density["memory_bytes"] == 17 * N * 4
    # one operator served all three: what is left for Lanczos is within its bound
    used_by_lanczos = doc["num_matvecs"] - trace["hvps"] - density["hvps"]
    assert 1 <= used_by_lanczos <= lanczos["hvps"]
    # what each analysis used, beside its estimate (counted by its own operator)
    by = doc["num_matvecs_by_analysis"]
    assert by == {"lanczos": used_by_lanczos, "trace": 99, "density": 36}
    assert [e["used"]["hvps"] for e in doc["estimate"]] == [used_by_lanczos, 99, 36]
    assert all(e["used"]["seconds"] > 0 for e in doc["estimate"])
    used = [ln for ln in _lines(err) if ln.startswith("used: ")]
    assert used[0] == (f"used: top-2 eigenvalues (Lanczos): {used_by_lanczos} Hessian-vector products "
                       f"(estimate <= 302), {doc['estimate'][0]['used']['seconds']:.3g} s")
    assert used[1].startswith("used: trace (Hutch++, 99 products): 99 Hessian-vector products (estimate 99)")
    assert len(used) == 3 and f"Hessian-vector products used: {used_by_lanczos} (Lanczos)" in err
    # time estimates: Lanczos's from a first product timed before it (issue 27), the later ones
    # from the latest analysis's seconds per product
    per0 = doc["first_product"]["product_s"]
    per = doc["estimate"][0]["used"]["seconds"] / used_by_lanczos
    per2 = doc["estimate"][1]["used"]["seconds"] / 99
    times = [ln for ln in _lines(err) if ln.startswith("time estimate: ")]
    assert times.pop(0) == (f"time estimate: top-2 eigenvalues (Lanczos): at most {302 * per0:.3g} "
                            f"s (302 products at {per0:.3g} s each, as measured so far)")
    assert times == [f"time estimate: trace (Hutch++, 99 products): about {99 * per:.3g} s (99 "
                     f"products at {per:.3g} s each, as measured so far)",
                     f"time estimate: spectral density (SLQ, 3 runs x 12 steps): about {36 * per2:.3g} s "
                     f"(36 products at {per2:.3g} s each, as measured so far)"]
    assert err.index(times[0]) < err.index(used[1])
    lines = _estimates(err)
    assert len(lines) == 3 and lines[0].startswith("cost estimate: top-2 eigenvalues (Lanczos): <= 302")
    assert err.index("cost estimate: ") < err.index("top-2 Hessian eigenvalues")  # before the work
    code, out, err = _run([*argv, "--quiet"], capsys)
    quiet = json.loads(out)["estimate"]
    assert code == 0 and _estimates(err) == [] and "\nused: " not in err and "time estimate" not in err

    def drop_used(est):
        return [{k: v for k, v in e.items() if k != "used"} for e in est]

    assert drop_used(quiet) == drop_used(doc["estimate"])


def test_sharpness_estimate_matches_the_recorded_settings(ckpt, capsys):
    code, out, err = _run(["sharpness", str(ckpt), str(ckpt), *SPEC, "--metric", "worst", "--metric",
                           "trace", "--metric", "lambda_max", "--metric", "epsilon", "--m", "32",
                           "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    est = {e["analysis"]: e for e in doc["estimate"]}
    settings = doc["checkpoints"][0]["settings"]
    assert est["trace (Hutch++, 99 products)"]["hvps"] == settings["trace"]["num_matvecs"]
    assert settings["lambda_max"]["num_matvecs"] <= est["lambda_max (Lanczos, k=1)"]["hvps"]
    worst = est["worst"]
    assert worst["forward_passes"] == settings["worst"]["num_batches"] * (settings["worst"]["steps"] + 2)
    assert est["epsilon"]["hvps"] is None and est["epsilon"]["data_passes"] is None
    lines = _estimates(err)
    assert len(lines) == 4 and all(ln.endswith("(each of 2 checkpoints)") for ln in lines)
    # what each checkpoint's run used, beside the estimate
    lam = est["lambda_max (Lanczos, k=1)"]["used"]
    assert [u["hvps"] for u in lam] == [c["settings"]["lambda_max"]["num_matvecs"] for c in doc["checkpoints"]]
    assert [u["hvps"] for u in est["trace (Hutch++, 99 products)"]["used"]] == [99, 99]
    assert [u["num_batches"] for u in worst["used"]] == [settings["worst"]["num_batches"]] * 2
    assert all(u["seconds"] > 0 for e in doc["estimate"] for u in e["used"])
    used = [ln for ln in _lines(err) if ln.startswith("used: ")]
    assert len(used) == 8 and sum(ln.startswith(
        f"used: lambda_max (Lanczos, k=1): {lam[0]['hvps']} Hessian-vector products (estimate <= 301)")
        for ln in used) >= 1


@pytest.mark.parametrize("extra,want", [
    (["--dims", "2", "--steps", "3"], ["2-D slice (3x3 points): 10 forward, 10 data passes"]),
    (["--direction", "gradient", "--steps", "4"],
     ["gradient direction: 1 forward, 1 backward, 1 data pass,", "1-D slice (4 points): 5 forward"])])
def test_slice_prints_the_estimate(ckpt, tmp_path, capsys, extra, want):
    code, out, err = _run(["slice", str(ckpt), *SPEC, *extra, "--out", str(tmp_path / "s.png"),
                           "--json", str(tmp_path / "s.json")], capsys)
    assert code == 0, err
    lines = _estimates(err)
    assert len(lines) == len(want) and all(w in ln for w, ln in zip(want, lines)), lines
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["estimate"][-1]["forward_passes"] == (9 if "--dims" in extra else 4) + 1


def test_report_prints_one_line_per_stage(ckpt, tmp_path, capsys):
    code, out, err = _run(["report", str(ckpt), *SPEC, "--out", str(tmp_path / "r.html"), "--steps-1d", "3",
                           "--steps-2d", "3", "--no-density", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    names = [e["analysis"] for e in json.loads((tmp_path / "r.json").read_text())["estimate"]]
    assert names == ["lambda_max (Lanczos, k=1)", "sharpness (worst)", "1-D slice along random (3 points)",
                     "gradient direction", "1-D slice along gradient (3 points)", "2-D slice (3x3 points)"]
    assert len(_estimates(err)) == len(names)


def test_per_layer_estimate_bounds_the_products_of_each_block(ckpt, capsys):
    code, out, err = _run(["hessian", str(ckpt), *SPEC, "--top-k", "1", "--trace", "--per-layer",
                           "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    lanczos, trace = doc["estimate"][2:]
    assert lanczos["analysis"] == "per-layer top-1 eigenvalues (4 blocks, Lanczos)" and not lanczos["exact"]
    assert trace["analysis"] == "per-layer trace (4 blocks, Hutch++)" and trace["exact"]
    # blocks of 48, 42, 12 and 21 parameters: 2n products (exact) up to 49, else 99
    assert trace["hvps"] == 2 * (48 + 42 + 12 + 21)
    used = sum(layer["num_matvecs"] for layer in doc["per_layer"])
    assert 4 <= used - trace["hvps"] <= lanczos["hvps"]
    assert len(_estimates(err)) == 4
    # products used per block (JSON and table column) and per analysis, beside the estimates
    assert all(la["num_matvecs"] == la["eigen_matvecs"] + la["trace_matvecs"] for la in doc["per_layer"])
    assert trace["used"]["hvps"] == trace["hvps"]
    assert lanczos["used"]["hvps"] == used - trace["hvps"] == sum(la["eigen_matvecs"] for la in doc["per_layer"])
    assert doc["num_matvecs_by_analysis"]["per_layer"] == used
    assert doc["num_matvecs"] == doc["num_matvecs_by_analysis"]["lanczos"] + 99  # whole model, as before
    header = next(ln for ln in _lines(err) if ln.startswith("module"))
    assert header.split()[-1] == "products"
    assert sum(ln.startswith("time estimate: per-layer") for ln in _lines(err)) == 2


def test_hessian_numbers_are_those_of_hessian_summary(ckpt, tmp_path, capsys, monkeypatch):
    """Counting each analysis apart (its own operator) changes no number."""
    from analysis.operators import auto
    from landscape.report import hessian_summary

    # method="auto" keeps the fastest product method by timing, which can differ between the
    # two runs (and the results then at rounding level): equal timings make it pick the same
    monkeypatch.setattr(auto, "_timed", lambda fn, device, **kw: (fn(), 1.0)[1])

    code, out, err = _run(["hessian", str(ckpt), *SPEC, "--top-k", "2", "--trace", "--density",
                           str(tmp_path / "d.png"), "--density-iter", "12", "--density-runs", "3",
                           "--json", "-"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    model = fx.model()
    model.load_state_dict(torch.load(ckpt))
    ref = hessian_summary(model, "cross_entropy", fx.data(), top_k=2, trace=True, density=True,
                          density_iter=12, density_runs=3, seed=0, tol=1e-3)
    # the same products, but the CLI's trace has an operator of its own, whose method is chosen
    # for blocks of columns, and the summary's is chosen for single vectors: the trace's products
    # may take another path (seen on a loaded machine), so they agree to float32 rounding
    assert doc["eigenvalues"] == ref["eigenvalues"] and doc["num_matvecs"] == ref["num_matvecs"]
    assert doc["trace"] == pytest.approx(ref["trace"], rel=1e-6)
    assert doc["trace_stderr"] == pytest.approx(ref["trace_stderr"], rel=1e-5)
    np.testing.assert_allclose(doc["density"]["density"], ref["density"]["density"], rtol=1e-5)


def _unfinish(store, keep):
    """The store file as if the run had been killed after its first ``keep`` rows."""
    with np.load(store, allow_pickle=False) as z:
        arrays = {k: np.array(z[k]) for k in z.files}
    arrays["done"][keep:] = False
    for k in [k for k in arrays if k.startswith("nan_")]:
        arrays[k][keep:] = False
    for m in ("loss", "accuracy"):
        if m in arrays:
            arrays[m][keep:] = np.nan
    with open(store, "wb") as f:
        np.savez(f, **arrays)


def test_slice_resume_says_so_and_estimates_only_the_rows_left(ckpt, tmp_path, capsys):
    store = tmp_path / "g.npz"
    argv = ["slice", str(ckpt), *SPEC, "--dims", "2", "--steps", "4", "--out", str(tmp_path / "s.png"),
            "--store", str(store), "--json", "-"]
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    first = json.loads(out)
    assert first["resumed_rows"] == 0 and "resuming" not in err and "resumed " not in err
    assert first["estimate"][-1]["forward_passes"] == 4 * 4 + 1
    _unfinish(store, 1)
    code, out, err = _run(argv, capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["resumed_rows"] == doc["grid"]["resumed_rows"] == 1
    assert f"resuming {store}: 1 of 4 rows already computed, 3 left" in err
    assert f"resumed 1 of 4 rows from {store}; computed 3" in err
    assert doc["estimate"][-1]["forward_passes"] == 3 * 4 + 1
    assert "2-D slice (4x4 points), 3 of 4 rows left: 13 forward" in err
    np.testing.assert_array_equal(doc["grid"]["loss"], first["grid"]["loss"])
    code, out, err = _run(argv, capsys)  # complete: only the origin is evaluated
    doc = json.loads(out)
    assert code == 0 and doc["resumed_rows"] == 4 and doc["estimate"][-1]["forward_passes"] == 1
    code, out, err = _run([*argv, "--restart"], capsys)  # --restart: everything again
    doc = json.loads(out)
    assert code == 0 and doc["resumed_rows"] == 0 and doc["estimate"][-1]["forward_passes"] == 17


def test_stored_rows_done_reads_a_store_without_changing_it(tmp_path):
    from landscape.store import GridStore, stored_rows_done

    xs, ys = np.linspace(-1, 1, 3), np.linspace(-1, 1, 2)
    path = tmp_path / "g.npz"
    assert stored_rows_done(path, xs, ys) == 0  # no file yet
    store = GridStore(path, {"kind": "test"}, xs, ys, ["loss"])
    store.write_row(1, {"loss": np.array([1.0, 2.0])})
    before = path.read_bytes()
    assert stored_rows_done(path, xs, ys) == 1
    assert stored_rows_done(tmp_path / "g", xs, ys) == 1  # the suffix GridStore adds
    assert stored_rows_done(path, np.linspace(-1, 1, 4), ys) is None  # another grid
    assert stored_rows_done(tmp_path, xs, ys) is None  # a directory: the name needs the fingerprint
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    assert stored_rows_done(tmp_path / "bad.npz", xs, ys) is None
    assert path.read_bytes() == before
