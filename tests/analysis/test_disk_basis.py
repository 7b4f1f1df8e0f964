"""The Krylov basis on disk (``top_eigenpairs(basis_device="disk")``, analysis.disk_basis).

References: dense float64 matrices for the basis operations (projections, subtraction,
rotations, rows) with slabs forced small and a ragged last slab; closed-form spectra
(diagonal operators) and the in-memory basis for whole Lanczos runs (the same products, the
same eigenvalues to rounding); the resident-set high-water mark of a fresh subprocess for the
documented memory bound ``max(3, k) n s + DISK_BUFFER_BYTES`` at a ``max_basis`` whose rows in
memory would be 10x that.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

from analysis import top_eigenpairs
from analysis.disk_basis import DISK_BUFFER_BYTES, DiskBasis, disk_memory_bound_bytes
from analysis.krylov import EXACT_SLAB, KrylovBasis
from tests.analysis.test_large_basis import lanczos_peak
from tests.models import Diagonal


def spectrum(n: int, dtype=torch.float64) -> torch.Tensor:
    """A bulk in [0, 1] under separated top eigenvalues 10, 8, 6.5, 5, 4 (shuffled in)."""
    g = torch.Generator().manual_seed(0)
    d = torch.rand(n, generator=g, dtype=torch.float64)
    d[torch.randperm(n, generator=g)[:5]] = torch.tensor([10.0, 8.0, 6.5, 5.0, 4.0],
                                                         dtype=torch.float64)
    return d.to(dtype)


def small_basis(n: int, capacity: int, dtype=torch.float64, work=None) -> DiskBasis:
    # the smallest buffer: one EXACT_SLAB of columns, so n = 2.5 slabs gives a ragged last one
    per_col = capacity * (dtype.itemsize + 2 * (work or dtype).itemsize)
    return DiskBasis(n, capacity, dtype, "cpu", work_dtype=work, buffer_bytes=per_col)


def test_operations_against_dense_float64():
    n, m = int(2.5 * EXACT_SLAB), 5
    b = small_basis(n, 6)
    assert b.width == EXACT_SLAB  # three slabs, the last half full
    g = torch.Generator().manual_seed(1)
    Q = torch.randn(m, n, generator=g, dtype=torch.float64)
    for i in range(m):
        b.set_row(i, Q[i])
    assert b.size == b.rows == b.peak_rows == m and b.nbytes == m * n * 8
    w = torch.randn(n, generator=g, dtype=torch.float64)
    torch.testing.assert_close(b.project(w, m), Q @ w, rtol=1e-13, atol=0)
    torch.testing.assert_close(b.project(w, 3), Q[:3] @ w, rtol=1e-13, atol=0)
    h = torch.randn(m, generator=g, dtype=torch.float64)
    torch.testing.assert_close(b.subtract(w.clone(), h, m), w - Q.T @ h, rtol=1e-13, atol=1e-12)
    torch.testing.assert_close(b.row(3), Q[3], rtol=0, atol=0)
    # the three-term recurrence's update with a row read back: bit for bit the in-memory one
    assert torch.equal(b.add_row(w.clone(), 2, -0.37), w.clone().add_(Q[2], alpha=-0.37))
    S = torch.randn(m, 2, generator=g, dtype=torch.float64)
    out = torch.empty(2, n, dtype=torch.float64)
    b.rotate(S, m, out=out)  # into out, the basis left as it is
    torch.testing.assert_close(out, S.T @ Q, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.row(4), Q[4], rtol=0, atol=0)
    b.rotate(S, m)  # in place: rows 0..1 <- S^T Q
    assert b.size == 2
    torch.testing.assert_close(b.row(0), (S.T @ Q)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.row(1), (S.T @ Q)[1], rtol=1e-12, atol=1e-12)
    b.truncate(1)
    assert b.rows == 1 and os.fstat(b.fd).st_size == n * 8
    with pytest.raises(RuntimeError, match="full"):
        b.set_row(6, w)
    b.close()


@pytest.mark.parametrize("store", [torch.float32, torch.bfloat16, torch.float16])
def test_narrow_rows_on_disk_match_the_in_memory_narrow_basis(store):
    """A narrower stored dtype (float16 rows scaled, as in memory): the same numbers as the
    in-memory narrow KrylovBasis up to the order of the float64 additions."""
    work = torch.float64 if store == torch.float32 else torch.float32
    n, m = int(2.5 * EXACT_SLAB), 4
    d, mem = small_basis(n, 4, store, work), KrylovBasis(n, 4, store, "cpu", first=1,
                                                          work_dtype=work)
    g = torch.Generator().manual_seed(2)
    Q = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0].T.to(work)
    for i in range(m):
        d.set_row(i, Q[i])
        mem.set_row(i, Q[i])
    assert d.scale == mem.scale
    w = torch.randn(n, generator=g, dtype=torch.float64).to(work)
    # the stored rows in float64 (rounded to the stored dtype): the exact projections
    Qs = Q.to(store).to(torch.float64)
    exact = Qs @ w.double()
    # two-level sums in the working precision: within a few eps_work |q| |w| of exact, and of
    # each other (the slabs' BLAS calls differ in their strides, so not bit for bit)
    tol = 8 * torch.finfo(work).eps * float(w.double().norm())
    torch.testing.assert_close(d.project(w, m), exact, rtol=0, atol=tol)
    torch.testing.assert_close(mem.project(w, m), exact, rtol=0, atol=tol)
    h = torch.randn(m, generator=g, dtype=torch.float64)
    torch.testing.assert_close(d.subtract(w.clone(), h, m), mem.subtract(w.clone(), h, m))
    S = torch.randn(m, 2, generator=g, dtype=torch.float64)
    a, b = torch.empty(2, n, dtype=work), torch.empty(2, n, dtype=work)
    d.rotate(S, m, out=a)
    mem.rotate(S, m, out=b)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kw", [
    dict(k=3),
    dict(k=3, max_basis=6),  # thick restarts
    dict(k=2, reorth="full"),
    dict(k=2, basis_dtype=torch.float32),  # a narrow basis, on disk
    dict(k=2, which="SA", v0="random"),  # on -d: the separated values are the smallest
])
def test_lanczos_on_disk_equals_the_in_memory_run(kw):
    d = spectrum(30_000) * (-1 if kw.get("which") == "SA" else 1)
    mem = top_eigenpairs(Diagonal(d), tol=1e-8, **kw)
    disk = top_eigenpairs(Diagonal(d), tol=1e-8, basis_device="disk", **kw)
    assert disk.converged and mem.converged
    assert disk.num_matvecs == mem.num_matvecs
    torch.testing.assert_close(disk.eigenvalues, mem.eigenvalues, rtol=1e-10, atol=1e-12)
    ref = torch.sort(d, descending=True).values
    ref = ref[:kw["k"]] if kw.get("which", "LA") == "LA" else ref[-kw["k"]:]
    err = (disk.eigenvalues - ref).abs()
    assert (err <= disk.error_bounds + 1e-12).all(), (err, disk.error_bounds)
    # the eigenvectors too (the sign is fixed by the largest entry): on the same device
    assert disk.eigenvectors.shape == (kw["k"], d.numel()) and disk.eigenvectors.dtype == d.dtype
    torch.testing.assert_close(disk.eigenvectors, mem.eigenvectors, rtol=0, atol=1e-6)
    assert disk.memory_bound_bytes == disk_memory_bound_bytes(d.numel(), 8, kw["k"])
    assert disk.basis_bytes > 0  # the rows it wrote (to the file)


def test_float32_operator_on_disk():
    d = spectrum(50_000, torch.float32)
    mem = top_eigenpairs(Diagonal(d), k=2, tol=1e-4)
    disk = top_eigenpairs(Diagonal(d), k=2, tol=1e-4, basis_device="disk")
    assert disk.num_matvecs == mem.num_matvecs
    torch.testing.assert_close(disk.eigenvalues, torch.tensor([10.0, 8.0]), rtol=1e-4, atol=0)
    torch.testing.assert_close(disk.eigenvalues, mem.eigenvalues, rtol=1e-6, atol=0)


def test_the_file_is_gone_after_the_run_and_after_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = spectrum(5_000)
    top_eigenpairs(Diagonal(d), k=1, tol=1e-6, basis_device="disk")
    assert list(tmp_path.iterdir()) == []

    class Failing(Diagonal):
        def matvec(self, v):
            if self.num_matvecs == 4:
                raise RuntimeError("the model failed")
            return super().matvec(v)

    def open_deleted():  # this process's open files under tmp_path (unlinked ones included)
        fds = "/proc/self/fd"
        if not os.path.isdir(fds):
            return []
        out = []
        for fd in os.listdir(fds):
            try:
                target = os.readlink(os.path.join(fds, fd))
            except OSError:
                continue
            if target.startswith(str(tmp_path)):
                out.append(target)
        return out

    with pytest.raises(RuntimeError, match="the model failed") as err:
        top_eigenpairs(Failing(d), k=1, tol=1e-12, basis_device="disk")
    assert list(tmp_path.iterdir()) == []  # unlinked at creation: nothing left behind
    # and closed, although the exception (and its traceback's frames) is still referenced
    assert err.value is not None and open_deleted() == []


@pytest.mark.parametrize("bad", ["disc", "tape", 3.5])
def test_bad_basis_device_is_refused_with_its_value(bad):
    from analysis.cost import vectors_bytes

    with pytest.raises(ValueError, match="basis_device must be a device") as err:
        top_eigenpairs(Diagonal(spectrum(100)), k=1, basis_device=bad)
    assert repr(bad) in str(err.value)
    with pytest.raises(ValueError, match="basis_device must be a device"):
        vectors_bytes("lanczos", 100, 8, basis_device=bad)


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_memory_on_disk_does_not_grow_with_the_basis():
    """Rows of 4M float32 entries (16 MB) on disk, about 20 of them: the peak extra memory stays
    within ``4 n s + DISK_BUFFER_BYTES`` (128 MB) plus one product, where the in-memory run holds
    its rows; the same products and the same top eigenvalue."""
    n = 4_000_000
    top = {0: 10.0, 1: 9.5, 2: 9.0, 3: 8.5}  # a slow top: the basis fills
    kw = dict(k=1, tol=1e-6, max_basis=40, max_iter=40)
    disk = lanczos_peak(n, top, basis_device="disk", **kw)
    mem = lanczos_peak(n, top, **kw)
    row = n * 4
    assert disk["matvecs"] == mem["matvecs"] >= 15, (disk, mem)
    assert abs(disk["top"] - 10.0) <= 1e-4 and abs(disk["top"] - mem["top"]) <= 1e-5
    assert disk["bound"] == 4 * row + DISK_BUFFER_BYTES
    rows = disk["basis_bytes"] // row
    # the rows written (in memory: allocated in chunks of up to 16 rows)
    assert rows >= 15 and mem["basis_bytes"] >= disk["basis_bytes"]
    margin = 16 * 2**20  # allocator slack and small CPU tensors
    assert disk["delta"] - disk["hvp"] <= disk["bound"] + margin, disk
    # the in-memory run holds its rows: what the disk saved
    assert mem["delta"] - mem["hvp"] >= (rows - 1) * row, mem
    assert mem["delta"] - mem["hvp"] > 3 * (disk["delta"] - disk["hvp"]), (disk, mem)


def test_the_estimate_counts_no_rows_on_disk():
    from analysis.cost import vectors_bytes

    n = 1_000_000
    assert vectors_bytes("lanczos", n, 4, k=2, basis_device="disk") == \
        disk_memory_bound_bytes(n, 4, 2) == 4 * n * 4 + DISK_BUFFER_BYTES
    assert vectors_bytes("lanczos", n, 4, k=5, max_basis=40, basis_device="disk") == \
        5 * n * 4 + DISK_BUFFER_BYTES  # max(4, k) working vectors, no max_basis term
    assert vectors_bytes("lanczos", n, 4, max_basis=40) == 43 * n * 4  # in memory


def test_equal_tensors_compares_bits():
    """The offload's check that the weights are still the saved ``w``: bitwise (a sign of zero
    and a NaN payload are seen; the same NaN is equal), across slabs and tensors."""
    n = int(2.5 * EXACT_SLAB)
    b = small_basis(n, 2, torch.float32)
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(n - 100, generator=g), torch.randn(100, generator=g)]
    ts[1][3] = float("nan")
    assert not b.equal_tensors(1, ts)  # nothing written yet
    b.write_tensors(1, ts)
    assert b.equal_tensors(1, ts)
    ts[0][n - 101] = 1.5
    b.write_tensors(1, ts)
    ts[0][n - 101] = -1.5  # one sign bit, in the last slab of the first tensor
    assert not b.equal_tensors(1, ts)
    ts[1][0] = 0.0
    b.write_tensors(1, ts)
    ts[1][0] = -0.0  # equal as numbers, not as bits
    assert not b.equal_tensors(1, ts)
    ts[1][0] = 0.0
    assert b.equal_tensors(1, ts)
    b.close()
