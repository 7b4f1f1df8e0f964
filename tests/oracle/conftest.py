"""Cross-library agreement tests (marker ``oracle``): our curvature operators, eigenvalues and
traces against curvlinops, hessian-eigenthings and PyHessian, in float64 with tight tolerances.

Each test module skips itself (``pytest.importorskip``) when its peer is not installed; the
peers come from the ``oracle`` extra (``pip install -e .[oracle]``). Run with
``pytest tests/oracle -m oracle``.

Weighting conventions (the dataset matrix over uneven batches), matched explicitly per test:

* ours: ``C = sum_b (N_b / N) C_b`` with ``N_b`` the loss terms of batch ``b`` (samples; counted
  next-token targets for a language-model loss) and ``C_b`` the curvature of its mean loss;
* curvlinops: ``sum_b (batch_size_fn(X_b) / num_data) C_b`` for ``reduction="mean"`` (samples by
  default), so tokens need ``batch_size_fn`` = counted tokens and ``num_data`` = their total;
* PyHessian (dataloader): ``sum_b (B_b / B) C_b``, samples always (the first dimension of the
  inputs); tokens are matched by scaling each batch's criterion by ``B N_b / (B_b N)``;
* hessian-eigenthings: ``(1 / num_batches) sum_b C_b``, every batch counts the same; uneven
  batches are matched by scaling each batch's loss by ``num_batches * N_b / N``.
"""

from __future__ import annotations

import pytest

from tests.lm_models import lm_model, padded_batches, token_sequences
from tests.oracle.common import batches, cnn, mlp


@pytest.fixture(params=["mlp", "cnn"])
def classifier(request):
    """``(name, model, batches)``: an MLP or a small CNN with eval-mode BatchNorm, uneven batches."""
    if request.param == "mlp":
        return "mlp", mlp(), batches((5,))
    return "cnn", cnn(), batches((2, 6, 6))


@pytest.fixture
def lm_setup():
    """A tiny causal LM and right-padded token batches of uneven sizes and lengths:
    ``(model, batches)`` with batches ``[(input_ids, labels)]`` (labels -100 at padding)."""
    model = lm_model(seed=0)
    dicts = padded_batches(token_sequences((5, 2, 4, 3, 5, 2, 4)), sizes=(2, 4, 1))
    return model, [(d["input_ids"], d["labels"]) for d in dicts]
