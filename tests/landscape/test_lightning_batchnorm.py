"""Lightning checkpoints of BatchNorm models trained with MSAM (issue 27, item 5): the saved
last.ckpt holds the weights w *and* BatchNorm statistics gathered at w (equal to
msam.recalibrate_batchnorm on the training data at the checkpoint's weights), validation sees
the same statistics, and the training trajectory is unchanged by the recalibrations."""

from __future__ import annotations

import logging
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape.datasets import load_digits
from landscape.models import digits_cnn
from msam import recalibrate_batchnorm
from tests.landscape.lightning_modules import digits_module

pl = pytest.importorskip("lightning.pytorch")


def _fit(tmp_path, recalibrate=True):
    from landscape.integrations import MSAMCallback

    d = load_digits(seed=0, train_size=128)
    (x, y), (xv, yv) = d.train, (d.x_test[:64], d.y_test[:64])
    torch.manual_seed(0)

    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                        shuffle=False)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=64)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=1)
    module = digits_module(pl)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False,
                             callbacks=[MSAMCallback(recalibrate=recalibrate), ckpt],
                             enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, default_root_dir=tmp_path)
        trainer.fit(module, train, val)
    return module, trainer, train, (xv, yv)


def _bn_buffers(state, prefix="net."):
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and ("running_" in k)}


def test_last_checkpoint_holds_statistics_gathered_at_w(tmp_path):
    module, trainer, train, (xv, yv) = _fit(tmp_path)
    saved = torch.load(pathlib.Path(tmp_path) / "last.ckpt", weights_only=False)["state_dict"]
    net = digits_cnn(4)
    net.load_state_dict({k[len("net."):]: v for k, v in saved.items()})
    ref = digits_cnn(4)
    ref.load_state_dict(net.state_dict())
    recalibrate_batchnorm(ref, train)  # independent: the statistics at the checkpoint's w
    names = [n for n, m in ref.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert names
    for n in names:
        for buf in ("running_mean", "running_var"):
            torch.testing.assert_close(getattr(net.get_submodule(n), buf),
                                       getattr(ref.get_submodule(n), buf), rtol=1e-5, atol=1e-6)
    # validation saw the checkpoint: same weights, same statistics
    net.eval()
    with torch.no_grad():
        loss = F.cross_entropy(net(xv), yv)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(loss), rel=1e-5)


def test_recalibration_leaves_the_trajectory_unchanged(tmp_path):
    a, *_ = _fit(tmp_path / "a", recalibrate=True)
    b, *_ = _fit(tmp_path / "b", recalibrate=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_recalibrate_batches_must_be_a_positive_int(bad):
    from landscape.integrations import MSAMCallback

    with pytest.raises(ValueError, match=f"recalibrate_batches.*{bad!r}"):
        MSAMCallback(recalibrate_batches=bad)
