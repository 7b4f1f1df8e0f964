"""``torchrun --nproc_per_node 2 -m landscape hessian|sharpness|slice ... --fsdp`` on 2 gloo ranks:
the one-process numbers (and the dense float64 Hessian's), rank 0 alone prints and writes, and
the induced failures name their cause, exit non-zero and do not hang."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.distributed import fsdp_cli_workers as W
from tests.distributed.fsdp_cli_net import BATCH, BlockNet, ScalarNet
from tests.distributed.launcher import run_ranks

TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def ckpt(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(BlockNet().state_dict(), path)
    return path


def _one_process(monkeypatch, argv: list[str]) -> int:
    from landscape.cli import main

    for name in TORCHRUN:
        monkeypatch.delenv(name, raising=False)
    return main(argv)


def _common(ckpt) -> list[str]:
    return [str(ckpt), *W.NET, "--batch-size", str(BATCH), "--quiet"]


# ------------------------------------------------------------------- one process, no ranks


def test_shard_policy_blocks_then_root():
    from landscape.cli.fsdp import shard_policy

    net = BlockNet()
    assert shard_policy(net) == [*net.blocks, net]
    plain = torch.nn.Linear(3, 2)
    assert shard_policy(plain) == [plain]


def test_shard_policy_hugging_face_gpt2_layers():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=3, n_embd=8, n_head=2, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(cfg)
    from landscape.cli.fsdp import shard_policy

    assert shard_policy(model) == [*model.transformer.h, model]


@pytest.mark.parametrize("argv,needle", [
    (["hessian", "--fsdp"], "--fsdp shards the model over torchrun's processes"),
    (["sharpness", "--fsdp", "--metric", "worst"], "--fsdp runs the metrics lambda_max, trace"),
    (["slice", "--fsdp", "--direction", "gradient", "--out", "x.png"],
     "--fsdp slices along --direction random"),
])
def test_fsdp_usage_errors_without_torchrun(monkeypatch, capsys, ckpt, argv, needle):
    """--fsdp outside torchrun, a metric or direction the shards cannot compute: exit 2, the
    cause on stderr."""
    monkeypatch.chdir(ckpt.parent)
    assert _one_process(monkeypatch, [argv[0], *_common(ckpt), *argv[1:]]) == 2
    assert needle in capsys.readouterr().err


# ------------------------------------------------------------------- 2 gloo ranks


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fsdp_cli_equals_one_process(tmp_path, monkeypatch, ckpt):
    """hessian (top-2, tol 1e-8), sharpness (loss, accuracy, lambda_max) and a 1-D random slice with
    --fsdp on 2 ranks against one process and the dense float64 Hessian."""
    from analysis.reference import dense_hessian
    from tests.distributed.fsdp_cli_net import data

    common = _common(ckpt)
    hess = ["hessian", *common, "--top-k", "2", "--tol", "1e-8"]
    sharp = ["sharpness", *common, "--metric", "lambda_max"]  # the sharded trace: test_fsdp_analysis
    line = ["slice", *common, "--steps", "5", "--range", "-0.5", "0.5"]
    runs = [[*(a for a in hess if a != "--quiet"), "--fsdp", "--json", str(tmp_path / "h2.json")],
            [*sharp, "--fsdp", "--json", str(tmp_path / "s2.json")],
            [*line, "--fsdp", "--out", str(tmp_path / "l2.png"), "--json", str(tmp_path / "l2.json")]]
    # one spawn per command, as torchrun: a second process group in the same processes was
    # seen to hang in init_process_group (the previous group's store)
    per_run = [[o.value[0] for o in run_ranks(W.cli_runs, 2, ([argv],), torchrun_env=True,
                                              deadline=170)] for argv in runs]
    for rank0, rank1 in per_run:
        assert [rank0["code"], rank1["code"]] == [0, 0], (rank0["stderr"], rank1["stderr"])
        assert not rank0["initialized_after"] and not rank1["initialized_after"]
        assert rank0["stdout"].strip() and rank1["stdout"] == ""  # rank 0 alone prints

    # the hessian run logs (no --quiet): freed FSDP2 buffers must leave the resident set
    assert "glibc's mmap threshold fixed at 1 MiB" in per_run[0][0]["stderr"], per_run[0][0]
    assert _one_process(monkeypatch, [*hess, "--json", str(tmp_path / "h1.json")]) == 0
    assert _one_process(monkeypatch, [*sharp, "--json", str(tmp_path / "s1.json")]) == 0
    assert _one_process(monkeypatch, [*line, "--out", str(tmp_path / "l1.png"),
                                      "--json", str(tmp_path / "l1.json")]) == 0
    h1, h2 = (json.loads((tmp_path / f"h{i}.json").read_text()) for i in (1, 2))
    model = BlockNet()
    model.load_state_dict(torch.load(ckpt))
    exact = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", data(),
                                                batch_size=BATCH)).flip(0)[:2]
    # finite differences in float64: products within ~1e-10 relative, Lanczos to 1e-8
    assert h2["eigenvalues"] == pytest.approx(exact.tolist(), rel=1e-7)
    assert h2["eigenvalues"] == pytest.approx(h1["eigenvalues"], rel=1e-7)
    assert h2["first_product"]["method"] == "finite-difference"

    s1, s2 = (json.loads((tmp_path / f"s{i}.json").read_text())["checkpoints"][0]
              for i in (1, 2))
    assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-12)
    assert s2["accuracy"] == s1["accuracy"]
    # lambda_max at the default tol (1e-3) of each run
    assert s2["metrics"]["lambda_max"] == pytest.approx(float(exact[0]), rel=1e-3)
    assert s1["metrics"]["lambda_max"] == pytest.approx(float(exact[0]), rel=1e-3)

    l1, l2 = (json.loads((tmp_path / f"l{i}.json").read_text()) for i in (1, 2))
    np.testing.assert_allclose(l2["grid"]["loss"], l1["grid"]["loss"], rtol=1e-12)
    assert l2["directions"][0]["norm"] == pytest.approx(l1["directions"][0]["norm"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_fsdp_cli_failures_surface(tmp_path, ckpt):
    """A model fully_shard refuses (a scalar parameter) and a slice whose batches split unevenly
    over the ranks: every rank exits non-zero, rank 0's stderr names the cause, no hang (one
    spawn each: after a failure the ranks leave the group unsynchronized, as separate torchrun
    runs would)."""
    scalar = tmp_path / "scalar.pt"
    torch.save(ScalarNet().state_dict(), scalar)
    refused = [o.value[0] for o in run_ranks(W.cli_runs, 2, ([[
        "hessian", str(scalar), "--model", "tests.distributed.fsdp_cli_net:build_scalar",
        "--data", "tests.distributed.fsdp_cli_net:data", "--batch-size", str(BATCH), "--quiet",
        "--fsdp"]],), torchrun_env=True, deadline=120)]
    uneven = [o.value[0] for o in run_ranks(W.cli_runs, 2, ([[
        "slice", *_common(ckpt), "--batch-size", "16", "--fsdp", "--out",
        str(tmp_path / "x.png")]],), torchrun_env=True, deadline=120)]
    assert [r["code"] for r in refused] == [1, 1]
    err = refused[0]["stderr"]
    assert "sharding the model with FSDP2 (--fsdp) failed on ranks 0, 1" in err, err
    assert "fully_shard cannot shard ScalarNet" in err and "scalar parameters" in err, err
    assert [r["code"] for r in uneven] == [2, 2]
    err = uneven[0]["stderr"]
    assert "checking the batches per rank failed on rank 0" in err, err
    assert "split unevenly (rank 0: 2, rank 1: 1)" in err, err
    assert refused[1]["stderr"] == uneven[1]["stderr"] == ""  # said once, by rank 0
    assert not any(r["initialized_after"] for r in refused + uneven)
