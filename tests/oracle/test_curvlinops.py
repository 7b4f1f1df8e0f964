"""Ours vs curvlinops (``HessianLinearOperator``, ``GGNLinearOperator``, ``to_scipy`` + eigsh), float64.

Classification batches are weighted by samples in both libraries (ours: ``N_b / N`` with
``N_b`` the samples; curvlinops: ``batch_size / num_data`` for ``reduction="mean"``), so the
operators agree as they are. For the language model ours weights batches by counted tokens and
curvlinops by sequences unless told otherwise: ``batch_size_fn`` returning the counted tokens
and ``num_data`` their total make curvlinops compute the same matrix; with its default the two
differ (asserted, so the convention difference stays documented).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis import GGNOperator, HessianOperator, hessian_trace, top_eigenpairs
from tests.oracle.common import counted_tokens, flat_params, rel

curvlinops = pytest.importorskip("curvlinops")
eigsh = pytest.importorskip("scipy.sparse.linalg").eigsh

pytestmark = pytest.mark.oracle

CE = nn.CrossEntropyLoss()
METHODS = ["forward-over-reverse", "double-backward", "cached-graph"]


def _theirs(cls, model, batches, **kw):
    return cls(model, CE, flat_params(model), batches, check_deterministic=False, **kw)


def _probes(n, b=4, seed=0):
    return torch.randn(n, b, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("method", METHODS)
def test_hessian_matvec_and_matmat(classifier, method):
    _, model, batches = classifier
    ours = HessianOperator(model, "cross_entropy", batches, method=method)
    theirs = _theirs(curvlinops.HessianLinearOperator, model, batches)
    V = _probes(ours.shape[0])
    assert rel(ours @ V[:, 0], theirs @ V[:, 0]) < 1e-12
    assert rel(ours @ V, theirs @ V) < 1e-12


def test_ggn_matvec_and_matmat(classifier):
    _, model, batches = classifier
    ours = GGNOperator(model, "cross_entropy", batches)
    theirs = _theirs(curvlinops.GGNLinearOperator, model, batches)
    V = _probes(ours.shape[0], seed=1)
    assert rel(ours @ V[:, 0], theirs @ V[:, 0]) < 1e-12
    assert rel(ours @ V, theirs @ V) < 1e-12


def test_ggn_mse(classifier):
    """Mean squared error: both libraries' ``mse`` is the mean over all output entries."""
    _, model, batches = classifier
    g = torch.Generator().manual_seed(3)
    reg = [(x, torch.randn(len(x), 3, generator=g, dtype=torch.float64)) for x, _ in batches]
    ours = GGNOperator(model, "mse", reg)
    theirs = curvlinops.GGNLinearOperator(model, nn.MSELoss(), flat_params(model), reg,
                                          check_deterministic=False)
    V = _probes(ours.shape[0], seed=2)
    assert rel(ours @ V, theirs @ V) < 1e-12


def _dense(op) -> torch.Tensor:
    """curvlinops' matrix, applied to the identity (one batched product)."""
    return op @ torch.eye(op.shape[0], dtype=torch.float64)


@pytest.mark.parametrize("reorth", ["full", "partial"])
def test_top_eigenvalues_vs_eigsh(classifier, reorth):
    """Our Lanczos vs ARPACK (scipy eigsh at machine precision) on curvlinops' Hessian; the
    eigenvectors' residuals measured with curvlinops' product match the reported ones: to
    rounding with full reorthogonalization; with partial, to the semi-orthogonality level of the
    restarted basis (documented: ``1e-11 ||H||``; measured 6.4e-12 true vs 4.6e-14 reported at
    ``||H|| = 3.4``)."""
    _, model, batches = classifier
    M = _dense(_theirs(curvlinops.HessianLinearOperator, model, batches))
    ev = np.sort(eigsh(M.numpy(), k=4, which="LA", tol=0, v0=np.ones(M.shape[0]),
                       return_eigenvectors=False))[::-1]
    tol = 1e-10
    res = top_eigenpairs(model, "cross_entropy", batches, k=4, tol=tol, method="double-backward",
                         reorth=reorth)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.numpy(), ev, rtol=1e-8)
    X = res.eigenvectors.T
    residuals = (M @ X - X * res.eigenvalues).norm(dim=0)
    atol = 1e-12 if reorth == "full" else 1e-11 * float(ev[0])
    np.testing.assert_allclose(residuals.numpy(), res.residuals.numpy(), rtol=1e-4, atol=atol)
    # and the error bounds the stop used cover the distance to ARPACK's eigenvalues
    err = np.abs(res.eigenvalues.numpy() - ev)
    assert bool((err <= res.error_bounds.numpy() + 4 * np.finfo(np.float64).eps * ev[0]).all())


