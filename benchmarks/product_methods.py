"""Cost of a multi-batch Hessian-vector product in gradient-equivalents, per product method.

A ResNet-18-like network (BasicBlocks, 2-2-2-2 stages, widths ``w, 2w, 4w, 8w``; ``w = 64`` is
ResNet-18's 11.2M parameters; eval-mode BatchNorm), CIFAR-shaped but small inputs on the CPU.
For each product method of :class:`analysis.HessianOperator` (and ``"auto"``, which
times them on the first batch and keeps the fastest) it prints the steady-state time of one HVP
over all batches divided by the time of one gradient over the same batches (forward + backward
per batch, the weighted sum of the batch gradients; measured next to each method), as process
CPU time (the smallest of ``--repeats``; wall time on shared cores is noise; run it with one
thread, ``OMP_NUM_THREADS=1``: waiting OpenMP threads spin and inflate the CPU time), the first product's time (it includes the
graph build of ``"cached-graph"`` and the calibration of ``"auto"``) and what ``"auto"`` chose.
Issue 14's target: a multi-batch HVP within 2.5 gradients.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/product_methods.py --width 16   # a few minutes
    PYTHONPATH=. python benchmarks/product_methods.py --json out.json   # ResNet-18's widths
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from analysis import HessianOperator

METHODS = ["forward-over-reverse", "double-backward", "cached-graph", "auto"]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        same = stride == 1 and cin == cout
        self.shortcut = nn.Identity() if same else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet18_like(width: int = 64, classes: int = 10) -> nn.Module:
    """ResNet-18's layout for CIFAR-shaped inputs (3x3 stem, no max-pool), stage widths
    ``width * (1, 2, 4, 8)``."""
    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU()]
    cin = width
    for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
        for i in range(2):
            layers.append(BasicBlock(cin, width * mult, stride if i == 0 else 1))
            cin = width * mult
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def _cpu_time(fn, repeats: int) -> float:
    """The smallest CPU time of the process (all threads) over ``repeats`` calls: robust to other
    processes sharing the cores, which inflate wall time but not this process's CPU time."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def measure(width: int, samples: int, batches: int, size: int, repeats: int) -> dict:
    """The numbers printed by :func:`main`, as a dictionary."""
    torch.manual_seed(0)
    model = resnet18_like(width).eval()
    x = torch.randn(samples, 3, size, size)
    y = torch.randint(0, 10, (samples,))
    data = [(xb, yb) for xb, yb in zip(x.chunk(batches), y.chunk(batches))]
    n = sum(p.numel() for p in model.parameters())

    def gradient():
        model.zero_grad(set_to_none=True)
        for xb, yb in data:
            (F.cross_entropy(model(xb), yb) * (len(yb) / samples)).backward()

    gradient()  # warm-up
    v = torch.randn(n)
    out = {"parameters": n, "samples": samples, "batches": batches, "size": size,
           "threads": torch.get_num_threads(), "methods": {}}
    grads = []
    for method in METHODS:
        grad_s = _cpu_time(gradient, repeats)  # paired with each method: drifts cancel
        grads.append(grad_s)
        op = HessianOperator(model, "cross_entropy", data, method=method)
        t0 = time.process_time()
        op @ v
        first = time.process_time() - t0
        hvp = _cpu_time(lambda op=op: op @ v, repeats)
        row = {"hvp_s": hvp, "gradient_s": grad_s, "gradients": hvp / grad_s, "first_s": first,
               "first_gradients": first / grad_s, "method_used": op.method}
        if method == "auto":
            row["auto_timings_s"] = op.auto_choice.timings
            row["auto_skipped"] = op.auto_choice.skipped
            row["graph_bytes"] = op.auto_choice.graph_bytes
        out["methods"][method] = row
        del op
    out["gradient_s"] = statistics.median(grads)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=64, help="first stage width (64: ResNet-18)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--size", type=int, default=16, help="input height and width")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args()
    res = measure(args.width, args.samples, args.batches, args.size, args.repeats)
    print(f"ResNet-18-like, {res['parameters']:,} parameters, {args.samples} samples of "
          f"3x{args.size}x{args.size} in {args.batches} batches, {res['threads']} threads; "
          f"gradient {res['gradient_s'] * 1e3:.0f} ms")
    print(f"{'method':>22} {'HVP ms':>8} {'gradients':>10} {'first':>7}  used   (CPU time)")
    for method, row in res["methods"].items():
        print(f"{method:>22} {row['hvp_s'] * 1e3:8.0f} {row['gradients']:10.2f} "
              f"{row['first_gradients']:7.2f}  {row['method_used']}")
    auto = res["methods"]["auto"]
    print("auto timings on the first batch (ms):",
          {k: round(t * 1e3, 1) for k, t in auto["auto_timings_s"].items()},
          "skipped:", auto["auto_skipped"] or "none",
          f"graph memory ~{auto['graph_bytes'] / 2**20:.0f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
