"""Issue 26 item 12: errors that used to be raw torch/numpy errors, late, or misleading are one
clear line naming the value, raised before anything changes."""

from __future__ import annotations

import errno
import os

import pytest
import torch

from analysis import HessianOperator, evaluate, hessian_trace
from tests.models import classification_data, mlp


@pytest.fixture
def xy():
    return classification_data(seed=0)


def test_evaluate_integer_inputs_and_wrong_shape_name_the_batch(xy):
    x, y = xy
    with pytest.raises(ValueError, match=r"evaluate\(\): the forward pass failed on batch 0 "
                                         r"\(inputs int64 \(48, 6\); model parameters float64\)"):
        evaluate(mlp(), "cross_entropy", (x.long(), y))
    with pytest.raises(ValueError, match=r"batch 0 \(inputs float64 \(48, 4\).*shapes cannot be"):
        evaluate(mlp(), "cross_entropy", (x[:, :4], y))


def test_evaluate_labels_out_of_range_after_the_first_batch(xy):
    x, y = xy
    bad = y.clone()
    bad[20:] = 7
    with pytest.raises(ValueError, match=r"the loss failed on batch 1 .*Target 7 is out of bounds"):
        evaluate(mlp(), "cross_entropy", [(x[:16], y[:16]), (x[16:], bad[16:])])


def test_evaluate_meta_model(xy):
    with torch.device("meta"):
        model = mlp()
    with pytest.raises(ValueError, match="meta device"):
        evaluate(model, "cross_entropy", xy)


def test_operator_times_zero_columns_is_an_empty_product(xy):
    model = mlp()
    op = HessianOperator(model, "cross_entropy", xy)
    out = op @ torch.zeros(op.shape[1], 0, dtype=torch.float64)
    assert out.shape == (op.shape[0], 0) and op.num_matvecs == 0


@pytest.mark.parametrize("fn", ["hessian_trace", "spectral_density", "top_eigenpairs"])
def test_seed_that_is_not_an_integer(xy, fn):
    from analysis import spectral_density, top_eigenpairs

    f = {"hessian_trace": hessian_trace, "spectral_density": spectral_density,
         "top_eigenpairs": top_eigenpairs}[fn]
    op = HessianOperator(mlp(), "cross_entropy", xy)
    with pytest.raises(TypeError, match=rf"{fn}\(\): seed must be an integer, got str 'a'"):
        f(op, seed="a")
    assert op.num_matvecs == 0


def test_half_precision_hutchpp_runs_and_agrees_with_float64(xy):
    """fp16 Hutch++ factors its sketch in float32 (no half QR on the CPU): the estimate is the
    float64 one to half precision."""
    x, y = xy
    ref = hessian_trace(HessianOperator(mlp(), "cross_entropy", xy), num_matvecs=42, seed=0)
    half = hessian_trace(HessianOperator(mlp(dtype=torch.float32).half(), "cross_entropy",
                                         (x.half(), y)), num_matvecs=42, seed=0)
    # the same seed draws the same probes: the two estimates differ by rounding only
    assert half.estimate == pytest.approx(ref.estimate, rel=0.05)


def test_protocol_4_and_5_pickles_say_so(tmp_path):
    from landscape import CheckpointError, load_checkpoint

    torch.save(mlp().state_dict(), tmp_path / "p4.pt", pickle_protocol=4,
               _use_new_zipfile_serialization=False)
    torch.save(mlp().state_dict(), tmp_path / "p5.pt", pickle_protocol=5)
    for name in ("p4.pt", "p5.pt"):
        with pytest.raises(CheckpointError, match="a pickle of protocol 4 or 5") as info:
            load_checkpoint(tmp_path / name, mlp(seed=1))
        assert "Unsupported operand" not in str(info.value)


def test_full_disk_names_the_file(tmp_path, monkeypatch):
    import landscape._atomic as atomic_module

    target = tmp_path / "out.json"
    target.write_text("old")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(atomic_module.os, "fsync", full)
    with pytest.raises(OSError, match=rf"cannot write {target}: No space left on device"):
        with atomic_module.atomic_write(target) as f:
            f.write("new")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


FIX = "tests.landscape.cli_fixtures"
SPEC = ["--model", f"{FIX}:model", "--data", f"{FIX}:data", "--quiet"]


@pytest.fixture
def ckpt(tmp_path):
    from tests.landscape import cli_fixtures as fx

    path = tmp_path / "a.pt"
    torch.save(fx.trained_state(5), path)
    return path


@pytest.mark.parametrize("argv, match", [
    (["hessian", "{ck}", "--tol", "2"], "--tol: expected a number in (0, 1), got '2'"),
    (["slice", "{ck}", "--direction", "gradient:extra", "--out", "{out}"],
     "gradient takes no argument"),
])
def test_cli_usage_errors_exit_2(ckpt, tmp_path, capsys, argv, match):
    from landscape.cli import main

    argv = [a.format(ck=ckpt, out=tmp_path / "s.png") for a in argv] + SPEC
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and match in err and "Traceback" not in err, err