def test_top_ggn_eigenvalues(classifier):
    _, model, batches = classifier
    G = _dense(_theirs(curvlinops.GGNLinearOperator, model, batches))
    ev = torch.linalg.eigvalsh(G).flip(0)[:3]
    res = top_eigenpairs(GGNOperator(model, "cross_entropy", batches), k=3, tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues.numpy(), ev.numpy(), rtol=1e-8)


def test_trace_vs_dense_curvlinops(classifier):
    """Our trace (Hutch++ given 3n products, which makes it exact) vs the trace of curvlinops'
    Hessian; and a Hutchinson estimate within 4 standard errors of it."""
    _, model, batches = classifier
    exact = float(torch.trace(_dense(_theirs(curvlinops.HessianLinearOperator, model, batches))))
    op = HessianOperator(model, "cross_entropy", batches, method="double-backward")
    n = op.shape[0]
    assert hessian_trace(op, num_matvecs=3 * n).estimate == pytest.approx(exact, rel=1e-10)
    est = hessian_trace(op, num_matvecs=100, method="hutchinson")
    assert abs(est.estimate - exact) <= 4 * est.std_error


class _DictLM(nn.Module):
    """curvlinops passes a dict ``X`` to the model; ours passes ``input_ids``. curvlinops needs
    the math attention kernel chosen by the user (the CPU flash kernel has no forward-mode
    derivative); ours selects it inside every product."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, X):
        with sdpa_kernel(SDPBackend.MATH):
            return self.lm(X["input_ids"])


class _ShiftedCE(nn.Module):
    reduction = "mean"

    def forward(self, logits, labels):
        v = logits.shape[-1]
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, v),
                                           labels[:, 1:].reshape(-1), ignore_index=-100)


def _lm_operators(model, batches, cls_ours, cls_theirs, *, tokens=True):
    ours = cls_ours(model, "lm", batches)
    data = [({"input_ids": x, "labels": y}, y) for x, y in batches]
    wrapped = _DictLM(model)
    if tokens:  # weight batches by their counted next-token targets, as ours does
        kw = dict(batch_size_fn=lambda X: counted_tokens(X["labels"]),
                  num_data=sum(counted_tokens(y) for _, y in batches))
    else:  # curvlinops' default convention: sequences
        kw = dict(batch_size_fn=lambda X: X["input_ids"].shape[0])
    theirs = cls_theirs(wrapped, _ShiftedCE(), flat_params(wrapped), data,
                        check_deterministic=False, **kw)
    return ours, theirs


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_causal_lm_padded_tokens(lm_setup, kind):
    model, batches = lm_setup
    model.ln = nn.Identity()  # curvlinops' Hessian is wrong through LayerNorm: see below
    classes = {"hessian": (HessianOperator, curvlinops.HessianLinearOperator),
               "ggn": (GGNOperator, curvlinops.GGNLinearOperator)}[kind]
    ours, theirs = _lm_operators(model, batches, *classes)
    V = _probes(ours.shape[0], seed=4)
    assert rel(ours @ V, theirs @ V) < 1e-12
    # the per-sequence weighting (curvlinops' default) is a different matrix on these batches
    _, per_sequence = _lm_operators(model, batches, *classes, tokens=False)
    assert rel(per_sequence @ V, theirs @ V) > 1e-3


def test_causal_lm_top_eigenvalues(lm_setup):
    model, batches = lm_setup
    model.ln = nn.Identity()
    _, theirs = _lm_operators(model, batches, HessianOperator, curvlinops.HessianLinearOperator)
    M = _dense(theirs).numpy()
    ev = np.sort(eigsh(M, k=3, which="LA", tol=0, v0=np.ones(M.shape[0]),
                       return_eigenvectors=False))[::-1]
    res = top_eigenpairs(model, "lm", batches, k=3, tol=1e-10, method="double-backward")
    np.testing.assert_allclose(res.eigenvalues.numpy(), ev, rtol=1e-8)


@pytest.mark.xfail(strict=True, reason="peer bug: curvlinops' Hessian product, "
                   "torch.func.jvp(jacrev(loss)), is wrong through nn.LayerNorm (torch 2.13 CPU; "
                   "jvp(grad(loss)), which ours uses, is right); the GGN is not affected")
def test_curvlinops_hessian_through_layernorm():
    """Linear -> LayerNorm -> Linear: curvlinops vs the dense autograd Hessian (which our three
    product methods match to 1e-15). Fails today by ~13%; passes once the peer is fixed."""
    from analysis.reference import dense_hessian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    D = dense_hessian(model, "cross_entropy", [(x, y)])
    V = _probes(D.shape[0])
    for method in METHODS:
        assert rel(HessianOperator(model, "cross_entropy", (x, y), method=method) @ V, D @ V) < 1e-12
    theirs = _theirs(curvlinops.HessianLinearOperator, model, [(x, y)])
    assert rel(theirs @ V, D @ V) < 1e-12
