"""Ours vs PyHessian 0.1 (``hessian(...).dataloader_hv_product``, ``eigenvalues``), float64.

PyHessian weights dataloader batches by their samples (``inputs.size(0)``), as ours does for
classification, so the products agree as they are; for a language model ours weights by counted
tokens, matched here by scaling each batch's criterion by ``B N_b / (B_b N)`` (``B_b``
sequences and ``N_b`` counted tokens of the batch, ``B`` and ``N`` the totals). PyHessian draws
its vectors in the default dtype, so the tests run with float64 as the default.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis import HessianOperator, top_eigenpairs
from tests.oracle.common import counted_tokens, rel, shifted_ce_sum

pytest.importorskip("pyhessian")
import pyhessian.hessian  # noqa: E402,F401  (the package re-exports the class under this name)

ph = sys.modules["pyhessian.hessian"]

pytestmark = pytest.mark.oracle


@pytest.fixture(autouse=True)
def _float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _split(v, model):
    return list(torch.split(v, [p.numel() for p in model.parameters()]))


def _hv(h, v, model):
    _, hv = h.dataloader_hv_product([t.view_as(p) for t, p in zip(_split(v, model),
                                                                   model.parameters())])
    model.zero_grad(set_to_none=True)
    return torch.cat([t.reshape(-1) for t in hv])


def test_dataloader_hvp(classifier):
    _, model, batches = classifier
    ours = HessianOperator(model, "cross_entropy", batches)
    h = ph.hessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
    v = torch.randn(ours.shape[0], generator=torch.Generator().manual_seed(0))
    assert rel(ours @ v, _hv(h, v, model)) < 1e-12


def test_top_eigenvalues_power_iteration(classifier):
    """PyHessian's deflated power iteration run to a tight tolerance vs our Lanczos (top two).

    PyHessian normalizes its vectors by ``||v|| + 1e-6`` (twice per step: after the product and
    in the deflation), so its vector has norm ``1 / (1 + 1e-6)`` and its Rayleigh quotients are
    low by the factor ``(1 + 1e-6)^-2``, a relative bias of 2e-6; matched here exactly."""
    _, model, batches = classifier
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    torch.manual_seed(0)
    h = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    values, _ = h.eigenvalues(top_n=2, maxIter=3000, tol=1e-12)
    model.zero_grad(set_to_none=True)
    ours = top_eigenpairs(model, "cross_entropy", batches, k=2, tol=1e-10)
    theirs = np.sort(values)[::-1]
    np.testing.assert_allclose(ours.eigenvalues.numpy() / (1 + 1e-6) ** 2, theirs, rtol=1e-8)


def test_causal_lm_padded_tokens(lm_setup):
    model, batches = lm_setup
    n_tok = sum(counted_tokens(y) for _, y in batches)
    n_seq = sum(len(y) for _, y in batches)

    def criterion(logits, labels):  # PyHessian multiplies by len(labels) / n_seq
        return shifted_ce_sum(logits, labels) * (n_seq / (len(labels) * n_tok))

    ours = HessianOperator(model, "lm", batches)
    h = ph.hessian(model, criterion, dataloader=batches, cuda=False)
    v = torch.randn(ours.shape[0], generator=torch.Generator().manual_seed(1))
    with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward
        theirs = _hv(h, v, model)
    assert rel(ours @ v, theirs) < 1e-12
