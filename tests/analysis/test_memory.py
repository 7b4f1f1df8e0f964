"""Peak memory of Lanczos, Hutch++ (whole and bounded sketch) and SLQ against the documented
formulas.

Measured in a fresh subprocess (the resident-set high-water mark VmHWM, reset to the current RSS
through /proc/self/clear_refs before each measurement; tracemalloc does not see torch's
allocations; one product's working memory is measured the same way and allowed on top, as the
formula says) on a float64 model of ~1M parameters whose products need little working
memory, so the Krylov basis dominates. The CUDA variant (``torch.cuda.max_memory_allocated``) is in
``tests/test_gpu.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

#: ``peak()`` and ``reset()`` of the measuring subprocesses (also ``test_large_basis.py``).
PEAK_HELPERS = textwrap.dedent("""
    from analysis.host_memory import peak_resident_bytes as peak  # VmHWM, else ru_maxrss
    from analysis.host_memory import reset_peak_resident as reset  # VmHWM back to the RSS now
""")

_SCRIPT = PEAK_HELPERS + textwrap.dedent("""
    import json, sys
    import torch
    from analysis import HessianOperator
    from analysis.lanczos import top_eigenpairs
    from analysis.trace import hessian_trace
    from analysis.density import spectral_density
    torch.manual_seed(0)
    what = sys.argv[1]
    model = torch.nn.Sequential(torch.nn.Linear(500, 1000), torch.nn.Tanh(),
                                torch.nn.Linear(1000, 500), torch.nn.Tanh(),
                                torch.nn.Linear(500, 10)).double()
    x, y = torch.randn(4, 500, dtype=torch.float64), torch.randint(0, 10, (4,))
    op = HessianOperator(model, "cross_entropy", (x, y), method="forward-over-reverse")
    n = op.shape[0]
    v = torch.randn(n, dtype=torch.float64)
    for _ in range(3):   # the product's own working memory is in the baseline peak
        op.matvec(v)
    reset()
    base = peak()
    op.matvec(v)   # one product's working memory, measured from the same baseline
    hvp = peak() - base
    reset()
    base = peak()
    out = {"n": n, "hvp": hvp}
    if what == "lanczos":
        res = top_eigenpairs(op, k=5, max_basis=30, tol=1e-12, max_iter=70, v0="random")
        out.update(basis_bytes=res.basis_bytes, bound=res.memory_bound_bytes,
                   restarts=res.num_restarts)
    elif what == "lanczos-early":
        res = top_eigenpairs(op, k=2, max_basis=60, tol=0.5, v0="random")
        out.update(basis_bytes=res.basis_bytes, bound=res.memory_bound_bytes,
                   matvecs=res.num_matvecs)
    elif what == "hutch++":
        res = hessian_trace(op, num_matvecs=60, block_size=4)
        out.update(bound=res.memory_bound_bytes)
    elif what == "hutch++-bounded":
        res = hessian_trace(op, num_matvecs=200, max_vectors=20, data_stderr=False)
        out.update(bound=res.memory_bound_bytes, block=res.block_size, products=res.num_matvecs)
    elif what == "slq":
        res = spectral_density(op, num_iter=20, num_runs=3)
        out.update(bound=(20 + 5) * n * 8)   # the basis, the start vector, w and two temporaries
    out["delta"] = peak() - base
    out["delta_minus_hvp"] = out["delta"] - hvp
    print(json.dumps(out))
""")


def _measure(what: str) -> dict:
    # a fixed mmap threshold: freed vectors go back to the OS, so the peak RSS is the peak of
    # live memory (glibc's dynamic threshold would keep freed 8 MB vectors on the heap)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, what], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MARGIN = 16 * 2**20  # allocator slack and small CPU tensors


@pytest.mark.slow
def test_lanczos_peak_memory_within_formula():
    out = _measure("lanczos")
    n = out["n"]
    assert out["restarts"] >= 1  # the in-place restart was exercised
    assert out["bound"] == (30 + 3) * n * 8
    assert out["basis_bytes"] <= 31 * n * 8
    assert out["delta_minus_hvp"] <= out["bound"] + MARGIN, out
    # and the basis really was allocated (the measurement sees it)
    assert out["delta"] >= 0.5 * out["basis_bytes"], out


@pytest.mark.slow
def test_lanczos_basis_grows_only_as_needed():
    out = _measure("lanczos-early")
    n = out["n"]
    used = out["matvecs"] + 1
    # chunks: k=2 rows first, then 16 rows: at most used + 16 rows, far below max_basis + 1 = 61
    assert out["basis_bytes"] <= (used + 16) * n * 8 < 61 * n * 8, out
    assert out["delta_minus_hvp"] <= out["basis_bytes"] + 3 * n * 8 + MARGIN, out


@pytest.mark.slow
def test_hutchpp_peak_memory_bounded_by_sketch_and_block():
    out = _measure("hutch++")
    # the bound plus one block of 4 products' working memory (about 4 single products)
    assert out["delta"] - 4 * out["hvp"] <= out["bound"] + MARGIN, out


@pytest.mark.slow
def test_bounded_hutchpp_peak_memory_within_max_vectors():
    # 200 products: the whole sketch would be 66 vectors; max_vectors=20 holds a sketch of 12
    # and blocks of 2 (bound 20 vectors) plus a block of 2 products' working memory
    out = _measure("hutch++-bounded")
    n = out["n"]
    assert out["products"] == 200 and out["block"] == 2 and out["bound"] == 20 * n * 8
    assert out["delta"] - 2 * out["hvp"] <= out["bound"] + MARGIN, out
    assert out["delta"] >= 10 * n * 8, out  # the sketch really was allocated (seen)


@pytest.mark.slow
def test_slq_peak_memory_bounded_by_one_run():
    out = _measure("slq")
    assert out["delta_minus_hvp"] <= out["bound"] + MARGIN, out
