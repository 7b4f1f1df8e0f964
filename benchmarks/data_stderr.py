"""The cost of the data-sampling standard errors (issue 26 item 14, :mod:`analysis.uncertainty`).

For each estimate, the wall time with ``data_stderr=True`` (the default) over the time with
``data_stderr=False``, in the same process, on a small MLP (784-128-10, float32, CPU) with the
data in one batch (split into 16 groups for the SE) and in 16 batches (the batches are the
units). Also the products / forward samples each adds (``data_sampling.matvecs`` /
``forward_passes``). No timing asserts in the tests: run

    PYTHONPATH=. python benchmarks/data_stderr.py [--samples 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from torch import nn

from analysis import (
    HessianOperator,
    directional_sharpness,
    epsilon_sharpness,
    hessian_trace,
    top_eigenpairs,
)


def _problem(samples: int) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 128), nn.Tanh(), nn.Linear(128, 10))
    x = torch.randn(samples, 784, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return model, x, y


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, x, y = _problem(args.samples)
    n = sum(p.numel() for p in model.parameters())
    d = torch.randn(n, generator=torch.Generator().manual_seed(1))
    print(f"MLP 784-128-10 ({n} parameters), {args.samples} samples, float32, CPU, 1 thread; "
          f"median of {args.repeats}")
    print("| estimate | data | time with SE / without | extra products | extra forward passes |")
    print("|---|---|---|---|---|")
    for batches in (1, 16):
        bs = None if batches == 1 else args.samples // batches
        for name, run in _cases(model, (x, y), bs, d).items():
            off, _ = _timed(functools.partial(run, False), args.repeats)
            on, res = _timed(functools.partial(run, True), args.repeats)
            ds = res.data_sampling
            units = f"{ds.units} {ds.unit}{'es' if ds.unit == 'batch' else 's'}"
            print(f"| {name} | {batches} batch{'es' * (batches > 1)} ({units}) | "
                  f"{on / off:.2f} | {ds.matvecs} | {ds.forward_passes} |")


def _cases(model: nn.Module, data: tuple, bs: int | None, d: torch.Tensor) -> dict:
    """``{estimate: run(data_stderr) -> result}`` on ``data`` split into batches of ``bs``."""
    def op():
        return HessianOperator(model, "cross_entropy", data, batch_size=bs)

    return {
        "top-5 eigenvalues": lambda se: top_eigenpairs(op(), k=5, seed=0, data_stderr=se),
        "trace (Hutch++, 99)": lambda se: hessian_trace(op(), data_stderr=se),
        "epsilon (L-BFGS-B, 10)": lambda se: epsilon_sharpness(
            model, "cross_entropy", data, batch_size=bs, data_stderr=se),
        "directional (5 radii)": lambda se: directional_sharpness(
            model, "cross_entropy", data, d, [0.1, 0.2, 0.5, 1.0, 2.0], batch_size=bs,
            data_stderr=se),
    }

if __name__ == "__main__":
    main()
