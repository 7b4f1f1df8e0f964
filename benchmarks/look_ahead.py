"""Missed eigenvalues and the cost of the Lanczos look-ahead (``top_eigenpairs(look_ahead=)``).

Two sets of runs, each with ``look_ahead`` 0, 2 and 3, ``k = 5`` (and 1 on the MLPs), ``tol =
1e-3``, against closed-form or dense float64 eigenvalues; a *miss* is a run whose largest relative
eigenvalue error exceeds ``2 tol`` (an eigenvalue replaced by the next one):

* synthetic: 6 diagonal spectra of 20,000 entries (the top values of the trained ResNet-18 of
  ``benchmarks/SCALE.md``, 149.5 ... 80.9, 78.02, above bulks of different steepness), each with
  20 start vectors that are a unit "gradient" leaning on the top eigenvectors except the 5th
  (1e-2 or 1e-3 of its weight) plus a unit Gaussian vector (what ``v0="gradient"`` builds), and
  20 random ones;
* digits MLPs (1.5k-4.8k parameters, float64, at initialization and trained), 10 seeds each, random
  and gradient starts, against ``eigvalsh`` of the dense Hessian.

Usage::

    PYTHONPATH=. python benchmarks/look_ahead.py

About 2 minutes on two cores. Measured numbers: :class:`analysis.ritz.LookAhead` and the Hessian
guide (docs/guides/hessian.md, "Missed eigenvalues and the look-ahead").
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/landscape.py would shadow the landscape package

import torch  # noqa: E402
from torch import nn  # noqa: E402

from analysis import top_eigenpairs  # noqa: E402
from analysis.reference import dense_hessian  # noqa: E402
from tests.models import Diagonal  # noqa: E402

TOP = torch.tensor([149.5, 104.84, 103.26, 89.87, 80.9, 78.02, 74.0, 70.0], dtype=torch.float64)
# (bulk exponent, bulk top, weight of the 5th eigenvector in the gradient, gradient power)
SPECTRA = [(8, 60, 1e-2, 2), (20, 60, 1e-3, 2), (20, 40, 1e-2, 3), (40, 40, 1e-3, 2),
           (3, 60, 1e-3, 2), (20, 70, 1e-3, 1)]
LOOK_AHEADS = (0, 2, 3)


def _tally(table: dict, key: tuple, res, ref: torch.Tensor, tol: float) -> None:
    k = res.eigenvalues.numel()
    err = float(((res.eigenvalues - ref[:k]).abs() / ref[:k].abs()).max())
    row = table.setdefault(key, [0, 0, 0, 0.0])
    row[0] += res.num_matvecs
    row[1] += err > 2 * tol
    row[2] += 1
    row[3] = max(row[3], err)


def synthetic(trials: int = 20, n: int = 20_000) -> dict:
    table: dict = {}
    for ci, (p, top, weight, power) in enumerate(SPECTRA):
        bulk = torch.rand(n - TOP.numel(), generator=torch.Generator().manual_seed(ci),
                          dtype=torch.float64) ** p * top
        d = torch.cat([TOP, bulk])
        for trial in range(trials):
            gen = torch.Generator().manual_seed(100 + trial)
            grad = torch.randn(n, generator=gen, dtype=torch.float64) * d ** power
            grad[4] *= weight
            rnd = torch.randn(n, generator=gen, dtype=torch.float64)
            starts = {"gradient": grad / grad.norm() + rnd / rnd.norm(), "random": rnd}
            for start, v0 in starts.items():
                for la in LOOK_AHEADS:
                    res = top_eigenpairs(Diagonal(d), k=5, tol=1e-3, v0=v0.clone(), look_ahead=la)
                    _tally(table, ("synthetic", start, 5, la), res, TOP, 1e-3)
    return table


def _mlp(hidden: int, layers: int, steps: int, X: torch.Tensor, y: torch.Tensor) -> nn.Module:
    torch.manual_seed(1)
    mods: list[nn.Module] = [nn.Linear(64, hidden), nn.Tanh()]
    for _ in range(layers - 1):
        mods += [nn.Linear(hidden, hidden), nn.Tanh()]
    model = nn.Sequential(*mods, nn.Linear(hidden, 10)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        i = torch.randint(0, len(X), (64,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(X[i]), y[i]).backward()
        opt.step()
    return model


def mlps(seeds: int = 10) -> dict:
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X / 16.0, dtype=torch.float64), torch.tensor(y)
    table: dict = {}
    for hidden, layers, steps in ((32, 1, 0), (32, 1, 300), (64, 1, 1000), (16, 2, 2000)):
        model = _mlp(hidden, layers, steps, X, y)
        data = (X[:512], y[:512])
        ref = torch.linalg.eigvalsh(dense_hessian(model, "cross_entropy", data)).flip(0)
        for k in (1, 5):
            for start in ("random", "gradient"):
                for la in LOOK_AHEADS:
                    for seed in range(seeds):
                        res = top_eigenpairs(model, "cross_entropy", data, k=k, tol=1e-3,
                                             seed=seed, v0=start, look_ahead=la,
                                             data_stderr=False)
                        _tally(table, ("mlp", start, k, la), res, ref, 1e-3)
    return table


def main() -> None:
    print("| runs | start | k | look_ahead | mean products | misses | worst rel. error |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for table in (synthetic(), mlps()):
        for (kind, start, k, la), (mv, miss, count, worst) in sorted(table.items()):
            print(f"| {kind} | {start} | {k} | {la} | {mv / count:.1f} | {miss}/{count} | "
                  f"{worst:.1e} |")


if __name__ == "__main__":
    main()
