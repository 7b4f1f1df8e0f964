"""Lanczos overhead: the share of top_eigenpairs' wall time spent outside the products.

A ~1M-parameter MLP in float32 on a small batch (cheap products) on the CPU; for each k the
products are timed inside the operator and the rest (Gram-Schmidt, eigendecompositions, restarts,
Ritz vectors) is reported as a fraction of the total. No timing asserts in the tests: run

    PYTHONPATH=. python benchmarks/lanczos_overhead.py --ks 5 20 50
"""

from __future__ import annotations

import argparse
import time

import torch

from analysis.hessian import HessianOperator
from analysis.lanczos import top_eigenpairs


class Timed:
    """Wraps an operator and accumulates the time spent in its products."""

    def __init__(self, op):
        self.op, self.shape, self.device, self.dtype = op, op.shape, op.device, op.dtype
        self.seconds = 0.0

    @property
    def num_matvecs(self):
        return self.op.num_matvecs

    def matvec(self, v):
        t = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - t
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 20, 50])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-iter", type=int, default=150)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.Tanh(),
                                torch.nn.Linear(1024, 200), torch.nn.Tanh(),
                                torch.nn.Linear(200, 10))
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n} parameters, float32, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'k':>4} {'matvecs':>8} {'total s':>9} {'products s':>11} {'overhead':>9}")
    for k in args.ks:
        op = Timed(HessianOperator(model, "cross_entropy", (x, y)))
        t = time.perf_counter()
        res = top_eigenpairs(op, k=k, max_iter=args.max_iter, v0="random")
        total = time.perf_counter() - t
        frac = (total - op.seconds) / total
        print(f"{k:>4} {res.num_matvecs:>8} {total:>9.2f} {op.seconds:>11.2f} {frac:>9.1%}")


if __name__ == "__main__":
    main()
