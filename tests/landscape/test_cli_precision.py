"""``--dtype bfloat16`` in the CLI (issue 27, item 3): an early warning naming the dtype and its
floor, Lanczos stops at the precision floor (converged False, the reason in the JSON and the
table) after few products, eigenvalues within the floor of a dense float64 Hessian."""

from __future__ import annotations

import json

import torch

from analysis.reference import dense_hessian
from landscape.cli import main
from tests.landscape import cli_fixtures as fx

FIX = "tests.landscape.cli_fixtures"


def test_hessian_dtype_bfloat16_stops_at_the_floor(tmp_path, capsys):
    torch.save(fx.trained_state(20), tmp_path / "a.pt")
    code = main(["hessian", str(tmp_path / "a.pt"), "--model", f"{FIX}:model", "--data",
                 f"{FIX}:data", "--dtype", "bfloat16", "--top-k", "1",
                 "--json", str(tmp_path / "h.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "--dtype bfloat16" in err and "0.031" in err
    doc = json.loads((tmp_path / "h.json").read_text())
    assert doc["converged"] is False and doc["stop_reason"].startswith("precision floor")
    assert doc["num_matvecs_by_analysis"]["lanczos"] < 60
    assert "precision floor" in out
    model = fx.model().double()
    model.load_state_dict(torch.load(tmp_path / "a.pt", weights_only=True))
    x, y = fx.data()
    top = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", (x.double(), y)))[-1].item()
    assert abs(doc["eigenvalues"][0] - top) <= 0.1 * abs(top)
