"""analysis.checks: no false alarms on legitimate inputs, and the tolerance of the double
evaluation (issue 15, items 13 and 15)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis.checks import REPEAT_RTOL, check_first_batch, check_repeatable_forward
from analysis.data import as_data
from analysis.evaluation import resolve_loss
from tests.models import cnn_bn, image_data, mlp

DT = torch.float64


class Jitter(nn.Module):
    """Adds noise of relative size ``eps`` to its outputs: a stand-in for non-deterministic
    reductions (eps tiny) or for real randomness (eps large)."""

    def __init__(self, eps: float):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()
        self.eps = eps

    def forward(self, x):
        out = self.lin(x)
        return out + self.eps * out.abs().max() * torch.rand_like(out)


def test_double_evaluation_tolerance():
    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    src = as_data((x, y))
    check_repeatable_forward(Jitter(0.01 * REPEAT_RTOL), src, "eval")  # within the tolerance
    with pytest.raises(ValueError, match=r"forward is random \(two evaluations of batch 0 differ"):
        check_repeatable_forward(Jitter(100 * REPEAT_RTOL), src, "eval")
    with pytest.raises(ValueError, match="forward is random"):
        check_first_batch(Jitter(100 * REPEAT_RTOL), F.cross_entropy, src, "eval", where="t")
    # opting out skips the double evaluation
    check_first_batch(Jitter(1.0), F.cross_entropy, src, "eval", where="t", deterministic=False)


def test_legitimate_inputs_pass():
    model = mlp()
    x = torch.randn(10, 6, dtype=DT)
    y = torch.randint(0, 3, (10,))
    for loss, t in (
        (F.cross_entropy, y),
        (F.cross_entropy, torch.where(torch.arange(10) % 3 == 0, -100, y)),  # ignore_index
        (F.cross_entropy, torch.softmax(torch.randn(10, 3, dtype=DT), 1)),  # class probabilities
        (F.mse_loss, torch.randn(10, 3, dtype=DT)),
        (lambda o, tt: (o.sum(1) - tt).pow(2).mean(), torch.randn(10, dtype=DT)),  # custom
    ):
        check_first_batch(model, loss, as_data((x, t)), "eval", where="t")
    # spatial cross-entropy: (N, C, H, W) outputs with (N, H, W) targets
    conv = nn.Conv2d(2, 3, 1).double()
    xi, _ = image_data(n=4)
    check_first_batch(conv, F.cross_entropy, as_data((xi, torch.randint(0, 3, (4, 5, 5)))), "eval",
                      where="t")
    # dict inputs and a list of batches
    class Kw(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3).double()

        def forward(self, a, b):
            return self.lin(a + b)

    check_first_batch(Kw(), F.cross_entropy, as_data([({"a": x, "b": x}, y)]), "eval", where="t")
    # train-mode BatchNorm is a fixed function of a fixed batch
    bn = cnn_bn()
    saved = [b.clone() for b in bn.buffers()]
    check_first_batch(bn, F.cross_entropy, as_data(image_data(n=8)), "train", where="t")
    assert all(torch.equal(a, b) for a, b in zip(bn.buffers(), saved))  # statistics restored


def test_only_the_first_samples_are_run_but_all_targets_of_batch_0_are_range_checked():
    calls = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 3).double()

        def forward(self, x):
            calls.append(x.shape[0])
            return self.lin(x)

    x = torch.randn(300, 6, dtype=DT)
    y = torch.randint(0, 3, (300,))
    y[250] = 7  # beyond the checked samples
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\).*got 7"):
        check_first_batch(Spy(), F.cross_entropy, as_data((x, y)), "eval", where="t")
    assert calls == [64]


def test_language_model_detection_has_no_false_alarms():
    from types import SimpleNamespace

    from analysis.target_checks import looks_like_lm

    logits = torch.randn(2, 5, 7)
    ids = torch.randint(0, 7, (2, 5))
    assert looks_like_lm(logits, ids) and looks_like_lm(logits, {"input_ids": ids})
    assert looks_like_lm(SimpleNamespace(logits=logits), ids)  # a Hugging Face output
    assert not looks_like_lm(logits, ids.double())  # float targets: mse regression on (B, T)
    assert not looks_like_lm(torch.randn(2, 7), ids[:, 0])  # a classifier
    assert not looks_like_lm(torch.randn(2, 5, 5), ids % 5)  # T == V: also an (N, C, d) layout
    assert not looks_like_lm(torch.randn(2, 5, 7), torch.randint(0, 5, (2, 7)))  # (N, C, d)


def test_per_position_cross_entropy_in_the_n_c_d_layout_still_passes():
    # (N, C, d) logits with (N, d) targets is valid cross_entropy, not a language model
    class PerPosition(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3).double()

        def forward(self, x):  # (N, d, 4) -> (N, 3, d)
            return self.lin(x).transpose(1, 2)

    x = torch.randn(6, 5, 4, dtype=DT)
    y = torch.randint(0, 3, (6, 5))
    check_first_batch(PerPosition(), F.cross_entropy, as_data((x, y)), "eval", where="t")
    check_first_batch(PerPosition(), resolve_loss("cross_entropy"), as_data((x, y)), "eval", where="t")


def test_language_model_hint_also_for_the_plain_torch_losses():
    from tests.lm_models import lm_model

    ids = torch.randint(0, 7, (3, 5))
    for loss in (F.cross_entropy, F.mse_loss):
        with pytest.raises(ValueError, match=r"^t: the outputs float64 \(3, 5, 7\) of batch 0 .*"
                                             r"use loss 'lm' \(next-token, shifted\) or 'model_lm'"):
            check_first_batch(lm_model(), loss, as_data((ids, ids)), "eval", where="t")
