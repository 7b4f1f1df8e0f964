"""Per-vector cost of batched Hessian products ``op @ V`` for blocks of b = 1, 4, 16 columns.

``HessianOperator.matmat`` computes a block in one pass (vmap over the tangents of
forward-over-reverse, or one batched backward for double-backward / cached-graph). Prints the
time per vector relative to b = 1 for each method, on a small CNN-like MLP on the CPU:

    PYTHONPATH=. python benchmarks/batched_products.py
"""

from __future__ import annotations

import argparse
import time

import torch

from analysis import HessianOperator


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(),
                                torch.nn.Linear(512, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 10))
    x, y = torch.randn(args.batch, 256), torch.randint(0, 10, (args.batch,))
    n = sum(p.numel() for p in model.parameters())
    print(f"model: {n} parameters, float32, batch {args.batch}, {torch.get_num_threads()} threads")
    print(f"{'method':>22} {'b':>3} {'ms/vector':>10} {'vs b=1':>7}")
    for method in ["forward-over-reverse", "double-backward", "cached-graph"]:
        op = HessianOperator(model, "cross_entropy", (x, y), method=method)
        base = None
        for b in args.blocks:
            V = torch.randn(n, b)
            op.matmat(V, block_size=b)  # warm-up (and the cached graph)
            t = time.perf_counter()
            for _ in range(args.repeats):
                op.matmat(V, block_size=b)
            per = (time.perf_counter() - t) / (args.repeats * b) * 1e3
            base = base or per
            note = f" (fell back: {op.batched_fallback_reason})" if getattr(
                op, "batched_fallback_reason", None) else ""
            print(f"{method:>22} {b:>3} {per:>10.2f} {per / base:>7.2f}{note}")


if __name__ == "__main__":
    main()
