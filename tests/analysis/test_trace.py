"""hessian_trace: unbiasedness and convergence by statistical bounds, exactness limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from analysis import HessianOperator, hessian_trace
from analysis.reference import dense_hessian
from analysis.trace import trace_plan
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


# --------------------------------------------------------------------------------------------
# the memory-bounded Hutch++ (max_vectors): the sketch capped, the products left to the
# deflated Hutchinson part


class LiveVectors:
    """A dense operator that counts, at every product, the ``n``-vectors the estimator holds:
    the storages of the tensors in the locals of the calling frames (lists and tuples
    included) and the product it returns, each storage once, in units of ``n * itemsize``."""

    def __init__(self, A: torch.Tensor):
        self.A, self.shape, self.dtype, self.device = A, A.shape, A.dtype, A.device
        self.num_matvecs, self.peak, self.calls = 0, 0.0, 0

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        import sys

        out = self.A @ V
        self.num_matvecs += V.shape[1]
        self.calls += 1
        seen, total = {self.A.untyped_storage().data_ptr()}, 0
        stack, frame = [out], sys._getframe(1)
        while frame is not None:
            stack += list(frame.f_locals.values())
            frame = frame.f_back
        while stack:
            x = stack.pop()
            if isinstance(x, (list, tuple)):
                stack += [y for y in x if isinstance(y, (torch.Tensor, list, tuple))]
            elif isinstance(x, torch.Tensor):
                st = x.untyped_storage()
                if st.data_ptr() not in seen:
                    seen.add(st.data_ptr())
                    total += st.nbytes()
        self.peak = max(self.peak, total / (self.shape[0] * self.A.element_size()))
        return out

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v[:, None])[:, 0]


def test_bounded_hutchpp_holds_at_most_max_vectors():
    A, _ = _matrix(n=400)
    capped = LiveVectors(A)
    res = hessian_trace(capped, num_matvecs=200, max_vectors=16)
    plan = trace_plan(400, 200, "hutch++", 8, max_vectors=16)
    assert (plan.block_size, plan.sketch, plan.probes, plan.memory_vectors) == (1, 12, 176, 16)
    assert res.num_matvecs == plan.products == 200 and capped.calls == plan.passes
    assert res.memory_bound_bytes == 16 * 400 * 8 == plan.memory_bound_bytes
    assert 12 < capped.peak <= 16, capped.peak  # the sketch and a block of probes, seen
    # the counter sees the whole sketch of the uncapped estimator (66 vectors)
    full = LiveVectors(A)
    hessian_trace(full, num_matvecs=200, block_size=1)
    assert full.peak > 66, full.peak
    hutch = LiveVectors(A)
    r = hessian_trace(hutch, num_matvecs=40, method="hutchinson", max_vectors=7, block_size=16)
    assert r.block_size == 2 and r.num_matvecs == 40 and 2 <= hutch.peak <= 6, hutch.peak


@pytest.mark.parametrize("max_vectors", [5, 12])
def test_bounded_hutchpp_unbiased_with_calibrated_std_error(max_vectors):
    # E[estimate] = tr(H) for any sketch size; z-scores against the dense trace have RMS ~ 1
    A, tr = _matrix()
    res = [hessian_trace(A, num_matvecs=30, max_vectors=max_vectors, seed=s) for s in range(60)]
    ests = torch.tensor([r.estimate for r in res], dtype=torch.float64)
    assert abs(float(ests.mean()) - tr) < 4 * float(ests.std()) / math.sqrt(len(ests))
    rms = math.sqrt(sum(((r.estimate - tr) / r.std_error) ** 2 for r in res) / len(res))
    assert 0.5 < rms < 2.0, rms
    assert all(r.num_matvecs == 30 and len(r.samples) == 30 - 2 * (max_vectors - 4)
               for r in res)


def _deflated_variance(A: torch.Tensor, s: int, seed: int) -> float:
    """``2 (||PHP||_F^2 - sum_i (PHP)_ii^2)`` for the ``Q`` of seed ``seed``: its first ``s``
    Rademacher draws (one a block) sketched, ``P = I - QQ^T``."""
    n = A.shape[0]
    g = torch.Generator().manual_seed(seed)
    S = torch.cat([torch.randint(0, 2, (1, n), generator=g, dtype=torch.int8) for _ in range(s)])
    Q = torch.linalg.qr(A @ (S.double() * 2 - 1).T)[0]
    P = torch.eye(n, dtype=torch.float64) - Q @ Q.T
    M = P @ A @ P
    return 2 * (float((M * M).sum()) - float((M.diagonal() ** 2).sum()))


def test_bounded_hutchpp_variance_is_the_documented_formula():
    # Var[T | Q] = (2 / l) (||PHP||_F^2 - sum_i (PHP)_ii^2): the sample variance of the l
    # quadratic forms of each seed, averaged over seeds, against the formula for each seed's Q
    A, _ = _matrix(n=60)
    seeds, s, probes = range(40), 2, 26  # max_vectors=6: b=1, s=2, 30-4 probes
    measured, formula = [], []
    for seed in seeds:
        r = hessian_trace(A, num_matvecs=30, max_vectors=6, seed=seed)
        assert len(r.samples) == probes and r.std_error ** 2 * probes == pytest.approx(
            float(torch.tensor(r.samples, dtype=torch.float64).var()), rel=1e-9)
        measured.append(float(torch.tensor(r.samples, dtype=torch.float64).var()))
        formula.append(_deflated_variance(A, s, seed))
    assert sum(measured) / len(seeds) == pytest.approx(sum(formula) / len(seeds), rel=0.15)
    # undeflated (Hutchinson) the forms would spread far more: the check can tell them apart
    undeflated = 2 * (float((A * A).sum()) - float((A.diagonal() ** 2).sum()))
    assert undeflated > 2 * sum(formula) / len(seeds)


def test_bounded_hutchpp_on_a_model_within_statistical_bound():
    model, data = mlp(), classification_data()
    tr = float(torch.trace(dense_hessian(model, "cross_entropy", data)))
    H = HessianOperator(model, "cross_entropy", data)
    r = hessian_trace(H, num_matvecs=45, max_vectors=8, seed=2)
    assert r.num_matvecs == 45 and r.block_size == 1
    assert abs(r.estimate - tr) < 5 * r.std_error + 1e-10
    with pytest.raises(ValueError, match="max_vectors"):
        hessian_trace(H, max_vectors=4)
    with pytest.raises(ValueError, match="max_vectors"):
        hessian_trace(H, method="hutchinson", max_vectors=2)
