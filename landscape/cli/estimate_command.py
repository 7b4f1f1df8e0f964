"""``landscape estimate``: the peak memory and the products of an analysis, before any run.

It loads the checkpoint and the data as ``landscape hessian`` does (same model and data
options), makes one forward pass of the first batch to measure its saved activations, and
prints :func:`analysis.cost.estimate_peak_bytes`: the peak resident memory (the process now,
the analysis's vectors, one product's working memory by method) and the products planned, with
the memory available on the device. No product is computed; ``--json`` writes the same numbers.
"""

from __future__ import annotations

import argparse
from typing import Any

from landscape.defaults import cli_default

from ._common import positive_int
from .files import one_checkpoint
from .options import add_command, add_common_options
from .output import Ctx, envelope
from .setup import Setup

__all__ = ["EPILOG", "METHODS", "register", "run"]

EPILOG = """example:
  landscape estimate model.pt --model net.py:build --data net.py:data --top-k 1 \\
      --method forward-difference --max-basis 4"""

#: The product methods of ``--method`` (those of :class:`analysis.HessianOperator`).
METHODS = ("auto", "forward-over-reverse", "double-backward", "cached-graph",
           "finite-difference", "forward-difference")


def register(sub: Any) -> None:
    """Add the ``estimate`` subcommand to the subparsers ``sub``."""
    p = add_command(sub, "estimate", "predicted peak memory and Hessian-vector products of an "
                    "analysis, before any run", EPILOG)
    p.add_argument("checkpoint", metavar="CKPT", help="one checkpoint file")
    p.add_argument("--analysis", choices=["lanczos", "trace"], default="lanczos",
                   help="top-k eigenvalues (Lanczos) or the trace (Hutch++)")
    p.add_argument("--top-k", type=positive_int, default=cli_default("hessian", "--top-k"),
                   metavar="K", help="number of largest eigenvalues (Lanczos)")
    p.add_argument("--max-basis", type=positive_int, default=None, metavar="M",
                   help="Lanczos basis rows (default: min(n, max(2k + 1, 20)))")
    p.add_argument("--max-iter", type=positive_int, default=None, metavar="N",
                   help="Lanczos cap on products (default: min(max(300, 30k), 10n))")
    p.add_argument("--num-matvecs", type=positive_int, default=99, metavar="N",
                   help="products of the Hutch++ trace")
    p.add_argument("--method", choices=METHODS, default="auto",
                   help="the Hessian-vector product method")
    p.add_argument("--microbatch-size", type=positive_int, default=None, metavar="N",
                   help="split each batch into slices of N samples for the products")
    add_common_options(p)
    p.set_defaults(func=run)


def _fmt(b: int | None) -> str:
    return "unknown" if b is None else f"{b / 1e9:.3f} GB" if b >= 1e8 else f"{b / 2**20:.1f} MB"


def run(args: argparse.Namespace, ctx: Ctx) -> int:
    """Print the estimate of one checkpoint's analysis (and write it with ``--json``)."""
    from analysis.cost import estimate_peak_bytes
    from analysis.evaluation import model_device_dtype
    from analysis.operators.auto import available_bytes

    path = one_checkpoint("estimate", args.checkpoint)
    setup = Setup(args, ctx)
    model, _ = setup.load(path)
    est = estimate_peak_bytes(model, setup.loss_fn, setup.data, analysis=args.analysis,
                              k=args.top_k, max_basis=args.max_basis, max_iter=args.max_iter,
                              num_matvecs=args.num_matvecs, method=args.method,
                              microbatch_size=args.microbatch_size)
    device, _ = model_device_dtype(model)
    avail = available_bytes(device)
    what = (f"top-{args.top_k} eigenvalues (Lanczos)" if args.analysis == "lanczos"
            else f"trace (Hutch++, {args.num_matvecs} products)")
    method = est.method if args.method != "auto" else f"{est.method}, chosen by method='auto'"
    le = "" if est.products_exact else "<= "
    lines = [
        f"estimate: {what} on {est.num_params} parameters ({method})",
        f"  Hessian-vector products: {le}{est.products}"
        + ("" if est.products_exact else " (the cap; it stops at the tolerance, usually far "
           "earlier)"),
        f"  peak resident memory: {_fmt(est.peak_bytes)} = process now {_fmt(est.baseline_bytes)}"
        f" + vectors {_fmt(est.vectors_bytes)} + one product {_fmt(est.product_bytes)}"
        f" (saved activations of the first batch {_fmt(est.activation_bytes)})",
        f"  memory available on {device}: {_fmt(avail)}"
        + ("" if avail is None or est.extra_bytes <= avail else " (less than the analysis adds)"),
    ]
    if not est.validated:
        lines.append(f"  note: the factors of {est.method} are rough (not checked against a "
                     "measured peak)")
    ctx.out("\n".join(lines))
    ctx.write_json(envelope("estimate", checkpoint=str(path), **est.to_dict(),
                            available_bytes=avail, device=str(device)))
    return 0
