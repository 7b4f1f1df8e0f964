"""Curvature of GPT-2 from its config on one CPU machine: wall time in gradients, peak RSS.

Each case runs in its own subprocess (a fresh resident-set high-water mark, VmHWM): it builds
the model from ``transformers.GPT2Config`` (random weights, no dropout, eval mode), draws
``batch x seq`` random tokens, times one gradient (the unit: the smaller of two, after the
model is built; the baseline of the same process) and then runs the case, and reports

* ``seconds`` and ``gradients`` = seconds / one gradient (set-up included: operator, choice
  of method, start vector),
* ``peak_rss_gb``: the process's VmHWM over the whole case (model and data included),
* ``estimate_gb``: the peak predicted before the run (outside the timed and measured part) by
  :func:`analysis.cost.estimate_peak_bytes` (when the case has one),
* the case's own numbers (eigenvalue, products, ...).

Cases (``--cases``):

* ``top1-auto``: ``top_eigenpairs(k=1, tol=1e-2)``, default settings (``method="auto"``);
* ``top1-fd``: the same with ``method="finite-difference"`` on
  :class:`analysis.chunked_lm.ChunkedCausalLM` (no ``B x T x V`` logits kept) and
  ``max_basis=4`` (``--max-basis``; thick restarts keep the basis at ``max_basis + 1`` rows);
* ``top1-fwd``: as ``top1-fd`` with ``method="forward-difference"`` (one gradient per product,
  ``g(w)`` computed once and reused by the gradient start vector);
* ``top1-he``: hessian-eigenthings 1.0 (``hessian_eigenthings.lanczos`` on its
  ``HessianOperator`` with ``hf_lm_loss()`` and ``method="finite_difference"``, full
  reorthogonalization) with ``--he-steps`` Lanczos steps (matched to the products our
  ``top1-fd`` run needs at ``tol=1e-2``), run by ``--he-python`` (its own virtual environment);
* ``trace-fd``: Hutch++ trace with 30 finite-difference products; ``hutchinson-fwd``:
  Hutchinson's estimator with 30 forward-difference products (no sketch of ``s`` vectors kept,
  for a model whose Hutch++ sketch does not fit);
* ``per-layer-fd``: top-1 (tol 1e-2) of each block ``transformer.h.<i>.`` (regex subsets);
  ``per-layer-fwd`` the same with forward differences;
* ``slice``: a 21-point 1-D slice along a random filter-normalized-free direction.

A Lanczos case may carry the dtype of its stored Krylov basis (``top_eigenpairs(basis_dtype=)``):
``top1-fwd@bfloat16``; ``--basis-dtype`` sets it for every case that names none. So
``--cases top1-fwd@bfloat16,top1-fwd`` runs the narrow basis and the default side by side.

Usage::

    PYTHONPATH=. OMP_NUM_THREADS=2 python benchmarks/llm_scale.py --model small --cases top1-fd
    python benchmarks/llm_scale.py --model tiny --cases top1-auto,top1-fd,slice   # seconds

Measured numbers and the table: ``docs/guides/llm.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # benchmarks/landscape.py would shadow the landscape package

MODELS = {
    "tiny": dict(n_embd=64, n_layer=2, n_head=2),
    "small": dict(),  # GPT2Config(): 124.4M parameters
    "medium": dict(n_embd=1024, n_layer=24, n_head=16),  # 354.8M
}
CASES = ["top1-auto", "top1-fd", "top1-fwd", "top1-he", "trace-fd", "hutchinson-fwd",
         "per-layer-fd", "per-layer-fwd", "slice"]
HE_PYTHON = "/work/venv-llm/bin/python"  # hessian-eigenthings==1.0.0a5 (pip --no-deps)


def _peak() -> int:
    """VmHWM in bytes. Its own reader, not ``analysis.host_memory.peak_resident_bytes``: the
    ``top1-he`` case runs in hessian-eigenthings' environment, where nothing of ours is
    imported (our package in memory would inflate its peak)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def _hessian_eigenthings(model, data, steps: int) -> dict:
    """hessian-eigenthings' top-1 Lanczos (``steps`` products) on the HF model's own loss."""
    import hessian_eigenthings as he

    op = he.HessianOperator(model, data, he.hf_lm_loss(), method="finite_difference")
    res = he.lanczos(op, k=1, max_iter=steps, which="LA", seed=0)
    return dict(eigenvalue=float(res.eigenvalues[0]), products=steps,
                he_version=he.__version__, converged=bool(res.converged[0]))


