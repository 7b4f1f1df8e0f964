"""Per-vector cost of ``op @ V`` for a block of columns against as many single products.

For each product method of :class:`analysis.HessianOperator` (and ``"auto"``, settled on a
single product for the singles and on the block for the block, as a user's first call would),
the same ``b`` columns are multiplied as ``b`` single products ``op @ V[:, i]`` and as one
``op @ V`` (``block_size=b``), alternated ``--repeats`` times in one process after a warm-up;
reported: the median process CPU time per vector of each and their ratio (singles / block: above
1 the block is faster). Process CPU time, not wall time: on shared cores the wall clock measures
the neighbours (run it with one thread, the default ``--threads 1``; waiting OpenMP threads spin
and inflate the CPU time). Issue 25's goal: ``b = 16`` at least 1.3x faster per vector.

Models: the 265k-parameter MLP (batch 256) and a small CNN (97k parameters, 64 images of
3x32x32), CPU, float32:

    PYTHONPATH=. python benchmarks/batched_products.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from analysis import HessianOperator

METHODS = ["forward-over-reverse", "double-backward", "cached-graph", "auto"]


def models() -> dict:
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.Tanh(),
                              torch.nn.Linear(512, 256), torch.nn.Tanh(),
                              torch.nn.Linear(256, 10))
    cnn = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(32, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Conv2d(64, 64, 3, padding=1, stride=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 10))
    return {"MLP": (mlp, torch.randn(256, 256)), "CNN": (cnn, torch.randn(64, 3, 32, 32))}


def cpu_ms(fn) -> float:
    t = time.process_time()
    fn()
    return (time.process_time() - t) * 1e3


def measure(model, data, method: str, b: int, repeats: int) -> tuple[float, float, str]:
    """Median CPU ms per vector of ``b`` single products and of one block of ``b``."""
    single = HessianOperator(model, "cross_entropy", data, method=method)
    block = HessianOperator(model, "cross_entropy", data, method=method)
    n = single.shape[0]
    V = torch.randn(n, b, generator=torch.Generator().manual_seed(1))
    single @ V[:, 0].contiguous()  # warm-up; "auto" settles on a single product
    block.matmat(V, block_size=b)  # warm-up; "auto" settles on the block
    one, many = [], []
    for _ in range(repeats):
        one.append(cpu_ms(lambda: [single @ V[:, i].contiguous() for i in range(b)]) / b)
        many.append(cpu_ms(lambda: block.matmat(V, block_size=b)) / b)
    picked = f"{single.method} / {block.method}" if method == "auto" else ""
    return statistics.median(one), statistics.median(many), picked


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--models", default="MLP,CNN")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"b = {args.block}, float32, {args.threads} thread(s), process CPU time, median of "
          f"{args.repeats}")
    print(f"{'model':>5} {'method':>22} {'single ms/vec':>14} {'block ms/vec':>13} "
          f"{'single/block':>13}  auto's picks (single / block)")
    for name, (model, x) in models().items():
        if name not in args.models.split(","):
            continue
        y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(2))
        for method in METHODS:
            one, many, picked = measure(model, (x, y), method, args.block, args.repeats)
            print(f"{name:>5} {method:>22} {one:>14.2f} {many:>13.2f} {one / many:>12.2f}x  "
                  f"{picked}", flush=True)


if __name__ == "__main__":
    main()
