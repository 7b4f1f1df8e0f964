"""Ours vs hessian-eigenthings 1.0 (``HessianOperator``, ``GGNOperator``, ``lanczos``), float64.

hessian-eigenthings averages its batches with equal weights, ``(1 / B) sum_b C_b``; ours weights
them by their loss terms, ``sum_b (N_b / N) C_b``. On uneven batches the two differ (asserted);
scaling each batch's loss by ``B N_b / N`` makes hessian-eigenthings compute our matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis import GGNOperator, HessianOperator, top_eigenpairs
from tests.oracle.common import counted_tokens, rel, shifted_ce_sum

he = pytest.importorskip("hessian_eigenthings")

pytestmark = pytest.mark.oracle

CE = nn.functional.cross_entropy


def _weighted_loss(batches, criterion=CE):
    """``loss_fn(model, batch)`` for hessian-eigenthings whose equal-weight average is ours."""
    n_total, b = sum(len(x) for x, _ in batches), len(batches)

    def loss_fn(model, batch):
        x, y = batch
        return criterion(model(x), y) * (b * len(x) / n_total)

    return loss_fn


def _probe(n, seed=0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_hessian_matvec(classifier):
    _, model, batches = classifier
    ours = HessianOperator(model, "cross_entropy", batches)
    theirs = he.HessianOperator(model, batches, _weighted_loss(batches))
    v = _probe(ours.shape[0])
    assert rel(ours @ v, theirs.matvec(v)) < 1e-12
    # their default convention (equal batch weights) is another matrix on uneven batches
    plain = he.HessianOperator(model, batches, he.supervised_loss(CE))
    assert rel(plain.matvec(v), theirs.matvec(v)) > 1e-3


def test_ggn_matvec(classifier):
    _, model, batches = classifier
    n_total, b = sum(len(x) for x, _ in batches), len(batches)

    def loss_of_output(out, batch):
        return CE(out, batch[1]) * (b * len(batch[1]) / n_total)

    ours = GGNOperator(model, "cross_entropy", batches)
    theirs = he.GGNOperator(model, batches, he.supervised_forward, loss_of_output)
    v = _probe(ours.shape[0], seed=1)
    assert rel(ours @ v, theirs.matvec(v)) < 1e-12


def test_top_eigenvalues(classifier):
    """Their Lanczos run to (nearly) the full space with full reorthogonalization vs ours."""
    _, model, batches = classifier
    theirs = he.HessianOperator(model, batches, _weighted_loss(batches))
    m = min(theirs.size, 80)
    res_theirs = he.lanczos(theirs, k=4, max_iter=m, which="LA", seed=0, reorthogonalize=True)
    ours = top_eigenpairs(model, "cross_entropy", batches, k=4, tol=1e-10, method="double-backward")
    assert ours.converged
    np.testing.assert_allclose(ours.eigenvalues.numpy(),
                               np.sort(res_theirs.eigenvalues.numpy())[::-1], rtol=1e-8)


def test_causal_lm_padded_tokens(lm_setup):
    """Tokens: scale each batch's summed token loss by ``B / N`` (``N`` counted tokens in all)."""
    model, batches = lm_setup
    n_total, b = sum(counted_tokens(y) for _, y in batches), len(batches)

    def loss_fn(model, batch):
        with sdpa_kernel(SDPBackend.MATH):  # the CPU flash kernel has no double backward
            return shifted_ce_sum(model(batch[0]), batch[1]) * (b / n_total)

    ours = HessianOperator(model, "lm", batches)
    theirs = he.HessianOperator(model, batches, loss_fn)
    v = _probe(ours.shape[0], seed=2)
    assert rel(ours @ v, theirs.matvec(v)) < 1e-12
