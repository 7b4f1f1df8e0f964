"""The Krylov basis grows by bytes, not rows, and the documented peak-memory bound holds at
large ``n`` (a synthetic diagonal operator of 20M float32 entries, 80 MB a vector).

Measured in a fresh subprocess as in ``tests/analysis/test_memory.py`` (the resident-set
high-water mark VmHWM, reset through /proc/self/clear_refs; one product's working memory
measured the same way and allowed on top). About 5 s and 0.7 GB.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from analysis.krylov import CHUNK_BYTES, MAX_CHUNK_ROWS, KrylovBasis, chunk_rows
from tests.analysis.test_memory import PEAK_HELPERS

_SCRIPT = PEAK_HELPERS + textwrap.dedent("""
    import json, sys
    import torch
    from analysis.lanczos import top_eigenpairs
    from tests.models import Diagonal

    n, spec = int(sys.argv[1]), json.loads(sys.argv[2])
    d = torch.rand(n, generator=torch.Generator().manual_seed(0))
    for i, value in spec["top"].items():  # eigenvalues in [0, 1] and these
        d[int(i)] = value
    op = Diagonal(d)
    v = torch.randn(n)
    reset()
    base = peak()
    w = op.matvec(v)   # one product's working memory: its output
    hvp = peak() - base
    del w
    reset()
    base = peak()
    res = top_eigenpairs(op, v0="random", **spec["lanczos"])
    print(json.dumps({"delta": peak() - base, "hvp": hvp, "basis_bytes": res.basis_bytes,
                      "bound": res.memory_bound_bytes, "matvecs": res.num_matvecs,
                      "top": float(res.eigenvalues[0]), "converged": res.converged}))
""")


def lanczos_peak(n: int, top: dict[int, float], **lanczos) -> dict:
    """``top_eigenpairs(v0="random", **lanczos)`` on a diagonal operator of ``n`` float32 entries
    in [0, 1] with ``top`` (position: value) set, in a fresh subprocess (one thread, glibc's mmap
    threshold fixed): its peak resident growth (``delta``) and that of one product alone
    (``hvp``), with the result's numbers (also ``tests/analysis/test_disk_basis.py``)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": root}
    spec = json.dumps({"top": {str(i): v for i, v in top.items()}, "lanczos": lanczos})
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(n), spec], capture_output=True,
                          text=True, timeout=600, env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MARGIN = 16 * 2**20  # allocator slack and small CPU tensors


def test_chunk_rows_hold_at_most_one_vector_or_the_byte_budget():
    assert chunk_rows(1000, 8) == MAX_CHUNK_ROWS
    assert chunk_rows(20_000_000, 4) == 3 and 3 * 20_000_000 * 4 <= CHUNK_BYTES
    assert chunk_rows(124_000_000, 4) == 1  # GPT-2 small: one 0.5 GB row, not 16 (8 GB)
    assert KrylovBasis(124_000_000, 21, torch.float32, "meta", first=1).chunk == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_memory_of_lanczos_at_20m_entries_is_the_rows_used():
    n = 20_000_000
    out = lanczos_peak(n, {7: 10.0}, k=1, tol=1e-4)
    assert out["converged"] and abs(out["top"] - 10.0) <= 1e-3
    row = n * 4
    used = out["matvecs"] + 1  # basis rows written
    # allocated in chunks of chunk_rows(n, 4) = 3 rows after the first: within one chunk of use
    assert out["basis_bytes"] <= (used + chunk_rows(n, 4) - 1) * row, out
    assert out["basis_bytes"] < 17 * row  # the old 1 + 16-row growth
    # the documented bound, (max_basis + 3) n itemsize plus one product, holds ...
    assert out["delta"] - out["hvp"] <= out["bound"] + MARGIN, out
    # ... and the measured peak is the rows allocated plus a few vectors, not max_basis rows
    assert out["delta"] - out["hvp"] <= out["basis_bytes"] + 3 * row + MARGIN, out
