"""recalibrate_batchnorm and frozen_batchnorm_stats."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from msam import frozen_batchnorm_stats, recalibrate_batchnorm
from tests.models import cnn_bn, image_data, mlp


def reference_stats(model, x, batch_size):
    """Size-weighted average of per-batch BN input statistics, computed by hand."""
    feats = []
    hook = model[1].register_forward_pre_hook(lambda m, inp: feats.append(inp[0].detach()))
    model.eval()
    with torch.no_grad():
        for xb in x.split(batch_size):
            model(xb)
    hook.remove()
    n = x.shape[0]
    mean = sum(f.shape[0] * f.mean(dim=(0, 2, 3)) for f in feats) / n
    var = sum(f.shape[0] * f.var(dim=(0, 2, 3), unbiased=True) for f in feats) / n
    return mean, var


@pytest.mark.parametrize("form", ["pair", "batches", "loader"])
def test_recalibrate_is_size_weighted_average(form):
    model = cnn_bn()
    x, y = image_data(n=23)
    mean, var = reference_stats(model, x, 8)
    model[1].momentum = 0.3
    model.train()
    model[3].train(False)  # a submodule in a different mode must keep it
    if form == "pair":
        data = (x, y)
    elif form == "batches":
        data = list(zip(x.split(8), y.split(8)))
    else:
        data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    recalibrate_batchnorm(model, data, batch_size=8)
    torch.testing.assert_close(model[1].running_mean, mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model[1].running_var, var, rtol=1e-12, atol=1e-14)
    assert model[1].momentum == 0.3
    assert model.training and model[1].training and not model[3].training
    assert int(model[1].num_batches_tracked) == 3


def test_recalibrate_casts_inputs_and_limits_batches():
    model = cnn_bn()
    x, _ = image_data(n=24, dtype=torch.float32)
    mean, _ = reference_stats(model, x.double(), 8)
    recalibrate_batchnorm(model, x, batch_size=8, max_batches=1)
    first, _ = reference_stats(model, x[:8].double(), 8)
    torch.testing.assert_close(model[1].running_mean, first, rtol=1e-6, atol=1e-7)


def test_recalibrate_without_batchnorm_is_noop_and_bad_input():
    model = mlp()
    assert recalibrate_batchnorm(model, torch.zeros(4, 6, dtype=torch.float64)) is model
    with pytest.raises(TypeError, match="nn.Module"):
        recalibrate_batchnorm("model", [])
    with pytest.raises(ValueError, match="batch_size: 0"):
        recalibrate_batchnorm(cnn_bn(), image_data(), batch_size=0)
    with pytest.raises(ValueError, match="no data"):
        recalibrate_batchnorm(cnn_bn(), [])
    with pytest.raises(TypeError, match="DataLoader, got int"):
        recalibrate_batchnorm(cnn_bn(), 3)


def test_frozen_stats_train_mode_forward_is_unchanged_and_stats_kept():
    model = cnn_bn()
    model.train()
    x, _ = image_data()
    bn = model[1]
    before = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    reference = cnn_bn()
    reference.train()
    expected = reference(x)  # normal training-mode forward (moves the reference stats)
    with frozen_batchnorm_stats(model):
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert torch.equal(bn.num_batches_tracked, before[2])
    assert not torch.equal(reference[1].running_mean, before[0])
    # restored on exceptions too
    with pytest.raises(ZeroDivisionError), frozen_batchnorm_stats(model):
        raise ZeroDivisionError
    assert bn.track_running_stats
    model(x)
    assert not torch.equal(bn.running_mean, before[0])


def test_frozen_stats_instance_norm_and_eval_mode():
    model = nn.Sequential(nn.InstanceNorm2d(2, track_running_stats=True)).double()
    x, _ = image_data()
    model.train()
    with frozen_batchnorm_stats(model):
        model(x)
    assert torch.equal(model[0].running_mean, torch.zeros(2, dtype=torch.float64))
    bn = cnn_bn()
    bn.eval()
    expected = bn(x)
    with frozen_batchnorm_stats(bn):
        torch.testing.assert_close(bn(x), expected, rtol=0, atol=0)


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_recalibrate_one_sample_last_batch_is_a_clear_error_and_changes_nothing():
    """Issue 26 item 9: BatchNorm1d cannot take a variance from one sample: the error names the
    batch and the fix, and the running statistics are those from before the call."""
    from msam import recalibrate_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2),
                                torch.nn.BatchNorm1d(2))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 4))
    model.eval()
    before = _bn_state(model)
    x = torch.randn(9, 4)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(9)), batch_size=4)
    with pytest.raises(ValueError, match=r"batch 2 has 1 sample.*drop_last=True"):
        recalibrate_batchnorm(model, loader)
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not model.training and all(not m.training for m in model.modules())
    # any other failure mid-way restores the statistics too
    def bad_batches():
        yield torch.randn(4, 4), None
        raise RuntimeError("the data loader worker died")

    with pytest.raises(RuntimeError, match="worker died"):
        recalibrate_batchnorm(model, bad_batches())
    after = _bn_state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
