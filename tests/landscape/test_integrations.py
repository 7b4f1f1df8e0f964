"""The Lightning and Hugging Face callbacks with the real frameworks: a two-epoch fit on tiny data
whose saved checkpoint is at the unperturbed weights w and whose validation metrics are computed
at w."""

from __future__ import annotations

import logging
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import CurvatureTracker
from landscape.datasets import load_digits
from landscape.integrations import perturbed_optimizers
from landscape.models import digits_cnn
from msam import MSAM, AdamWMSAM
from tests.landscape.lightning_modules import digits_module


def _data(n=128):
    d = load_digits(seed=0, train_size=n)
    return d.train, (d.x_test[:64], d.y_test[:64])


def _w_tilde_from_w(opt):
    """The perturbed point that train() would produce, as copies (parameters left at w)."""
    opt.train()
    out = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    opt.eval()
    return out


def test_perturbed_optimizers_unwraps():
    model = nn.Linear(2, 2)
    msam = MSAM(model.parameters(), lr=0.1)

    class Wrapper:
        optimizer = msam

    assert perturbed_optimizers([Wrapper(), torch.optim.SGD(model.parameters(), lr=0.1)]) == [msam]
    assert perturbed_optimizers(None) == []


# ------------------------------------------------------------------------------------------------
# PyTorch Lightning
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_fit(tmp_path_factory):
    pl = pytest.importorskip("lightning.pytorch")
    from landscape.integrations import MSAMCallback

    (x, y), (xv, yv) = _data()
    torch.manual_seed(0)
    seen_perturbed: list[bool] = []

    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32,
                                        shuffle=True)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=64)
    out = tmp_path_factory.mktemp("lightning")
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=out, save_last=True, every_n_epochs=1)
    cb = MSAMCallback(tracker=lambda module, opt: CurvatureTracker(
        module, "cross_entropy", (x[:32], y[:32]), optimizer=opt, every=2, cosine=True))
    module = digits_module(pl, lambda m: seen_perturbed.append(m.trainer.optimizers[0].is_perturbed))
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, callbacks=[cb, ckpt],
                             enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=1, default_root_dir=out, deterministic=True)
        trainer.fit(module, train, val)
    return module, trainer, cb, out, seen_perturbed, (xv, yv)


def test_lightning_checkpoint_is_at_w(lightning_fit):
    module, trainer, cb, out, _, _ = lightning_fit
    opt = trainer.optimizers[0]
    assert not opt.is_perturbed  # fit ended at w
    saved = torch.load(pathlib.Path(out) / "last.ckpt", weights_only=False)
    names = [n for n, _ in module.named_parameters()]
    w = [p.detach() for p in module.parameters()]
    w_tilde = _w_tilde_from_w(opt)
    for name, p in zip(names, w):
        torch.testing.assert_close(saved["state_dict"][name], p, rtol=0, atol=1e-6)
    # the perturbation is not negligible, so the comparison above can fail
    assert max(float((p - pt).abs().max()) for p, pt in zip(w, w_tilde)) > 1e-3
    assert saved["optimizer_states"][0]["perturbed"] is False
    # the checkpoint resumes consistently: the optimizer loads as unperturbed
    fresh = MSAM(digits_cnn(4).parameters(), lr=0.1)
    fresh.load_state_dict(saved["optimizer_states"][0])
    assert not fresh.is_perturbed


def test_lightning_validation_at_w_and_tracker(lightning_fit):
    module, trainer, cb, out, seen, (xv, yv) = lightning_fit
    assert seen and not any(seen)  # every validation batch ran at w (sanity check included)
    # the logged val_loss of the last epoch is the loss of the checkpoint's weights (and buffers)
    saved = torch.load(pathlib.Path(out) / "last.ckpt", weights_only=False)
    net = digits_cnn(4)
    net.load_state_dict({k[len("net."):]: v for k, v in saved["state_dict"].items()})
    net.eval()
    with torch.no_grad():
        ref = F.cross_entropy(net(xv), yv)
    assert float(trainer.callback_metrics["val_loss"]) == pytest.approx(float(ref), rel=1e-5)
    hist = cb.tracker.history
    assert [r.step for r in hist] == [2, 4, 6, 8] and all(r.lambda_max > 0 for r in hist)
    assert all(r.cos_v_g is not None for r in hist)


