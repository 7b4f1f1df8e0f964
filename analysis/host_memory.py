"""Host memory: keep freed buffers from staying resident under glibc's malloc.

glibc serves an allocation from its heap below the *mmap threshold* and with its own
``mmap`` above it, and it raises that threshold at run time: every time a block that was
``mmap``-ed is freed, the threshold grows to that block's size (up to 32 MiB on 64-bit Linux).
After the first freed activation or communication buffer of a few MiB, every later buffer of
that size lands in the heap, where memory freed between others cannot be given back to the
system. The resident set then grows with each gradient although the live tensors do not.

FSDP2 on the CPU is hit hardest: its all-gather and reduce-scatter buffers (one transformer
block's parameters, a few to tens of MiB) are allocated and freed around every unit's forward
and backward. Measured on GPT-2 small, 2 gloo ranks, the top eigenvalue with 1 Lanczos step
(``benchmarks/fsdp_memory.py``; docs/guides/distributed.md): the peak resident set per rank is
3.63-3.70 GB with glibc's default, 2.44 GB with the threshold fixed at 1 MiB and 2.29 GB at
128 KiB; one process, 4.81 GB and 4.51 GB (128 KiB). The whole run took 73 s at 1 MiB, 65-71 s
with the default and 80-82 s at 128 KiB, on a loaded machine.

The fixed threshold costs time where many buffers lie between it and 32 MiB: every one is
mapped and zero-filled afresh. The products of a width-32 CIFAR ResNet-18 (8 samples per batch,
1 thread) took 2.10-2.14 s of CPU time at 1 MiB against 1.41-1.47 s with glibc's default
(width 8: 0.23-0.26 s against 0.23-0.24 s).

:func:`fix_mmap_threshold` sets a fixed threshold (``mallopt(M_MMAP_THRESHOLD, nbytes)``, which
also turns the dynamic adjustment off), as the environment variable ``MALLOC_MMAP_THRESHOLD_``
would at start-up. It changes the whole process, so library functions never call it:
``landscape ... --fsdp`` does on the CPU, after sharding the model, and scripts may. It does nothing when the
environment already sets ``MALLOC_MMAP_THRESHOLD_`` (the user's choice wins) or when the C
library is not glibc (the result says why). GPU tensors are not affected (the CUDA caching
allocator keeps its own pool).

Measuring it: :func:`resident_bytes` (the resident set now, ``VmRSS``),
:func:`peak_resident_bytes` (its high-water mark, ``VmHWM``) and :func:`reset_peak_resident`
(the high-water mark back to the resident set now, for a clean baseline) read Linux's
``/proc/self``; the estimates of :mod:`analysis.cost`, the memory tests and the benchmarks use
them. Only host memory: CUDA memory is ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys
from dataclasses import dataclass
from typing import Any

from .results import Result

__all__ = ["DEFAULT_MMAP_THRESHOLD", "MmapThreshold", "fix_mmap_threshold", "proc_kib",
           "resident_bytes", "peak_resident_bytes", "reset_peak_resident"]

DEFAULT_MMAP_THRESHOLD = 1 << 20
"""1 MiB: most of the default's speed with most of 128 KiB's memory (see the module docstring)."""

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_MAX_THRESHOLD = 32 << 20  # glibc's HEAP_MAX_SIZE / 2 on 64-bit: mallopt refuses more
ENV = "MALLOC_MMAP_THRESHOLD_"


@dataclass(frozen=True, repr=False)
class MmapThreshold(Result):
    """What :func:`fix_mmap_threshold` did.

    Attributes:
        applied: whether this call set the threshold.
        nbytes: the threshold asked for.
        reason: why it was not applied (``""`` when it was).
    """

    applied: bool
    nbytes: int
    reason: str = ""


def _libc() -> Any:
    """glibc's handle, or ``None`` on another C library or platform."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it
        return libc if hasattr(libc, "mallopt") else None
    except (OSError, AttributeError):
        return None


def fix_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> MmapThreshold:
    """Fix glibc's mmap threshold at ``nbytes`` for this process (see the module docstring).

    Allocations of at least ``nbytes`` get their own mapping, given back to the system when
    freed, so buffers that come and go (activations, FSDP2's all-gather and reduce-scatter
    buffers) no longer fragment the heap and inflate the resident set.

    Args:
        nbytes: the threshold in bytes, ``0 <= nbytes <= 32 MiB`` (default 1 MiB).

    Returns:
        An :class:`MmapThreshold`: ``applied=False`` with the reason when the environment sets
        ``MALLOC_MMAP_THRESHOLD_`` or the C library is not glibc.

    Raises:
        TypeError: ``nbytes`` is not an integer.
        ValueError: ``nbytes`` is outside ``[0, 32 MiB]``.

    Example:
        >>> from analysis.host_memory import fix_mmap_threshold
        >>> fix_mmap_threshold().nbytes
        1048576
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an integer number of bytes, got {nbytes!r}")
    if not 0 <= nbytes <= _MAX_THRESHOLD:
        raise ValueError(f"nbytes must be in [0, {_MAX_THRESHOLD}] (glibc's limit, 32 MiB), "
                         f"got {nbytes}")
    if os.environ.get(ENV):
        return MmapThreshold(False, nbytes, f"the environment sets {ENV}={os.environ[ENV]}")
    libc = _libc()
    if libc is None:
        return MmapThreshold(False, nbytes, f"the C library is not glibc ({sys.platform})")
    if libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(nbytes)) != 1:
        return MmapThreshold(False, nbytes, f"glibc's mallopt refused {nbytes}")
    return MmapThreshold(True, nbytes)


def proc_kib(path: str, key: str) -> int | None:
    """The ``key:`` field of a Linux ``/proc`` file in KiB (``None`` where it cannot be read).

    Example:
        >>> from analysis.host_memory import proc_kib
        >>> proc_kib("/proc/self/status", "NoSuchField") is None
        True
    """
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident_bytes() -> int:
    """The resident memory of this process now (Linux ``VmRSS``; 0 where it cannot be read)."""
    kib = proc_kib("/proc/self/status", "VmRSS")
    return 0 if kib is None else kib * 1024


def peak_resident_bytes() -> int:
    """The high-water mark of this process's resident memory, in bytes: Linux ``VmHWM`` (which
    :func:`reset_peak_resident` lowers), else ``getrusage``'s ``ru_maxrss`` (the peak since the
    process started; KiB on Linux, bytes on macOS)."""
    kib = proc_kib("/proc/self/status", "VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


def reset_peak_resident() -> bool:
    """Set the high-water mark of :func:`peak_resident_bytes` to the resident memory now
    (``/proc/self/clear_refs``, Linux 4.0 and later), so that a later peak measures only what
    follows. Returns whether it was reset (``False`` where the kernel offers no reset: the peak
    then includes everything since the process started)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False
