"""Issue 26 item 7: one exception path for the callbacks. After Ctrl-C or a crash inside
``fit`` / ``train`` the parameters are back at the unperturbed ``w`` (the optimizer says so), and
a failing tracker is named in the error."""

from __future__ import annotations

import signal
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msam import MSAM, AdamWMSAM
from tests.models import classification_data, mlp


def _loader():
    x, y = classification_data(n=64, seed=0, dtype=torch.float32)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def _assert_at_w(opt, params):
    """Not perturbed, and the live parameters are what eval() gives (w~ moved back)."""
    assert not opt.is_perturbed
    now = [p.detach().clone() for p in params]
    opt.train()
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(params, now))
    opt.eval()
    assert moved > 1e-4  # w~ != w: the check above is not vacuous
    for p, q in zip(params, now):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=1e-6)


class _Boom(Exception):
    pass


def _lightning_module(fail_at, error):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp(seed=0, dtype=torch.float32)

        def training_step(self, batch, i):
            if self.global_step == fail_at:
                raise error
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return MSAM(self.parameters(), lr=0.1, momentum=0.9, rho=1.0)

    return pl, Module()


def _fit(pl, module, cb):
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, callbacks=[cb],
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader())
    return trainer


@pytest.mark.parametrize("error", [_Boom("crash"), KeyboardInterrupt()], ids=["crash", "ctrl-c"])
def test_lightning_exception_restores_w(error):
    from landscape.integrations import MSAMCallback

    pl, module = _lightning_module(fail_at=3, error=error)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises((_Boom, SystemExit)):  # Lightning turns Ctrl-C into exit(1)
            _fit(pl, module, MSAMCallback())
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT while shutting down
    opt = module.trainer.optimizers[0]
    _assert_at_w(opt, list(module.parameters()))


def test_lightning_tracker_failure_names_the_tracker_and_restores_w():
    from landscape.integrations import MSAMCallback

    class BrokenTracker:
        def maybe_measure(self, step):
            if step == 2:
                raise RuntimeError("out of memory in the Lanczos solve")

        def __repr__(self):
            return "BrokenTracker(every=1)"

    pl, module = _lightning_module(fail_at=-1, error=None)
    with pytest.raises(RuntimeError, match=r"tracker BrokenTracker\(every=1\) failed at step 2: "
                                           r"RuntimeError: out of memory") as info:
        _fit(pl, module, MSAMCallback(tracker=BrokenTracker()))
    assert isinstance(info.value.__cause__, RuntimeError)
    _assert_at_w(module.trainer.optimizers[0], list(module.parameters()))


class _HFNet(nn.Module):
    def __init__(self, fail_at, error):
        super().__init__()
        self.net = mlp(seed=0, dtype=torch.float32)
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def forward(self, x, labels=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        logits = self.net(x)
        return {"logits": logits, "loss": F.cross_entropy(logits, labels)}


class _DS(torch.utils.data.Dataset):
    def __init__(self):
        self.x, self.y = classification_data(n=64, seed=0, dtype=torch.float32)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _hf_train(tmp_path, model, cb, *, add_later=False):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    opt = AdamWMSAM(model.parameters(), lr=3e-3, rho=0.5)
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2, per_device_train_batch_size=16,
                             save_strategy="no", logging_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=_DS(), optimizers=(opt, None),
                          callbacks=None if add_later else [cb])
        if add_later:
            cb.guard(trainer)
        trainer.train()
    return opt


@pytest.mark.parametrize("add_later", [False, True], ids=["callbacks=", "guard"])
@pytest.mark.parametrize("error", [_Boom("crash"), KeyboardInterrupt()], ids=["crash", "ctrl-c"])
def test_huggingface_exception_restores_w(tmp_path, error, add_later):
    from landscape.integrations import MSAMTrainerCallback

    model = _HFNet(fail_at=4, error=error)
    opts = []
    real = AdamWMSAM.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        opts.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AdamWMSAM, "__init__", spy)
        with pytest.raises(type(error)):
            _hf_train(tmp_path, model, MSAMTrainerCallback(), add_later=add_later)
    _assert_at_w(opts[0], list(model.parameters()))


def test_huggingface_tracker_failure_names_the_tracker(tmp_path):
    from landscape.integrations import MSAMTrainerCallback

    class BrokenTracker:
        def maybe_measure(self, step):
            raise ValueError("bad batch")

    model = _HFNet(fail_at=-1, error=None)
    with pytest.raises(RuntimeError, match=r"tracker .*BrokenTracker.* failed at step 1: ValueError: bad batch"):
        _hf_train(tmp_path, model, MSAMTrainerCallback(tracker=BrokenTracker()))


def test_huggingface_guard_refuses_what_is_not_a_trainer():
    pytest.importorskip("transformers")
    from landscape.integrations import MSAMTrainerCallback

    with pytest.raises(TypeError, match="guard\\(\\) expects a transformers Trainer, got int"):
        MSAMTrainerCallback().guard(3)
