"""CUDA against the CPU float64 result: operators, Lanczos, trace, slices and MSAM steps.

Marked ``gpu`` and skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them (``pytest -m gpu``).
Each test runs the same computation in float64 on the CPU and on CUDA and compares the results.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.models import classification_data, mlp

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _pair():
    model, data = mlp(hidden=16), classification_data(n=64)
    cuda = copy.deepcopy(model).cuda()
    x, y = data
    return model, data, cuda, (x.cuda(), y.cuda())


@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward", "cached-graph"])
def test_hvp_and_matmat_on_cuda_match_cpu_float64(method):
    from analysis import GGNOperator, HessianOperator
    from analysis.reference import dense_hessian
    model, data, cuda, cdata = _pair()
    H = dense_hessian(model, "cross_entropy", data)
    op = HessianOperator(cuda, "cross_entropy", cdata, method=method)
    V = torch.randn(H.shape[0], 5, dtype=torch.float64)
    torch.testing.assert_close(op.matmat(V.cuda()).cpu(), H @ V, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close((op @ V[:, 0].cuda()).cpu(), H @ V[:, 0], rtol=1e-8, atol=1e-10)
    g_cpu = GGNOperator(model, "cross_entropy", data) @ V[:, 1]
    g_gpu = GGNOperator(cuda, "cross_entropy", cdata) @ V[:, 1].cuda()
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("basis_device", [None, "cpu"])
def test_lanczos_on_cuda_matches_cpu(basis_device):
    from analysis import top_eigenpairs
    from analysis.reference import dense_hessian
    model, data, cuda, cdata = _pair()
    ev = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", data)).flip(0)[:3]
    res = top_eigenpairs(cuda, "cross_entropy", cdata, k=3, tol=1e-10, basis_device=basis_device)
    torch.testing.assert_close(res.eigenvalues.cpu(), ev, rtol=1e-7, atol=1e-9)
    want = torch.device("cpu") if basis_device else torch.device("cuda", torch.cuda.current_device())
    assert res.eigenvectors.device == want


def test_lanczos_cuda_peak_memory_within_formula():
    from analysis import HessianOperator, top_eigenpairs
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(500, 2000), torch.nn.Tanh(),
                                torch.nn.Linear(2000, 10)).cuda()
    x, y = torch.randn(8, 500, device="cuda"), torch.randint(0, 10, (8,), device="cuda")
    op = HessianOperator(model, "cross_entropy", (x, y), method="forward-over-reverse")
    v = torch.randn(op.shape[0], device="cuda")
    op.matvec(v)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    one = torch.cuda.max_memory_allocated()
    op.matvec(v)
    hvp = torch.cuda.max_memory_allocated() - base  # one product's working memory
    torch.cuda.reset_peak_memory_stats()
    res = top_eigenpairs(op, k=5, max_basis=30, tol=1e-12, max_iter=70, v0="random")
    peak = torch.cuda.max_memory_allocated() - base
    assert res.num_restarts >= 1
    assert peak <= res.memory_bound_bytes + hvp + 8 * 2**20, (peak, res.memory_bound_bytes, hvp, one)
    # with the basis on the host only a few vectors stay on the GPU
    torch.cuda.reset_peak_memory_stats()
    res = top_eigenpairs(op, k=5, max_basis=30, tol=1e-12, max_iter=70, v0="random",
                         basis_device="cpu")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 4 * op.shape[0] * 4 + hvp + 8 * 2**20


def test_trace_and_density_on_cuda_match_cpu():
    from analysis import hessian_trace, spectral_density
    model, data, cuda, cdata = _pair()
    for method in ("hutch++", "hutchinson"):
        a = hessian_trace(model, "cross_entropy", data, num_matvecs=30, method=method)
        b = hessian_trace(cuda, "cross_entropy", cdata, num_matvecs=30, method=method)
        assert b.estimate == pytest.approx(a.estimate, rel=1e-8, abs=1e-10)
    a = spectral_density(model, "cross_entropy", data, num_iter=15, num_runs=2)
    b = spectral_density(cuda, "cross_entropy", cdata, num_iter=15, num_runs=2)
    torch.testing.assert_close(torch.as_tensor(b.nodes), torch.as_tensor(a.nodes),
                               rtol=1e-7, atol=1e-9)


def test_slice_on_cuda_matches_cpu():
    from landscape import slice_1d
    model, data, cuda, cdata = _pair()
    n = sum(p.numel() for p in model.parameters())
    d = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = slice_1d(model, "cross_entropy", data, d, [-1.0, 0.0, 0.5, 1.0])
    b = slice_1d(cuda, "cross_entropy", cdata, d.cuda(), [-1.0, 0.0, 0.5, 1.0])
    torch.testing.assert_close(torch.as_tensor(b.loss), torch.as_tensor(a.loss),
                               rtol=1e-10, atol=1e-12)


def test_msam_steps_on_cuda_match_cpu():
    from msam import MSAM
    model, data, cuda, cdata = _pair()
    outs = []
    for net, (x, y) in ((model, data), (cuda, cdata)):
        opt = MSAM(net.parameters(), lr=0.1, momentum=0.9, rho=0.3)
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
        outs.append(torch.cat([p.detach().reshape(-1).cpu() for p in net.parameters()]))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-10, atol=1e-12)