def test_lightning_recalibrates_batchnorm_at_w(lightning_fit):
    """After fit the BatchNorm statistics are those recomputed at w (msam.recalibrate_batchnorm
    on the training loader, which shuffles: batch compositions differ, hence rtol 1e-2), not the
    running statistics of training at w~; the last checkpoint holds them too (it held those of
    w~ before issue 27; tests/landscape/test_lightning_batchnorm.py checks them exactly)."""
    import copy

    from msam import recalibrate_batchnorm

    module, trainer, _, out, _, _ = lightning_fit
    name = [n for n, m in module.named_modules() if isinstance(m, nn.BatchNorm2d)][0]
    bn = module.get_submodule(name)
    twin = copy.deepcopy(module)
    recalibrate_batchnorm(twin, trainer.train_dataloader)
    bn2 = twin.get_submodule(name)
    torch.testing.assert_close(bn.running_mean, bn2.running_mean, rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(bn.running_var, bn2.running_var, rtol=1e-2, atol=1e-4)
    saved = torch.load(pathlib.Path(out) / "last.ckpt", weights_only=False)["state_dict"]
    torch.testing.assert_close(saved[f"{name}.running_mean"], bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(saved[f"{name}.running_var"], bn.running_var, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# Hugging Face transformers
# ------------------------------------------------------------------------------------------------
class _HFNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = digits_cnn(4)

    def forward(self, pixel_values, labels=None):
        logits = self.net(pixel_values)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


class _DS(torch.utils.data.Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def test_huggingface_trainer_saves_and_evaluates_at_w(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the transformers Trainer needs it
    from transformers import Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from landscape.integrations import MSAMTrainerCallback

    hf_logging.set_verbosity_error()
    (x, y), (xv, yv) = _data()
    torch.manual_seed(0)
    model = _HFNet()
    opt = AdamWMSAM(model.parameters(), lr=3e-3, rho=0.5)
    cb = MSAMTrainerCallback(tracker=lambda m, o: CurvatureTracker(
        m.net, "cross_entropy", (x[:32], y[:32]), optimizer=o, every=3))
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=2,
                             per_device_train_batch_size=32, per_device_eval_batch_size=64,
                             eval_strategy="epoch", save_strategy="epoch", logging_strategy="no",
                             report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = Trainer(model=model, args=args, train_dataset=_DS(x, y),
                          eval_dataset=_DS(xv, yv), optimizers=(opt, None), callbacks=[cb])
        trainer.train()
    assert not opt.is_perturbed
    last = sorted(tmp_path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    from safetensors.torch import load_file
    saved = load_file(str(last / "model.safetensors"))
    w_tilde = _w_tilde_from_w(opt)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved[name], p.detach(), rtol=0, atol=1e-6)
    assert max(float((p.detach() - pt).abs().max()) for p, pt in zip(model.parameters(), w_tilde)) > 1e-4
    opt_state = torch.load(last / "optimizer.pt", weights_only=False)
    assert opt_state["perturbed"] is False
    # the last epoch's eval_loss is the loss of the saved weights and buffers
    net = _HFNet()
    net.load_state_dict(saved, strict=False)
    net.eval()
    with torch.no_grad():
        ref = float(net(xv, yv)["loss"])
    evals = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and evals[-1] == pytest.approx(ref, rel=1e-5)
    assert [r.step for r in cb.tracker.history] == [3, 6]  # 4 steps per epoch, 2 epochs


def test_lightning_callback_measures_once_per_optimizer_step():
    """Gradient accumulation: several batches end with the same global_step; one check each."""
    pytest.importorskip("lightning.pytorch")
    from landscape.integrations import MSAMCallback

    calls = []

    class Tracker:
        def maybe_measure(self, step):
            calls.append(step)

    class Trainer:
        optimizers: list = []
        global_step = 0

    cb, tr = MSAMCallback(tracker=Tracker()), Trainer()
    for step in (1, 1, 2, 2, 3):
        tr.global_step = step
        cb.on_train_batch_end(tr, None, None, None, 0)
    assert calls == [1, 2, 3]
    with pytest.raises(TypeError, match="tracker must be a CurvatureTracker or a callable"):
        MSAMCallback(tracker=3)


@pytest.mark.parametrize("module, blocked, extra", [
    ("landscape.integrations.lightning", ("lightning", "lightning.pytorch", "pytorch_lightning"),
     "lightning"),
    ("landscape.integrations.huggingface", ("transformers",), "huggingface"),
])
def test_missing_framework_names_the_distribution(monkeypatch, module, blocked, extra):
    # the ImportError names the extra of the distribution users install (msam-landscape)
    import importlib
    import sys

    monkeypatch.delitem(sys.modules, module, raising=False)
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` fails
    with pytest.raises(ImportError, match=rf"pip install 'msam-landscape\[{extra}\]'"):
        importlib.import_module(module)


def test_every_pip_install_hint_names_the_distribution():
    # `pip install landscape[...]` names a distribution that does not exist
    import re

    import tomllib

    root = pathlib.Path(__file__).resolve().parents[2]
    name = tomllib.loads((root / "pyproject.toml").read_text())["project"]["name"]
    bad = []
    for package in ("msam", "analysis", "landscape"):
        for path in sorted((root / package).rglob("*.py")):
            for m in re.finditer(r"pip install\W+'?([\w.-]+)\[", path.read_text()):
                if m.group(1) != name:
                    bad.append(f"{path.relative_to(root)}: {m.group(0)}")
    assert not bad, f"pip install hints not naming {name}: {bad}"
