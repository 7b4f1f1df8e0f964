"""The peak memory of a slice: the saved weights and the directions, not copies of them.

Measured in a fresh subprocess (VmHWM reset before the call, as in
``tests/analysis/test_memory.py``) on a 10M-parameter float32 linear model (40 MB a vector) and
a tiny batch, so that the vectors dominate. A slice saves ``w`` (one vector) to restore it
exactly; its metadata (the norms of ``d`` and ``w``, a hash of ``d``) and the cosine of a plane
are float64-accumulated without float64 copies of whole vectors (each was two vectors' worth;
GPT-2 medium's 1-D slice peaked at 13.55 GB with them) and the hash reads the tensor's memory in
place (a ``bytes`` copy was one more vector).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from analysis import ParameterSpace
from tests.analysis.test_memory import PEAK_HELPERS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = PEAK_HELPERS + textwrap.dedent("""
    import json, sys
    import torch
    from landscape import slice_1d, slice_2d
    torch.manual_seed(0)
    model = torch.nn.Linear(4000, 2500)  # 10,002,500 parameters
    x, y = torch.randn(4, 4000), torch.randint(0, 2500, (4,))
    n = sum(p.numel() for p in model.parameters())
    d1, d2 = torch.randn(n), torch.randn(n)
    kw = dict(metrics=("loss",), progress=False)
    slice_1d(model, "cross_entropy", (x, y), d1, [0.0, 1.0], **kw)  # warm-up
    reset()
    base = peak()
    if sys.argv[1] == "1d":
        slice_1d(model, "cross_entropy", (x, y), d1, [-1.0, 0.0, 1.0], **kw)
    else:
        slice_2d(model, "cross_entropy", (x, y), d1, d2, [-1.0, 1.0], [-1.0, 1.0], **kw)
    print(json.dumps({"delta": peak() - base, "vector": n * 4}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("kind", ["1d", "2d"])
def test_a_slice_holds_the_saved_weights_and_no_copies(kind):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576",
           "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, kind], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # the saved w (one vector) plus the checks' temporaries (finite and nonzero masks of a
    # direction, a quarter vector each) and the forward pass: measured 1.74 vectors; before,
    # the float64 copies (2 vectors more per norm) and the hash's bytes copy gave 5.0
    assert out["delta"] <= 2.0 * out["vector"], out


def test_space_dot_is_float64_accurate_without_copies():
    """The float64 accumulation is kept: against an exact float64 dot of float32 vectors."""
    model = torch.nn.Linear(300, 200)
    space = ParameterSpace(model)
    g = torch.Generator().manual_seed(0)
    a = torch.randn(space.numel, generator=g) * 1e3
    b = torch.randn(space.numel, generator=g)
    exact = float(a.double() @ b.double())
    got = space.dot(a, b)
    assert got.dtype == torch.float64 and got.dim() == 0
    assert abs(float(got) - exact) <= 1e-12 * float(a.double().abs() @ b.double().abs())
    assert abs(float(space.norm(a)) - float(a.double().norm())) <= 1e-12 * float(a.double().norm())
