"""``torchrun --nproc_per_node 2 -m landscape hessian ...``: sharded, same numbers, rank 0 writes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import workers
from tests.distributed.launcher import run_ranks

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_cli_hessian_under_torchrun(tmp_path, monkeypatch):
    from landscape.cli import main

    model, _, _ = workers.classification_problem()
    ckpt = tmp_path / "model.pt"
    torch.save(model.state_dict(), ckpt)
    two = tmp_path / "two.json"
    out = run_ranks(workers.cli_hessian, 2, (str(ckpt), str(two)), torchrun_env=True,
                    deadline=170)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    one = tmp_path / "one.json"
    assert main(["hessian", str(ckpt), "--model", "tests.distributed.cli_net:build",
                 "--data", "tests.distributed.cli_net:data", "--batch-size", str(workers.BATCH),
                 "--dtype", "float64", "--top-k", "3", "--tol", "1e-8", "--json", str(one),
                 "--quiet"]) == 0
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert [o.value["code"] for o in out] == [0, 0]
    assert out[0].value["stdout"].strip()          # rank 0 prints the table
    assert out[1].value["stdout"] == ""            # rank 1 prints nothing
    assert not any(o.value["initialized_after"] for o in out)  # the group was shut down
    assert b["eigenvalues"] == pytest.approx(a["eigenvalues"], rel=1e-8)
    assert b["num_matvecs"] == a["num_matvecs"]
