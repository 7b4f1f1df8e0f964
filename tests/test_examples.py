"""examples/*.py run as documented (few steps) and their pieces are what they claim."""

import importlib.util
import math
import pathlib

import pytest
import torch

import msam

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def lm():
    return _load("finetune_lm")


def test_counting_data_targets_and_padding(lm):
    ids, targets = lm.counting_data(20, 2, seed=5)
    assert ids.shape == targets.shape == (20, lm.MAX_LEN)
    for row_ids, row_t in zip(ids.tolist(), targets.tolist()):
        n = sum(t != lm.PAD for t in row_ids)
        assert all(t != lm.PAD for t in row_ids[:n]) and all(t == lm.PAD for t in row_ids[n:])
        for j in range(n - 1):  # counting by two, tokens 1..VOCAB-1
            assert row_ids[j + 1] - 1 == (row_ids[j] - 1 + 2) % (lm.VOCAB - 1)
            assert row_t[j] == row_ids[j + 1]
        assert all(t == lm.IGNORE for t in row_t[n - 1:])


def test_lm_loss_is_the_mean_over_real_tokens(lm):
    ids, targets = lm.counting_data(6, 1, seed=0)
    logits = torch.randn(*ids.shape, lm.VOCAB, generator=torch.Generator().manual_seed(0))
    logp = torch.log_softmax(logits.double(), -1)
    terms = [-float(logp[i, j, t]) for i in range(ids.shape[0]) for j in range(ids.shape[1])
             if (t := int(targets[i, j])) != lm.IGNORE]
    assert float(lm.lm_loss(logits, targets)) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_causal_mask_future_and_padding_do_not_leak(lm):
    torch.manual_seed(0)
    model = lm.TinyCausalLM().eval()
    ids, _ = lm.counting_data(4, 1, seed=1)
    changed = ids.clone()
    changed[:, 4:] = 3  # other tokens from position 4 on
    with torch.no_grad():
        a, b = model(ids), model(changed)
    assert torch.allclose(a[:, :4], b[:, :4], atol=1e-6)
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("name", ["adamw_msam", "msam"])
def test_train_ends_at_w(lm, name):
    torch.manual_seed(0)
    model = lm.TinyCausalLM()
    opt = lm.make_optimizer(name, model.parameters(), 3e-3)
    assert isinstance(opt, (msam.AdamWMSAM, msam.MSAM))
    lm.train(model, lm.counting_data(32, 2, seed=2), opt, steps=3, batch=8, seed=0)
    assert not opt.is_perturbed and not model.training


def test_finetune_lm_main_runs(lm, capsys):
    res = lm.main(["--pretrain-steps", "40", "--steps", "15"])
    out = capsys.readouterr().out
    assert set(res) == {"pretrained", "adamw", "adamw_msam", "msam"}
    for name in ("adamw", "adamw_msam", "msam"):
        assert name in out
        # fine-tuning on the new rule lowers the held-out loss of the pretrained model
        assert res[name]["held_out_loss"] < 0.7 * res["pretrained"]["held_out_loss"], res
    for r in res.values():
        assert math.isfinite(r["sharpness"]) and r["m"] == 128