def run_case(model_name: str, case: str, batch: int, seq: int, max_basis: int | None = 4,
             he_steps: int = 15, basis_dtype: str | None = None,
             basis_device: str | None = None, microbatch: int | None = None,
             malloc: str = "default", offload: str | None = None) -> dict:
    """One case in this process (see the module docstring)."""
    import re

    if malloc == "fixed":  # before the model is built: freed buffers leave the resident set
        from analysis.host_memory import fix_mmap_threshold

        fix_mmap_threshold()
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(**MODELS[model_name], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}]
    n = sum(p.numel() for p in model.parameters())

    def gradient():
        model.zero_grad(set_to_none=True)
        model(**data[0]).loss.backward()
        model.zero_grad(set_to_none=True)

    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        gradient()
        times.append(time.perf_counter() - t0)
    grad_s = min(times)
    out: dict = {"model": model_name, "case": case, "n": n, "tokens": f"{batch}x{seq}",
                 "gradient_s": grad_s}
    bd = None if basis_dtype is None else getattr(torch, basis_dtype)
    if bd is not None:
        out["basis_dtype"] = basis_dtype
    if basis_device is not None:
        out["basis_device"] = basis_device
    out["max_basis"] = max_basis
    out["malloc"] = malloc
    if microbatch is not None:
        out["microbatch"] = microbatch
    if case == "top1-he":  # in hessian-eigenthings' own environment: nothing of ours imported
        _reset_peak()
        t0 = time.perf_counter()
        out.update(_hessian_eigenthings(model, data, he_steps))
        seconds = time.perf_counter() - t0
        out.update(seconds=seconds, gradients=seconds / grad_s, peak_rss_gb=_peak() / 1e9,
                   estimate_gb=None)
        return out

    from analysis import HessianOperator, hessian_trace, top_eigenpairs
    from analysis.chunked_lm import ChunkedCausalLM
    from analysis.cost import estimate_peak_bytes

    fd = case.endswith(("-fd", "-fwd"))
    subject = ChunkedCausalLM(model, chunk_tokens=256) if fd else model
    loss = "model_lm" if fd else "lm"
    kw = {} if not fd else dict(
        method="forward-difference" if case.endswith("-fwd") else "finite-difference")
    if microbatch is not None:
        kw["microbatch_size"] = microbatch
    if offload is not None:
        kw["offload"] = out["offload"] = offload
    est = None
    lanczos = dict(k=1, tol=1e-2, max_basis=max_basis) if fd else dict(k=1, tol=1e-2)
    lanczos.update(basis_dtype=bd, basis_device=basis_device)
    if case.startswith("top1"):  # predicted before the run (one forward pass)
        est = estimate_peak_bytes(subject, loss, data, analysis="lanczos",
                                  max_basis=lanczos.get("max_basis"), basis_dtype=bd,
                                  basis_device=basis_device, **kw)
    _reset_peak()
    t0 = time.perf_counter()
    if case.startswith("top1"):
        res = top_eigenpairs(subject, loss, data, **lanczos, **kw)
        out.update(eigenvalue=float(res.eigenvalues[0]), products=res.num_matvecs,
                   converged=res.converged, basis_gb=res.basis_bytes / 1e9,
                   bound_gb=res.memory_bound_bytes / 1e9, stop_reason=res.stop_reason,
                   error_bound=float(res.error_bounds[0]))
    elif case in ("trace-fd", "hutchinson-fwd"):  # Hutch++; Hutchinson: no sketch kept
        res = hessian_trace(HessianOperator(subject, loss, data, **kw), num_matvecs=30,
                            block_size=1, method="hutch++" if case == "trace-fd" else "hutchinson")
        out.update(trace=float(res.estimate), products=res.num_matvecs, std_error=res.std_error)
    elif case.startswith("per-layer"):
        vals, products = [], 0
        for i in range(cfg.n_layer):
            res = top_eigenpairs(subject, loss, data, k=1, tol=1e-2, max_basis=max_basis,
                                 params=re.compile(rf"^lm\.transformer\.h\.{i}\."),
                                 basis_dtype=bd, basis_device=basis_device, **kw)
            vals.append(float(res.eigenvalues[0]))
            products += res.num_matvecs
            print(f"h.{i}: {vals[-1]} ({res.num_matvecs} products, "
                  f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
        out.update(per_layer=vals, products=products)
    elif case == "slice":
        from landscape import slice_1d

        d = torch.randn(n, generator=torch.Generator().manual_seed(2))
        res = slice_1d(model, "lm", data, d.div_(d.norm()), torch.linspace(-1, 1, 21).tolist(),
                       metrics=("loss",), progress=False)
        out.update(points=21, loss_at_0=float(res.loss[10]))
    seconds = time.perf_counter() - t0
    out.update(seconds=seconds, gradients=seconds / grad_s, peak_rss_gb=_peak() / 1e9,
               estimate_gb=None if est is None else est.peak_bytes / 1e9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="tiny")
    ap.add_argument("--cases", default="top1-fd")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--max-basis", type=int, default=4,
                    help="Lanczos basis of the -fd cases (0: the library's default, 20 rows)")
    ap.add_argument("--basis-device", choices=["disk"], default=None,
                    help="the Krylov basis of the Lanczos cases on disk (default: in memory)")
    ap.add_argument("--offload", choices=["disk"], default=None,
                    help="g(w) and w of forward differences on disk (HessianOperator(offload=))")
    ap.add_argument("--microbatch", type=int, default=None,
                    help="microbatch_size of the products (default: whole batches)")
    ap.add_argument("--malloc", choices=["default", "fixed"], default="default",
                    help="fixed: glibc's mmap threshold at 1 MiB in each case's process "
                         "(analysis.host_memory.fix_mmap_threshold); default: glibc's own")
    ap.add_argument("--he-steps", type=int, default=15, help="Lanczos steps of top1-he")
    ap.add_argument("--he-python", default=HE_PYTHON, help="the interpreter of top1-he")
    ap.add_argument("--basis-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                    help="the stored Krylov basis's dtype of the cases that name none "
                         "(default: the model's)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case here
    ap.add_argument("--json", help="append the results (JSON lines) to this file")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_case(args.model, args.one, args.batch, args.seq,
                                  args.max_basis or None, args.he_steps, args.basis_dtype,
                                  args.basis_device, args.microbatch, args.malloc,
                                  args.offload)))
        return
    rows = []
    for spec in args.cases.split(","):
        case, _, basis_dtype = spec.partition("@")
        basis_dtype = basis_dtype or args.basis_dtype
        if case not in CASES or basis_dtype not in (None, "bfloat16", "float16", "float32"):
            raise SystemExit(f"unknown case {spec!r}; choose from {CASES} (optionally "
                             "@bfloat16, @float16 or @float32)")
        python = args.he_python if case == "top1-he" else sys.executable
        proc = subprocess.run([python, __file__, "--model", args.model, "--one", case,
                               "--batch", str(args.batch), "--seq", str(args.seq),
                               "--max-basis", str(args.max_basis),
                               "--he-steps", str(args.he_steps)]
                              + ([] if basis_dtype is None else ["--basis-dtype", basis_dtype])
                              + ([] if args.basis_device is None
                                 else ["--basis-device", args.basis_device])
                              + ([] if args.microbatch is None
                                 else ["--microbatch", str(args.microbatch)])
                              + ["--malloc", args.malloc]
                              + ([] if args.offload is None else ["--offload", args.offload]),
                              capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        est = "" if row["estimate_gb"] is None else f"{row['estimate_gb']:.2f}"
        print(f"| {row['model']} | {spec} | {row['seconds']:.0f} s | {row['gradients']:.1f} | "
              f"{row['peak_rss_gb']:.2f} | {est} | {row.get('products', '')} | "
              f"{row.get('eigenvalue', row.get('trace', ''))} |", flush=True)
        if args.json:
            with open(args.json, "a") as fh:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
