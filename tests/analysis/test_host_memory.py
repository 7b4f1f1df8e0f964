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

from analysis.host_memory import DEFAULT_MMAP_THRESHOLD, MmapThreshold, fix_mmap_threshold

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = r"""
import sys
import torch
from analysis.host_memory import fix_mmap_threshold

if sys.argv[1] == "fixed":
    res = fix_mmap_threshold()
    assert res.applied, res
def rss():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
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
