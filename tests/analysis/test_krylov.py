"""The chunked Krylov basis and the float64 reductions against dense float64 references."""

from __future__ import annotations

import math

import pytest
import torch

from analysis import krylov
from analysis.krylov import SLAB, KrylovBasis, dot64, norm64


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("n", [1000, SLAB + 12345])
def test_dot64_and_norm64_accumulate_in_float64(n):
    g = _gen()
    a = torch.randn(n, generator=g) * 1e3 + 1.0  # a large mean: a float32 sum would drift
    b = torch.randn(n, generator=g) + 1.0
    ref = float(a.double() @ b.double())  # products of float32 numbers are exact in float64
    scale = float(a.double().abs() @ b.double().abs())
    u64 = 2.0 ** -53
    # exact products, float64 sums: |err| <= n u64 sum |a_i b_i| (a float32 accumulation is
    # off by ~1e-4 of it here)
    assert abs(dot64(a, b) - ref) <= n * u64 * scale
    assert norm64(a) == pytest.approx(math.sqrt(float(a.double() @ a.double())), rel=n * u64)
    assert dot64(a.double(), b.double()) == pytest.approx(ref, rel=1e-13)
    # the accelerator path (slabs cast to float64, summed on the device) is exact too
    assert abs(krylov._dot_device(a, b) - ref) <= n * u64 * scale
    # other dtypes: float64 casts (exact products)
    h = a.to(torch.bfloat16)
    assert dot64(h, h) == pytest.approx(float(h.double() @ h.double()), rel=1e-12)


def test_dot64_is_not_a_float32_accumulation():
    n = 2 * SLAB
    a = torch.full((n,), 1.0 + 2.0 ** -12)  # every product rounds the same way: worst case
    exact = n * (1.0 + 2.0 ** -12) ** 2
    assert dot64(a, a) == pytest.approx(exact, rel=1e-12)
    # one float32 product over all entries drifts by ~5e-4
    assert abs(float(torch.dot(a, a)) - exact) > 1e6 * abs(dot64(a, a) - exact)


def _filled(n, rows, dtype, first=3, chunk=4, seed=0):
    Q, _ = torch.linalg.qr(torch.randn(n, rows, generator=_gen(seed), dtype=torch.float64))
    Q = Q.T.contiguous().to(dtype)
    B = KrylovBasis(n, rows + 1, dtype, "cpu", first=first, chunk=chunk)
    for i in range(rows):
        B.set_row(i, Q[i])
    return B, Q


def test_chunks_grow_as_needed():
    B, _ = _filled(50, 9, torch.float64, first=3, chunk=4)
    assert [c.shape[0] for c in B.chunks] == [3, 4, 3]  # capacity 10: the last chunk is cut
    assert B.peak_rows == B.allocated_rows == 10 and B.nbytes == 10 * 50 * 8 and B.size == 9
    B.set_row(9, torch.zeros(50, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="full"):
        B.set_row(10, torch.zeros(50, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_project_and_subtract_over_chunks_match_dense(dtype):
    n, rows = 70_000, 11  # several chunks and several slabs of columns
    B, Q = _filled(n, rows, dtype)
    w = torch.randn(n, generator=_gen(1), dtype=torch.float64).to(dtype)
    for m in [1, 3, 7, rows]:
        h = B.project(w, m)
        ref = Q[:m].double() @ w.double()
        assert h.dtype == torch.float64
        tol = 1e-12 if dtype == torch.float64 else 1e-6  # two-level in float32
        assert float((h - ref).abs().max()) <= tol * float(w.double().norm())
        w2 = B.subtract(w.clone(), ref, m)
        expect = w.double() - Q[:m].double().T @ ref
        assert float((w2.double() - expect).abs().max()) <= 50 * torch.finfo(dtype).eps * float(
            w.double().abs().max())


def test_rotate_in_place_matches_dense():
    n, m, p = 5000, 9, 5
    B, Q = _filled(n, m, torch.float64)
    S = torch.randn(m, p, generator=_gen(2), dtype=torch.float64)
    B.rotate(S, m)
    got = torch.stack([B.row(i) for i in range(p)])
    torch.testing.assert_close(got, S.T @ Q, rtol=1e-12, atol=1e-12)
    B.truncate(p)
    assert B.allocated_rows == 7 and B.size == p  # the chunk holding row p-1 is kept


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_omega_recurrence_tracks_the_loss_of_orthogonality_of_plain_lanczos(seed):
    """Simon's estimates against the true ``max |Q^T q_{j+1}|`` of Lanczos without any
    reorthogonalization (float64, a dominant eigenvalue: orthogonality is lost fast): within a
    factor 20 while the loss is small (the rounding terms are a model, and the rounding depends
    on the BLAS kernels: seed 0 was 11x low on an AMD EPYC, within 10x on an Intel Xeon;
    top_eigenpairs calibrates them at each pass), and above ``sqrt(eps)`` no later than one step
    after the truth."""
    from analysis.krylov import OmegaRecurrence
    n, steps = 3000, 45
    d = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    d[0], d[1] = 4.0, 3.0
    q = torch.randn(n, generator=_gen(seed), dtype=torch.float64)
    Q = [q / q.norm()]
    T = torch.zeros(steps + 1, steps + 1, dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    om = OmegaRecurrence(steps + 1, eps)
    beta_prev, tnorm, first_true, first_est, worst = 0.0, 0.0, None, None, 0.0
    for j in range(steps):
        w = d * Q[j]
        alpha = float(Q[j] @ w)
        w = w - alpha * Q[j] - (beta_prev * Q[j - 1] if j else 0.0)
        T[j, j] = alpha
        beta = float(w.norm())
        tnorm = max(tnorm, abs(alpha) + beta_prev + beta)
        est = om.update(T, j, beta, tnorm)
        q = w / beta
        true = float((torch.stack(Q) @ q).abs().max())
        if true < 1e-2:
            assert est >= 0.05 * true, (j, est, true)
        worst = max(worst, true)
        if first_true is None and true > math.sqrt(eps):
            first_true = j
        if first_est is None and est > math.sqrt(eps):
            first_est = j
        om.advance(j, False)
        T[j + 1, j] = T[j, j + 1] = beta
        Q.append(q)
        beta_prev = beta
    assert first_true is not None and first_est is not None and first_est <= first_true + 1
    assert worst > 0.1  # orthogonality was really lost, so the comparison above meant something
