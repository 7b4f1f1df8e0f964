"""Lanczos overhead: the share of top_eigenpairs' wall time spent outside the products.

"Cheap products", two of them, on a ~1M-parameter float32 MLP (784-1024-200-10) on the CPU:

* ``hvp``: the real Hessian-vector product of the MLP on a small batch (32 samples);
* ``grad``: an operator of known spectrum whose product costs one loss gradient of the same MLP
  on the same batch (it computes the gradient, then returns ``D v`` for a fixed diagonal ``D``):
  the cheapest product a Hessian method can have, the adversarial case for the overhead.

For each ``k`` the products are timed inside the operator and the rest (Gram-Schmidt, the
``m x m`` eigendecompositions, restarts, Ritz vectors, bookkeeping) is reported as a fraction of
the total, for the current code ("after") and, in the same process, for ``analysis/lanczos.py``
as of a git revision ("before", ``--baseline``; ``none`` skips it). No timing asserts in the
tests: run

    PYTHONPATH=. python benchmarks/lanczos_overhead.py --ks 5 20 50
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from analysis.hessian import HessianOperator
from analysis.lanczos import top_eigenpairs

#: The last revision before the overhead work (full second Gram-Schmidt pass on every large
#: cancellation, float64 slab copies in every norm).
BASELINE = "0ec725e"


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


class GradientCost:
    """``D v`` for a fixed diagonal ``D`` (a few separated top eigenvalues), at the cost of one
    loss gradient of ``model`` on ``(x, y)`` per product."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y
        n = sum(p.numel() for p in model.parameters())
        g = torch.Generator().manual_seed(0)
        self.d = torch.rand(n, generator=g)
        self.d[:60] = torch.linspace(10.0, 2.0, 60)
        self.shape, self.device, self.dtype = (n, n), self.d.device, self.d.dtype
        self.num_matvecs = 0

    def matvec(self, v):
        self.num_matvecs += 1
        loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
        torch.autograd.grad(loss, list(self.model.parameters()))
        return self.d * v


def load_baseline(rev: str):
    """``analysis/lanczos.py`` at git revision ``rev`` as a module (None when unavailable)."""
    root = Path(__file__).resolve().parents[1]
    try:
        src = subprocess.run(["git", "show", f"{rev}:analysis/lanczos.py"], cwd=root, check=True,
                             capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    mod = types.ModuleType("analysis._lanczos_baseline")
    mod.__package__ = "analysis"
    sys.modules[mod.__name__] = mod
    exec(compile(src, f"{rev}:analysis/lanczos.py", "exec"), mod.__dict__)
    return mod


def measure(fn, op, k: int, max_iter: int) -> tuple[int, float, float, bool]:
    """``(products, total s, products s, converged)`` of one run of ``fn`` on ``op``."""
    timed = Timed(op)
    t = time.perf_counter()
    res = fn(timed, k=k, max_iter=max_iter, v0="random")
    total = time.perf_counter() - t
    return res.num_matvecs, total, timed.seconds, res.converged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 20, 50])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-iter", type=int, default=150)
    ap.add_argument("--products", nargs="+", default=["hvp", "grad"], choices=["hvp", "grad"])
    ap.add_argument("--baseline", default=BASELINE,
                    help="git revision of the 'before' code, or 'none'")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.Tanh(),
                                torch.nn.Linear(1024, 200), torch.nn.Tanh(),
                                torch.nn.Linear(200, 10))
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    n = sum(p.numel() for p in model.parameters())
    impls = [("after", top_eigenpairs)]
    old = None if args.baseline == "none" else load_baseline(args.baseline)
    if old is not None:
        impls.insert(0, ("before", old.top_eigenpairs))
    print(f"model: {n} parameters, float32, batch {args.batch}, {torch.get_num_threads()} threads;"
          f" max_iter {args.max_iter}; before = {args.baseline if old else 'n/a'}")
    print(f"{'product':>8} {'k':>4} {'code':>7} {'matvecs':>8} {'total s':>8} {'ms/product':>11}"
          f" {'overhead':>9} {'converged':>9}")
    for kind in args.products:
        for k in args.ks:
            for name, fn in impls:
                op = (HessianOperator(model, "cross_entropy", (x, y)) if kind == "hvp"
                      else GradientCost(model, x, y))
                mv, total, prod, conv = measure(fn, op, k, args.max_iter)
                print(f"{kind:>8} {k:>4} {name:>7} {mv:>8} {total:>8.2f} {1e3 * prod / mv:>11.1f}"
                      f" {(total - prod) / total:>9.1%} {conv!s:>9}", flush=True)


if __name__ == "__main__":
    main()
