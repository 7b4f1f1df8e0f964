"""Lanczos overhead: the share of top_eigenpairs' wall time spent outside the products.

"Cheap products", two of them, on a ~1M-parameter float32 MLP (784-1024-200-10) on the CPU:

* ``hvp``: the real Hessian-vector product of the MLP on a small batch (32 samples);
* ``grad``: an operator of known spectrum whose product costs one loss gradient of the same MLP
  on the same batch (it computes the gradient, then returns ``D v`` for a fixed diagonal ``D``):
  the cheapest product a Hessian method can have, the adversarial case for the overhead.

For each ``k`` the products are timed inside the operator and the rest (Gram-Schmidt, the
``m x m`` eigendecompositions, restarts, Ritz vectors, bookkeeping) is reported as a fraction of
the total, in the same process for the current code with ``reorth="full"`` and
``reorth="partial"`` and, optionally, for ``analysis/lanczos.py``, ``krylov.py`` and ``ritz.py``
as of a git revision (``--baseline REV``, "before", with the default ``reorth``; default
``none``). ``passes`` counts the Gram-Schmidt passes over
the basis (``KrylovBasis.project`` calls). No timing asserts in the tests: run

    PYTHONPATH=. python benchmarks/lanczos_overhead.py --ks 5 20 50
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from analysis import HessianOperator, lanczos

#: The last revision before the overhead work (full second Gram-Schmidt pass on every large
#: cancellation, float64 slab copies in every norm).
BASELINE = "0ec725e"


class Timed:
    """Wraps an operator and accumulates the time spent in its products."""

    def __init__(self, op):
        self.op, self.shape, self.device, self.dtype = op, op.shape, op.device, op.dtype
        self.seconds = self.cpu = 0.0

    @property
    def num_matvecs(self):
        return self.op.num_matvecs

    def matvec(self, v):
        t, c = time.perf_counter(), time.process_time()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - t
        self.cpu += time.process_time() - c
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
    """``analysis/lanczos.py`` at git revision ``rev`` as a module, with the ``krylov.py`` and
    ``ritz.py`` of that revision (where it has them) in place of the current ones; None when
    unavailable. The module's ``KrylovBasis`` is the old basis (its passes are timed)."""
    root = Path(__file__).resolve().parents[1]

    def source(name: str) -> str | None:
        try:
            return subprocess.run(["git", "show", f"{rev}:analysis/{name}.py"], cwd=root,
                                  check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    def load(name: str, src: str) -> types.ModuleType:
        mod = types.ModuleType(f"analysis._{name}_baseline")
        mod.__package__ = "analysis"
        sys.modules[mod.__name__] = mod
        exec(compile(src, f"{rev}:analysis/{name}.py", "exec"), mod.__dict__)
        return mod

    src = source("lanczos")
    if src is None:
        return None
    for name in ("krylov", "ritz"):
        dep = source(name)
        if dep is not None:
            load(name, dep)
            src = src.replace(f"from .{name} import", f"from ._{name}_baseline import")
    return load("lanczos", src)


class PassTimer:
    """Times the Gram-Schmidt passes (``project`` and ``subtract``) of a ``KrylovBasis`` class
    and counts the basis bytes they read, to show how close they run to memory bandwidth."""

    def __init__(self, cls):
        self.cls, self.seconds, self.bytes, self.passes = cls, 0.0, 0, 0
        self.saved = {name: getattr(cls, name) for name in ("project", "subtract")}

    def __enter__(self):
        for name, orig in self.saved.items():
            setattr(self.cls, name, self._wrap(orig, name == "project"))
        return self

    def _wrap(self, orig, count):
        def timed(basis, w, *args):
            t = time.perf_counter()
            out = orig(basis, w, *args)
            self.seconds += time.perf_counter() - t
            self.bytes += args[-1] * basis.n * w.element_size()
            self.passes += count
            return out
        return timed

    def __exit__(self, *exc):
        for name, orig in self.saved.items():
            setattr(self.cls, name, orig)


def measure(fn, basis_cls, op, k: int, max_iter: int) -> dict:
    """Products, seconds (total, in products, in Gram-Schmidt passes) of one run on ``op``."""
    timed = Timed(op)
    with PassTimer(basis_cls) as gs:
        t, c = time.perf_counter(), time.process_time()
        res = fn(timed, k=k, max_iter=max_iter, v0="random")
        total, cpu = time.perf_counter() - t, time.process_time() - c
    return dict(matvecs=res.num_matvecs, total=total, products=timed.seconds, gs=gs.seconds,
                cpu=cpu, cpu_products=timed.cpu,
                gbps=gs.bytes / max(gs.seconds, 1e-12) / 1e9, passes=gs.passes,
                converged=res.converged, restarts=res.num_restarts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ks", type=int, nargs="+", default=[5, 20, 50])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-iter", type=int, default=150)
    ap.add_argument("--products", nargs="+", default=["hvp", "grad"], choices=["hvp", "grad"])
    ap.add_argument("--baseline", default="none",
                    help=f"git revision of a 'before' code (e.g. {BASELINE}), or 'none'")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.Tanh(),
                                torch.nn.Linear(1024, 200), torch.nn.Tanh(),
                                torch.nn.Linear(200, 10))
    x, y = torch.randn(args.batch, 784), torch.randint(0, 10, (args.batch,))
    n = sum(p.numel() for p in model.parameters())
    impls = [(mode, functools.partial(lanczos.top_eigenpairs, reorth=mode), lanczos.KrylovBasis)
             for mode in ("full", "partial")]
    old = None if args.baseline == "none" else load_baseline(args.baseline)
    if old is not None:
        impls.insert(0, ("before", old.top_eigenpairs, old.KrylovBasis))
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"model: {n} parameters, float32, batch {args.batch}, {torch.get_num_threads()} threads;"
          f" max_iter {args.max_iter}; before = {args.baseline if old else 'n/a'};"
          f" load average {load}")
    print("overhead = share of the wall time outside the products (ms/step out: the same per "
          "product); GS = the share in the Gram-Schmidt passes (reading the basis), GB/s = "
          "basis bytes they read per second; passes = KrylovBasis.project calls; cpu out ms, cpu "
          "share: the same in process CPU time (less sensitive to a loaded machine)")
    print(f"{'product':>8} {'k':>4} {'code':>7} {'matvecs':>8} {'passes':>7} {'total s':>8}"
          f" {'ms/product':>11} {'ms/step out':>11} {'overhead':>9} {'GS':>6} {'GB/s':>6}"
          f" {'restarts':>8}"
          f" {'converged':>9} {'cpu out ms':>10} {'cpu share':>9}")
    for kind in args.products:
        for k in args.ks:
            for name, fn, basis_cls in impls:
                op = (HessianOperator(model, "cross_entropy", (x, y)) if kind == "hvp"
                      else GradientCost(model, x, y))
                r = measure(fn, basis_cls, op, k, args.max_iter)
                print(f"{kind:>8} {k:>4} {name:>7} {r['matvecs']:>8} {r['passes']:>7}"
                      f" {r['total']:>8.2f} {1e3 * r['products'] / r['matvecs']:>11.1f}"
                      f" {1e3 * (r['total'] - r['products']) / r['matvecs']:>11.1f}"
                      f" {(r['total'] - r['products']) / r['total']:>9.1%}"
                      f" {r['gs'] / r['total']:>6.1%} {r['gbps']:>6.1f} {r['restarts']:>8}"
                      f" {r['converged']!s:>9}"
                      f" {1e3 * (r['cpu'] - r['cpu_products']) / r['matvecs']:>10.1f}"
                      f" {(r['cpu'] - r['cpu_products']) / r['cpu']:>9.1%}",
                      flush=True)


if __name__ == "__main__":
    main()
