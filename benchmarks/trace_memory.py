"""Peak memory and accuracy of ``hessian_trace``: Hutch++ with its whole sketch against the
memory-bounded Hutch++ (``max_vectors``), side by side in one run.

Memory: a 1.08M-parameter float32 MLP (784-1024-270-10, 32 samples, forward-over-reverse
products), ``num_matvecs=200``, each configuration in a fresh subprocess: the resident-set
high-water mark (VmHWM, reset through ``/proc/self/clear_refs`` after three warm-up products)
minus the resident set before the call, in ``n``-vectors; ``products`` is the working memory of
one batched product of a block, measured the same way (the part the bound leaves out).

Accuracy: on a dense float64 matrix with a spiked spectrum (n = 2000, 12 outliers above a flat
bulk, like a classifier's Hessian) the mean absolute error and the mean reported standard error
over 40 seeds, same products, for each configuration. Run::

    PYTHONPATH=. flock /work/bench.lock python benchmarks/trace_memory.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

import torch

from analysis import hessian_trace

#: The configurations compared: (label, keyword arguments of hessian_trace).
CONFIGS = [
    ("Hutch++, whole sketch (default)", {}),
    ("Hutch++, whole sketch, block 4", {"block_size": 4}),
    ("Hutch++, max_vectors=40", {"max_vectors": 40}),
    ("Hutch++, max_vectors=20", {"max_vectors": 20}),
    ("Hutchinson, max_vectors=12", {"method": "hutchinson", "max_vectors": 12}),
]

_WORKER = textwrap.dedent("""
    import json, sys, time
    import torch
    from analysis import HessianOperator, hessian_trace
    from analysis.trace import trace_plan

    from analysis.host_memory import peak_resident_bytes, reset_peak_resident, resident_bytes

    kw, num_matvecs = json.loads(sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.Tanh(),
                                torch.nn.Linear(1024, 270), torch.nn.Tanh(),
                                torch.nn.Linear(270, 10))
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    op = HessianOperator(model, "cross_entropy", (x, y), method="forward-over-reverse")
    n = op.shape[0]
    plan = trace_plan(n, num_matvecs, kw.get("method", "hutch++"), 4,
                      block_size=kw.get("block_size"), max_vectors=kw.get("max_vectors"))
    V = torch.randn(n, plan.block_size)
    for _ in range(3):
        op.matmat(V)
    reset_peak_resident()
    base = resident_bytes()
    op.matmat(V)
    block = peak_resident_bytes() - base
    del V
    reset_peak_resident()
    base = resident_bytes()
    t = time.perf_counter()
    res = hessian_trace(op, num_matvecs=num_matvecs, data_stderr=False, **kw)
    seconds = time.perf_counter() - t
    peak = peak_resident_bytes() - base
    print(json.dumps(dict(n=n, peak=peak / (4 * n), block=block / (4 * n), seconds=seconds,
                          bound=res.memory_bound_bytes / (4 * n), b=res.block_size,
                          sketch=plan.sketch, probes=plan.probes, products=res.num_matvecs,
                          estimate=res.estimate, se=res.std_error)))
""")


def measure_memory(kw: dict, num_matvecs: int) -> dict:
    """One configuration in a fresh subprocess (mmap threshold fixed: freed vectors go back to
    the OS, so the high-water mark is that of live memory)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    proc = subprocess.run([sys.executable, "-c", _WORKER, json.dumps(kw), str(num_matvecs)],
                          capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spiked_matrix(n: int = 2000, outliers: int = 12, seed: int = 0) -> tuple[torch.Tensor, float]:
    """A dense symmetric float64 matrix: ``outliers`` eigenvalues from 50 down to 5 above a bulk
    uniform in [-0.5, 1]; returns it and its trace."""
    g = torch.Generator().manual_seed(seed)
    ev = torch.cat([torch.linspace(50.0, 5.0, outliers, dtype=torch.float64),
                    torch.rand(n - outliers, generator=g, dtype=torch.float64) * 1.5 - 0.5])
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return (Q * ev) @ Q.T, float(ev.sum())


def accuracy(kw: dict, num_matvecs: int, A: torch.Tensor, tr: float, seeds: int) -> dict:
    errs, ses = [], []
    for s in range(seeds):
        r = hessian_trace(A, num_matvecs=num_matvecs, seed=s, **kw)
        errs.append(abs(r.estimate - tr))
        ses.append(r.std_error)
    return dict(err=sum(errs) / seeds, se=sum(ses) / seeds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num-matvecs", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=40)
    args = ap.parse_args()
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"num_matvecs {args.num_matvecs}; memory in n-vectors (float32, n = 1,083,300); "
          f"accuracy over {args.seeds} seeds on a 2000 x 2000 spiked float64 matrix; "
          f"load average {load}")
    A, tr = spiked_matrix()
    print("| configuration | block | sketch | probes | bound | measured peak | one block's "
          "products | peak - products | time s | mean abs error (spiked) | mean SE |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, kw in CONFIGS:
        m = measure_memory(kw, args.num_matvecs)
        a = accuracy(kw, args.num_matvecs, A, tr, args.seeds)
        print(f"| {label} | {m['b']} | {m['sketch']} | {m['probes']} | {m['bound']:.0f} |"
              f" {m['peak']:.1f} | {m['block']:.1f} | {m['peak'] - m['block']:.1f} |"
              f" {m['seconds']:.1f} | {a['err']:.3f} | {a['se']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
