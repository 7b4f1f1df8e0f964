"""Accuracy of top_eigenpairs with a narrow Krylov basis against dense float64 Hessians.

For small models (a tanh MLP of 2,605 parameters, the tests' 53-parameter MLP and 102-parameter
CNN with BatchNorm in eval mode) the exact spectrum comes from ``torch.linalg.eigh`` of the dense
float64 Hessian (:func:`analysis.reference.dense_hessian`). Each run of
``top_eigenpairs(model, ..., basis_dtype=...)`` with the operator in float64 or float32, a basis
stored in the operator's dtype (``None``), float32, bfloat16 or float16, ``tol`` 1e-2 and 1e-3,
``k`` 1 and 3, the default ``max_basis`` and ``max_basis = k + 3`` (thick restarts) reports

* ``err``: the largest relative eigenvalue error ``|theta_i - lambda_i| / |lambda_i|``;
* ``bound``: the largest claimed relative bound ``error_bounds[i] / |theta_i|``, and whether
  every bound covers its true error (``covered``);
* ``vec``: the largest ``sin`` of the angle between a returned eigenvector and the true one
  (pairs whose eigenvalue is within ``1e-3 |lambda|`` of another are skipped);
* ``converged`` and the products.

Usage::

    PYTHONPATH=. python benchmarks/narrow_basis.py [--json benchmarks/results/narrow_basis.jsonl]

About 30 s on two cores. Measured numbers: ``docs/guides/llm.md`` ("A narrower Krylov basis").
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/landscape.py would shadow the landscape package

import torch  # noqa: E402

from analysis import top_eigenpairs  # noqa: E402
from analysis.reference import dense_hessian  # noqa: E402
from tests.models import classification_data, cnn_bn, image_data, mlp  # noqa: E402

MODELS = {
    "mlp-2605": lambda: (mlp(d=20, hidden=100, classes=5),
                         classification_data(n=256, d=20, classes=5)),
    "mlp-53": lambda: (mlp(), classification_data()),
    "cnn-bn-102": lambda: (cnn_bn().eval(), image_data()),
}
BASES = {"float64": [None, torch.float32, torch.bfloat16, torch.float16],
         "float32": [None, torch.bfloat16, torch.float16]}


def measure(name: str, op_dtype: str, basis_dtype, tol: float, k: int, restarts: bool,
            model, data, evals: torch.Tensor, evecs: torch.Tensor) -> dict:
    """One run against the dense spectrum (see the module docstring)."""
    dt = getattr(torch, op_dtype)
    m = model.to(dt)
    x, y = data
    res = top_eigenpairs(m, "cross_entropy", (x.to(dt), y), k=k, tol=tol, seed=0,
                         max_basis=k + 3 if restarts else None, basis_dtype=basis_dtype,
                         data_stderr=False)
    idx = torch.arange(len(evals) - 1, len(evals) - 1 - k, -1)
    lam = evals[idx]
    theta = res.eigenvalues.double()
    err = ((theta - lam).abs() / lam.abs())
    bound = res.error_bounds / theta.abs()
    sins = []
    for x_i, i in zip(res.eigenvectors.double(), idx):
        gap = (evals - evals[i]).abs()
        gap[i] = float("inf")
        if float(gap.min()) > 1e-3 * abs(float(evals[i])):
            c = float((x_i @ evecs[:, i]).abs() / x_i.norm())
            sins.append((max(0.0, 1 - c * c)) ** 0.5)
    return dict(model=name, op_dtype=op_dtype,
                basis_dtype=str(basis_dtype or "operator's").replace("torch.", ""),
                tol=tol, k=k, max_basis=k + 3 if restarts else None,
                restarts=res.num_restarts, products=res.num_matvecs, converged=res.converged,
                err=float(err.max()), bound=float(bound.max()),
                covered=bool((res.error_bounds >= (theta - lam).abs()).all()),
                vec=max(sins) if sins else None, basis_bytes=res.basis_bytes,
                memory_bound_bytes=res.memory_bound_bytes, stop_reason=res.stop_reason)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the rows (JSON lines) to this file")
    args = ap.parse_args()
    rows = []
    for name, make in MODELS.items():
        model, data = make()
        evals, evecs = torch.linalg.eigh(dense_hessian(model, "cross_entropy", data))
        for op_dtype, bases in BASES.items():
            for bd in bases:
                for tol in (1e-2, 1e-3):
                    for k in (1, 3):
                        for restarts in (False, True):
                            rows.append(measure(name, op_dtype, bd, tol, k, restarts,
                                                model, data, evals, evecs))
                            r = rows[-1]
                            vec = "" if r["vec"] is None else f"{r['vec']:.1e}"
                            print(f"| {name} | {op_dtype} | {r['basis_dtype']} | {tol:g} | {k} | "
                                  f"{r['max_basis'] or 'default'} | {r['products']} | "
                                  f"{r['converged']} | {r['err']:.1e} | {r['bound']:.1e} | "
                                  f"{r['covered']} | {vec} |", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            for r in rows:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
