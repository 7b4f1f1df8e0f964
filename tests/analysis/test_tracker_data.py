"""CurvatureTracker takes every data form the operators take (issue 27, item 1): its lambda_max
equals HessianOperator + Lanczos on the same data and the top eigenvalue of a dense float64
Hessian, for a pair, a list of batch pairs, a list of batch dicts and a DataLoader."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from analysis import CurvatureTracker, HessianOperator, top_eigenpairs
from analysis.reference import dense_hessian
from tests.models import classification_data, mlp


class _DictModel(nn.Module):
    """A model called with a batch dict (``x``, ``labels``) that returns its own loss."""

    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x, labels):
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _forms():
    x, y = classification_data(n=40)
    half = [(x[:24], y[:24]), (x[24:], y[24:])]
    dicts = [{"x": a, "labels": b} for a, b in half]
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=False)
    return {
        "pair": (mlp, "cross_entropy", (x, y)),
        "list-of-pairs": (mlp, "cross_entropy", half),
        "list-of-dicts": (_DictModel, "model", dicts),
        "dataloader": (mlp, "cross_entropy", loader),
    }


@pytest.mark.parametrize("form", list(_forms()))
def test_tracker_lambda_max_matches_operator_and_dense_hessian(form):
    make, loss, data = _forms()[form]
    model = make()
    tracker = CurvatureTracker(model, loss, data, every=1, tol=1e-8)
    rec = tracker.measure(1)
    ref = top_eigenpairs(HessianOperator(model, loss, data), k=1, tol=1e-8)
    dense = torch.linalg.eigvalsh(dense_hessian(model, loss, data))[-1].item()
    assert rec.lambda_max == pytest.approx(ref.eigenvalues[0].item(), rel=1e-6)
    assert rec.lambda_max == pytest.approx(dense, rel=1e-6)


def test_tracker_refuses_unsupported_data_before_anything_changes():
    model = mlp()
    with pytest.raises(TypeError, match="str"):
        CurvatureTracker(model, "cross_entropy", "not data")
    with pytest.raises(ValueError, match="empty"):
        CurvatureTracker(model, "cross_entropy", [])


def test_probes_that_need_one_batch_refuse_several_batches():
    """cosine and msam_loss take one probe batch (MechanismProbe): several batches are refused
    at construction, naming the form, instead of being read as (inputs, targets)."""
    x, y = classification_data(n=40)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="one probe batch"):
        CurvatureTracker(model, "cross_entropy", [(x[:20], y[:20]), (x[20:], y[20:])],
                         optimizer=opt, cosine=True)
