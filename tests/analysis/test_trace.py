"""hessian_trace: unbiasedness and convergence by statistical bounds, exactness limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis import HessianOperator, hessian_trace
from analysis.reference import dense_hessian
from tests.models import classification_data, mlp, random_spd


def _matrix(n=120):
    ev = torch.cat([torch.tensor([40.0, 25.0, 10.0]), torch.linspace(-1.0, 2.0, n - 3)]).double()
    return random_spd(n, seed=4, eigenvalues=ev), float(ev.sum())


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_unbiased_over_seeds(method):
    """The mean of many independent estimates lies within 4 standard errors of the trace."""
    A, tr = _matrix()
    ests = torch.tensor([hessian_trace(A, num_matvecs=12, method=method, seed=s).estimate
                         for s in range(60)])
    se_of_mean = float(ests.std()) / math.sqrt(len(ests))
    assert abs(float(ests.mean()) - tr) < 4 * se_of_mean


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_error_shrinks_with_matvecs_and_std_error_is_calibrated(method):
    A, tr = _matrix()
    mean_abs_err = {}
    for m in [9, 90]:
        errs, zs = [], []
        for s in range(25):
            r = hessian_trace(A, num_matvecs=m, method=method, seed=100 + s)
            assert r.num_matvecs == (m if method == "hutchinson" else 3 * (m // 3))
            errs.append(abs(r.estimate - tr))
            zs.append((r.estimate - tr) / r.std_error)
        mean_abs_err[m] = sum(errs) / len(errs)
        # the reported standard errors are of the right size: z-scores have RMS about 1
        rms = math.sqrt(sum(z * z for z in zs) / len(zs))
        assert 0.4 < rms < 2.5, (m, rms)
    assert mean_abs_err[90] < 0.6 * mean_abs_err[9]


def test_hutchpp_beats_hutchinson_on_a_spiked_spectrum():
    A, tr = _matrix()
    err = {meth: sum(abs(hessian_trace(A, num_matvecs=30, method=meth, seed=s).estimate - tr)
                     for s in range(20)) for meth in ["hutchinson", "hutch++"]}
    assert err["hutch++"] < err["hutchinson"]


def test_hutchpp_exact_with_full_sketch():
    A, tr = _matrix(n=10)
    r = hessian_trace(A, num_matvecs=30)
    assert r.estimate == pytest.approx(tr, rel=1e-10)
    assert r.std_error == 0.0


def test_hutchpp_budget_larger_than_3n_is_capped_and_exact():
    A, tr = _matrix(n=10)
    r = hessian_trace(A, num_matvecs=99)  # the default budget on a 10-parameter model
    assert r.estimate == pytest.approx(tr, rel=1e-10)
    assert r.num_matvecs == 20  # 2n: the sketch and its product, no residual samples needed


def test_model_hessian_trace_within_statistical_bound():
    model, data = mlp(), classification_data()
    tr = float(torch.trace(dense_hessian(model, "cross_entropy", data)))
    H = HessianOperator(model, "cross_entropy", data)
    for method in ["hutchinson", "hutch++"]:
        r = hessian_trace(H, num_matvecs=45, method=method, seed=1)
        assert abs(r.estimate - tr) < 5 * r.std_error + 1e-10
    r = hessian_trace(model, "cross_entropy", data, num_matvecs=6)
    json.dumps(r.to_dict())


def test_bad_inputs():
    A, _ = _matrix(n=5)
    with pytest.raises(ValueError, match="method"):
        hessian_trace(A, method="xtrace")
    with pytest.raises(ValueError, match="num_matvecs"):
        hessian_trace(A, num_matvecs=2)
    with pytest.raises(ValueError, match="num_matvecs"):
        hessian_trace(A, num_matvecs=1, method="hutchinson")
    with pytest.raises(TypeError, match="num_matvecs"):
        hessian_trace(A, num_matvecs=10.0)


@pytest.mark.parametrize("block_size", [1, 3, 7])
def test_hutchpp_exact_on_a_rank_deficient_matrix_in_blocks(block_size):
    # regression: the blockwise orthonormalization of a rank-deficient sketch must stay
    # orthogonal (else tr(Q^T H Q) double counts); a rank-3 PSD matrix, budget 3n: exact
    g = torch.Generator().manual_seed(0)
    U = torch.randn(12, 3, generator=g, dtype=torch.float64)
    A = U @ U.T
    res = hessian_trace(A, num_matvecs=36, block_size=block_size)
    assert res.estimate == pytest.approx(float(A.trace()), rel=1e-10)
    assert res.std_error == 0.0


def test_trace_block_size_validated_and_blocks_agree():
    A = torch.diag(torch.linspace(0, 1, 40, dtype=torch.float64))
    with pytest.raises(ValueError, match="block_size"):
        hessian_trace(A, block_size=0)
    a = hessian_trace(A, num_matvecs=30, method="hutchinson", block_size=1)
    b = hessian_trace(A, num_matvecs=30, method="hutchinson", block_size=8)
    assert a.num_matvecs == b.num_matvecs == 30
    assert b.block_size == 8 and b.memory_bound_bytes == 3 * 8 * 40 * 8
    assert abs(b.estimate - 20.0) < 5 * b.std_error + 1e-12
