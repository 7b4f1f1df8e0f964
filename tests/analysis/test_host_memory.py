"""analysis.host_memory: glibc's mmap threshold fixed, so freed buffers leave the resident set.

The behaviour is measured in fresh subprocesses (the threshold is process-wide): a 16 MiB
buffer freed first raises glibc's dynamic threshold, then 64 buffers of 4 MiB interleaved
with small live blocks are freed. With the dynamic threshold the 4 MiB buffers sit in the heap
between live blocks and stay resident (~256 MiB); with the threshold fixed at 1 MiB each has
its own mapping and is returned.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from analysis.host_memory import (
    DEFAULT_MMAP_THRESHOLD,
    MmapThreshold,
    fix_mmap_threshold,
    peak_resident_bytes,
    proc_kib,
    reset_peak_resident,
    resident_bytes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import sys
import torch
from analysis.host_memory import fix_mmap_threshold, resident_bytes as rss

if sys.argv[1] == "fixed":
    res = fix_mmap_threshold()
    assert res.applied, res
big = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
del big  # glibc's dynamic threshold rises to 16 MiB here
before = rss()
blocks, pins = [], []
for _ in range(64):
    blocks.append(torch.empty(4 << 20, dtype=torch.uint8).fill_(1))
    pins.append(torch.empty(64 << 10, dtype=torch.uint8).fill_(1))  # live blocks between them
del blocks
print(rss() - before)
"""


def _retained(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, mode], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc (Linux)")
def test_freed_buffers_leave_the_resident_set():
    dynamic = _retained("default")
    if dynamic < 128 << 20:
        pytest.skip(f"this C library returned the freed buffers by itself ({dynamic} bytes kept)")
    fixed = _retained("fixed")
    assert fixed < 32 << 20, (fixed, dynamic)


def test_the_environment_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    res = fix_mmap_threshold()
    assert res == MmapThreshold(False, DEFAULT_MMAP_THRESHOLD,
                                "the environment sets MALLOC_MMAP_THRESHOLD_=65536")
    assert res.to_dict() == {"applied": False, "nbytes": DEFAULT_MMAP_THRESHOLD,
                             "reason": "the environment sets MALLOC_MMAP_THRESHOLD_=65536"}


@pytest.mark.parametrize("bad,err", [(1.5, TypeError), (True, TypeError), ("1M", TypeError),
                                     (-1, ValueError), ((32 << 20) + 1, ValueError)])
def test_bad_threshold(bad, err):
    with pytest.raises(err, match="nbytes"):
        fix_mmap_threshold(bad)


_PEAK_SCRIPT = r"""
import json
import torch
from analysis.host_memory import peak_resident_bytes, reset_peak_resident, resident_bytes
reset = reset_peak_resident()
base, peak0 = resident_bytes(), peak_resident_bytes()
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB, touched
during = resident_bytes()
del x
after = resident_bytes()
print(json.dumps(dict(reset=reset, base=base, peak0=peak0, during=during, after=after,
                      peak=peak_resident_bytes())))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux /proc")
def test_resident_and_peak_bytes_follow_an_allocation():
    """The readers against a 64 MiB buffer touched and freed in a fresh process: the resident
    set grows by it and falls back, the high-water mark keeps it, and a reset lowers the mark to
    the resident set (so a later peak measures only what follows)."""
    import json

    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True,
                         cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    mib = 1 << 20
    assert r["reset"] is True
    assert abs(r["peak0"] - r["base"]) < 4 * mib  # reset: the mark is the resident set
    assert r["during"] - r["base"] > 60 * mib
    assert r["during"] - r["after"] > 60 * mib  # a 64 MiB buffer is its own mapping: returned
    assert r["peak"] - r["base"] > 60 * mib  # the mark keeps it
    # (the kernel updates VmHWM lazily, from per-thread RSS counters: within a few pages)
    assert r["peak"] >= r["during"] - mib


def test_proc_readers_in_this_process():
    assert proc_kib("/proc/self/status", "NoSuchField") is None
    assert proc_kib("/no/such/file", "VmRSS") is None
    if sys.platform.startswith("linux"):
        assert resident_bytes() > 0
        assert peak_resident_bytes() >= resident_bytes() - (1 << 20)
    assert isinstance(reset_peak_resident(), bool)
