"""The CLI's memory check and first-product time estimate (issue 27, item 6): an estimate above
the available memory stops the command before any analysis (unless --no-memory-check); the
products' memory is the one formula of analysis.operators.estimate (method='auto': the larger of
the two methods it compares); the time estimate of Lanczos comes from a first product, which
changes no result."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import analysis.operators.auto as auto
from analysis import HessianOperator, top_eigenpairs
from analysis.operators.estimate import estimate_product_bytes
from landscape.cli import estimate as E
from landscape.cli import main
from landscape.cli.memory import check_memory, product_memory
from tests.landscape import cli_fixtures as fx

FIX = "tests.landscape.cli_fixtures"
SPEC = ["--model", f"{FIX}:model", "--data", f"{FIX}:data"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("mem") / "a.pt"
    torch.save(fx.trained_state(20), path)
    return path


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


N_MLP = 6 * 5 + 5 + 5 * 3 + 3  # 53 float64 parameters


def test_product_memory_by_hand_is_the_analysis_estimate():
    """A: the tanh output (n x 5, saved once for tanh and the second Linear), the log-softmax
    output (n x 3) and the 0-d total weight of nll_loss, float64; inputs and weights excluded.
    'auto' is the larger of forward-over-reverse (2 A + 3 n s) and the cached graph of all
    batches (3 A per batch, scaled by samples, + 2 n s)."""
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    one = product_memory(_mlp(), "cross_entropy", (x, y))
    a = 40 * (5 + 3) * 8 + 8
    assert one.activation_bytes == a
    assert one.product_bytes == max(2 * a + 3 * N_MLP * 8, 3 * a + 2 * N_MLP * 8)
    two = product_memory(_mlp(), "cross_entropy", [(x[:30], y[:30]), (x[30:], y[30:])])
    a = 30 * 8 * 8 + 8
    assert two.activation_bytes == a and two.all_activation_bytes == int(a * 40 / 30)
    assert two.chosen == "cached-graph"
    assert two.product_bytes == 3 * int(a * 40 / 30) + 2 * N_MLP * 8
    same = estimate_product_bytes(_mlp(), "cross_entropy", [(x[:30], y[:30]), (x[30:], y[30:])])
    assert same.to_dict() == two.to_dict()  # one formula: the CLI's is the analysis's


def test_check_memory_refuses_with_both_numbers_and_allows_the_override():
    x, y = torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))
    costs = [E.lanczos_cost(53, 1, 8)]
    lines = []
    need = costs[0].memory_bytes + product_memory(_mlp(), "cross_entropy", (x, y)).product_bytes
    ok = check_memory(costs, _mlp(), "cross_entropy", (x, y), log=lines.append, available=need)
    assert ok.fits and ok.peak_bytes == need
    from landscape.cli import CLIError

    with pytest.raises(CLIError, match=r"exceeds .* available .*--no-memory-check"):
        check_memory(costs, _mlp(), "cross_entropy", (x, y), log=lines.append,
                     available=need - 1)
    over = check_memory(costs, _mlp(), "cross_entropy", (x, y), log=lines.append,
                        available=need - 1, ignore=True)
    assert not over.fits
    assert any("method='auto'" in line for line in lines)


def test_cli_refuses_before_any_analysis_when_memory_is_short(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(auto, "available_bytes", lambda device: 1000)
    code = main(["hessian", str(ckpt), *SPEC, "--top-k", "1"])
    _, err = capsys.readouterr()
    assert code == 1
    assert "exceeds" in err and "--no-memory-check" in err
    assert "first product" not in err and "used:" not in err  # nothing started
    code = main(["hessian", str(ckpt), *SPEC, "--top-k", "1", "--no-memory-check",
                 "--json", str(tmp_path / "h.json")])
    _, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["memory_check"]["fits"] is False and doc["memory_check"]["available_bytes"] == 1000


def test_lanczos_time_estimate_from_a_first_product_that_changes_no_result(ckpt, tmp_path, capsys):
    code = main(["hessian", str(ckpt), *SPEC, "--top-k", "2", "--tol", "1e-6",
                 "--json", str(tmp_path / "h.json")])
    _, err = capsys.readouterr()
    assert code == 0, err
    lines = err.splitlines()
    first = next(i for i, s in enumerate(lines) if s.startswith("first product:"))
    est = next(i for i, s in enumerate(lines) if s.startswith("time estimate: top-2"))
    used = next(i for i, s in enumerate(lines) if s.startswith("used: top-2"))
    assert first < est < used
    doc = json.loads((tmp_path / "h.json").read_text())
    model = fx.model()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    ref = top_eigenpairs(HessianOperator(model, "cross_entropy", fx.data()), k=2, tol=1e-6, seed=0)
    assert doc["num_matvecs_by_analysis"]["lanczos"] == ref.num_matvecs
    torch.testing.assert_close(torch.tensor(doc["eigenvalues"], dtype=torch.float64),
                               ref.eigenvalues.double(), rtol=1e-6, atol=0)
    assert doc["first_product"]["product_s"] > 0


@pytest.mark.parametrize("argv", [
    pytest.param(["sharpness", "{ckpt}", *SPEC, "--metric", "lambda_max"], id="sharpness"),
    pytest.param(["slice", "{ckpt}", *SPEC, "--out", "{out}/s.png", "--steps", "3"], id="slice"),
    pytest.param(["report", "{ckpt}", *SPEC, "--out", "{out}/r.html"], id="report"),
])
def test_every_analysis_command_refuses_before_any_analysis(argv, ckpt, tmp_path, capsys,
                                                            monkeypatch):
    monkeypatch.setattr(auto, "available_bytes", lambda device: 100)
    code = main([a.format(ckpt=ckpt, out=tmp_path) for a in argv])
    _, err = capsys.readouterr()
    assert code == 1, err
    assert "exceeds the 100 bytes available" in err and "--no-memory-check" in err
    assert not list(tmp_path.iterdir())  # nothing written
