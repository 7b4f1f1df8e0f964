"""One tool of the scale benchmark in a fresh process: ``python scale_worker.py SPEC.json``.

``SPEC.json`` names the bundle (model class, constructor arguments, weights and batches saved by
``benchmarks/scale.py``), the tool and its settings; the result is one JSON line on stdout:
eigenvalues, HVPs, wall time and the peak resident memory over the baseline (the process
after the model, the data and the tool's package are loaded; VmHWM reset to the current RSS
through ``/proc/self/clear_refs``, as in ``tests/analysis/test_memory.py``).

Tools: ``ours`` (``analysis.top_eigenpairs``), ``reference`` (the same at a tight tolerance),
``curvlinops`` (``HessianLinearOperator`` + ``scipy.sparse.linalg.eigsh``), ``eigenthings-scan``
(hessian-eigenthings' own Lanczos kernel run for ``max_iter`` steps, recording the Ritz values
after every step, so the smallest ``max_iter`` that meets the target can be chosen),
``eigenthings`` (``hessian_eigenthings.lanczos`` at a given ``max_iter``) and ``pyhessian``
(``pyhessian.hessian(...).eigenvalues``, stopped at a budget of HVPs).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
# the project before this folder: benchmarks/landscape.py must not shadow the landscape package
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import scale_models  # noqa: E402

from analysis.host_memory import peak_resident_bytes, reset_peak_resident  # noqa: E402


def load(bundle: str):
    b = torch.load(bundle, weights_only=False)
    model = getattr(scale_models, b["factory"])(**b["kwargs"])
    model.load_state_dict(b["state"])
    model.eval()
    return b, model, b["batches"]


def top(values, k):
    return sorted((float(v) for v in np.asarray(values, dtype=np.float64).ravel()),
                  reverse=True)[:k]


def run_ours(spec, b, model, batches):
    from analysis import HessianOperator, top_eigenpairs

    # the operator top_eigenpairs(model, loss, batches) builds, made here to read its choice
    op = HessianOperator(model, b["our_loss"], batches)
    res = top_eigenpairs(op, k=spec["k"], tol=spec["tol"],
                         seed=spec.get("seed", 0), max_basis=spec.get("max_basis"),
                         data_stderr=False)  # the products of Lanczos alone, as the baselines

    def after() -> dict:
        """Outside the timed part: one steady product, to express the choice's extra product
        (forward-over-reverse on the first batch) in products."""
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        op @ v
        steady = time.perf_counter() - t0
        choice = op.auto_choice.to_dict() if op.auto_choice is not None else {}
        extra = choice.get("timings", {}).get("forward-over-reverse", 0.0) * choice.get(
            "extra_products", 0)
        return dict(auto_choice=choice, steady_product_seconds=steady,
                    calibration_seconds=extra, calibration_products=extra / steady)

    return dict(_after=after, eigenvalues=top(res.eigenvalues, spec["k"]), hvps=int(res.num_matvecs),
                converged=bool(res.converged),
                claimed_rel_errors=[float(e) / max(abs(float(v)), 1e-300) for e, v in
                                    zip(res.error_bounds, res.eigenvalues)],
                basis_bytes=int(res.basis_bytes), memory_bound_bytes=int(res.memory_bound_bytes))


def run_curvlinops(spec, b, model, batches):
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters() if p.requires_grad]
    H = HessianLinearOperator(model, b["criterion"], params, batches,
                              check_deterministic=False).to_scipy(dtype=np.float32)
    count = [0]

    def mv(v):
        count[0] += 1 if v.ndim == 1 else v.shape[1]
        return H.matvec(v) if v.ndim == 1 else H.matmat(v)

    op = LinearOperator(H.shape, matvec=mv, matmat=mv, rmatvec=mv, dtype=np.float32)
    v0 = np.random.default_rng(spec.get("seed", 0)).standard_normal(H.shape[0]).astype(np.float32)
    values = eigsh(op, k=spec["k"], which="LA", tol=spec["tol"], v0=v0, return_eigenvectors=False)
    return dict(eigenvalues=top(values, spec["k"]), hvps=count[0])


def _eigenthings_op(b, model, batches, trace):
    from hessian_eigenthings import HessianOperator, supervised_loss

    op = HessianOperator(model, batches, supervised_loss(b["criterion"]))
    if trace is None:
        return op
    inner = op.matvec
    t0 = time.perf_counter()

    def matvec(v):
        out = inner(v)
        trace.append((time.perf_counter() - t0, peak_resident_bytes()))
        return out

    op.matvec = matvec
    return op


def run_eigenthings_scan(spec, b, model, batches):
    """``lanczos(max_iter=m)`` for every ``m <= max_iter`` at the cost of one run: the library's
    own kernel from the same start vector; the Ritz values of each leading ``m x m`` block of
    the tridiagonal matrix are those ``lanczos(max_iter=m, which="LA", seed=seed)`` returns."""
    from hessian_eigenthings import lanczos_tridiagonal

    trace = []
    op = _eigenthings_op(b, model, batches, trace)
    m = spec["max_iter"]
    gen = torch.Generator(device="cpu").manual_seed(spec.get("seed", 0))
    v0 = torch.randn(op.size, dtype=op.dtype, generator=gen)
    td = lanczos_tridiagonal(op, v0, m, reorthogonalize=m <= 50)
    a, bt = td.alphas.double(), td.betas.double()
    ritz = []
    for j in range(1, len(a) + 1):
        T = torch.diag(a[:j]) + torch.diag(bt[:j - 1], 1) + torch.diag(bt[:j - 1], -1)
        theta, s = torch.linalg.eigh(T)
        ritz.append(top(theta, spec["k"]))
    # a-posteriori bounds of the last step's top-k Ritz values: |lambda - theta| <= r and
    # <= r^2 / gap (residual r = |beta_m s_mi|, gap to the other Ritz values)
    order = torch.argsort(theta, descending=True)[:spec["k"]]
    r = (s[-1, order].abs() * float(td.last_beta)).tolist()
    gaps = [float(torch.cat([theta[:i], theta[i + 1:]]).sub(theta[i]).abs().min())
            if len(theta) > 1 else float("inf") for i in order.tolist()]
    bound = [min(ri, ri * ri / g) / abs(float(theta[i])) for ri, g, i in
             zip(r, gaps, order.tolist())]
    return dict(eigenvalues=ritz[-1], hvps=len(a), ritz_by_step=ritz, rel_bounds=bound,
                seconds_by_step=[t for t, _ in trace], peak_by_step=[p for _, p in trace],
                numel=op.size, itemsize=torch.empty((), dtype=op.dtype).element_size())


def run_eigenthings(spec, b, model, batches):
    from hessian_eigenthings import lanczos

    op = _eigenthings_op(b, model, batches, None)
    res = lanczos(op, k=spec["k"], max_iter=spec["max_iter"], which="LA", tol=spec["tol"],
                  seed=spec.get("seed", 0))
    return dict(eigenvalues=top(res.eigenvalues.detach(), spec["k"]), hvps=int(res.iterations))


class _Budget(Exception):
    pass


def run_pyhessian(spec, b, model, batches):
    import pyhessian.hessian  # noqa: F401  (the package re-exports the class under this name)

    ph = sys.modules["pyhessian.hessian"]
    torch.manual_seed(spec.get("seed", 0))
    h = ph.hessian(model, b["criterion"], dataloader=batches, cuda=False)
    steps, done = [], [0]
    inner, orth = h.dataloader_hv_product, ph.orthnormal

    def orthnormal(w, v_list):
        done[0] = len(v_list)
        return orth(w, v_list)

    def hv(v):
        if len(steps) >= spec["max_hvps"]:
            raise _Budget
        out = inner(v)
        steps.append((done[0], out[0]))
        return out

    h.dataloader_hv_product, ph.orthnormal = hv, orthnormal
    try:
        values, _ = h.eigenvalues(top_n=spec["k"], maxIter=spec["max_iter"], tol=spec["tol"])
        finished = True
    except _Budget:
        finished = False
        values = [rq for i, (j, rq) in enumerate(steps)
                  if i + 1 == len(steps) or steps[i + 1][0] != j][:-1]  # completed ones only
    finally:
        ph.orthnormal = orth
        model.zero_grad(set_to_none=True)
    return dict(eigenvalues=sorted(values, reverse=True), hvps=len(steps), finished=finished)


TOOLS = {"ours": run_ours, "reference": run_ours, "curvlinops": run_curvlinops,
         "eigenthings-scan": run_eigenthings_scan, "eigenthings": run_eigenthings,
         "pyhessian": run_pyhessian}
IMPORTS = {"ours": "analysis", "reference": "analysis", "curvlinops": "curvlinops",
           "eigenthings-scan": "hessian_eigenthings", "eigenthings": "hessian_eigenthings",
           "pyhessian": "pyhessian"}


def main(argv=None) -> None:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    if spec.get("malloc") == "fixed":  # the same for every tool, before anything is allocated
        from analysis.host_memory import fix_mmap_threshold

        fix_mmap_threshold()
    torch.set_num_threads(spec.get("threads", 1))
    b, model, batches = load(spec["bundle"])
    __import__(IMPORTS[spec["tool"]])
    __import__("scipy.sparse.linalg")
    gc.collect()
    reset_peak_resident()
    base = peak_resident_bytes()
    t0 = time.perf_counter()
    # the peers need the math attention kernel chosen by the user (the fused CPU kernel has no
    # double backward or forward-mode derivative); ours selects it inside every product
    kernel = (sdpa_kernel(SDPBackend.MATH) if spec["tool"] not in ("ours", "reference")
              else contextlib.nullcontext())
    with kernel:
        out = TOOLS[spec["tool"]](spec, b, model, batches)
    out["seconds"] = time.perf_counter() - t0
    out["peak_bytes"] = peak_resident_bytes() - base
    after = out.pop("_after", None)
    if after is not None:  # measurements outside the timed part (ours: the choice's cost)
        out.update(after())
    if "peak_by_step" in out:
        out["peak_by_step"] = [p - base for p in out["peak_by_step"]]
    out["baseline_rss_bytes"] = base
    out["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
