"""Optimizer overhead: MSAM / NAG / SAM training steps and optimizer.step() against SGD.

Run standalone: ``python benchmarks/optimizers.py`` (a few minutes on one CPU core). Prints
markdown tables of medians and ratios against torch.optim.SGD measured in the same process.
Repetitions of the candidates are interleaved (A B C A B C ...), so load changes on a shared
machine hit every candidate alike; ratios are medians of the per-repetition paired ratios, for
wall-clock time and for process CPU time (less sensitive to other processes on a shared machine).

Workloads:
- digits CNN (landscape.models.digits_cnn, ~151k parameters), batches of 128 digits images;
- a ~10.5M-parameter ReLU MLP (1024-2048-2048-2048-10), batches of 128 random inputs;
- optimizer.step() alone on the MLP's parameters with fixed gradients.

Targets (issue 2): MSAM training step <= 1.03x SGD on the CNN and <= 1.10x on the MLP;
MSAM step() <= 1.7x SGD(foreach=True) step(); SAM ~2x.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from landscape.datasets import load_digits  # noqa: E402
from landscape.models import digits_cnn  # noqa: E402
from msam import MSAM, NAG, SAM  # noqa: E402

LR, MOMENTUM, WD = 0.05, 0.9, 5e-4


def make_optimizer(name: str, params, foreach: bool | None):
    if name == "SGD":
        return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=foreach)
    if name == "NAG":
        return NAG(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, foreach=foreach)
    if name == "MSAM":
        return MSAM(params, lr=LR, momentum=MOMENTUM, rho=3.0, weight_decay=WD, foreach=foreach)
    if name == "SAM":
        return SAM(params, torch.optim.SGD, rho=0.2, lr=LR, momentum=MOMENTUM, weight_decay=WD,
                   foreach=foreach)
    raise ValueError(name)


def training_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    if isinstance(opt, SAM):
        opt.first_step(zero_grad=True)
        F.cross_entropy(model(x), y).backward()
        opt.second_step()
    else:
        opt.step()


def interleaved(candidates: dict[str, callable], reps: int, inner: int, warmup: int):
    """Per-repetition (wall, cpu) seconds per call of each candidate, repetitions interleaved."""
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            w0, c0 = time.perf_counter(), time.process_time()
            for _ in range(inner):
                fn()
            times[name].append(((time.perf_counter() - w0) / inner,
                                (time.process_time() - c0) / inner))
    return times


def bench_training(model_fn, batches, names, reps, inner, foreach):
    torch.manual_seed(0)
    base = model_fn()
    candidates = {}
    for name in names:
        model = copy.deepcopy(base)
        opt = make_optimizer(name, model.parameters(), foreach)
        state = {"i": 0}

        def fn(model=model, opt=opt, state=state):
            x, y = batches[state["i"] % len(batches)]
            state["i"] += 1
            training_step(model, opt, x, y)

        candidates[name] = fn
    return interleaved(candidates, reps, inner, warmup=3)


def bench_step(model_fn, names, reps, inner, foreach):
    torch.manual_seed(0)
    base = model_fn()
    candidates = {}
    for name in names:
        model = copy.deepcopy(base)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        label = name
        if name == "SGD":
            opt = make_optimizer("SGD", model.parameters(), True)
            label = "SGD(foreach=True)"
        else:
            opt = make_optimizer(name, model.parameters(), foreach)
        candidates[label] = opt.step
    return interleaved(candidates, reps, inner, warmup=2)


def big_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(),
                         nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def table(title, results, baseline, note=""):
    """Median wall time; ratios are medians over repetitions of the paired (same repetition)
    ratio to the baseline, for wall-clock and for process CPU time."""
    lines = [f"### {title}", "",
             f"| candidate | median ms | ratio to {baseline} (wall) | ratio (CPU time) |",
             "|---|---|---|---|"]
    base = results[baseline]
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        ratio_wall = statistics.median(r[0] / b[0] for r, b in zip(runs, base))
        ratio_cpu = statistics.median(r[1] / b[1] for r, b in zip(runs, base))
        lines.append(f"| {name} | {wall * 1e3:.2f} | {ratio_wall:.3f} | {ratio_cpu:.3f} |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--reps", type=int, default=15, help="interleaved repetitions")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (smoke test)")
    parser.add_argument("--foreach", choices=["true", "false", "default"], default="true",
                        help="foreach setting of SGD/NAG/MSAM/SAM in the training-step tables")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    foreach = {"true": True, "false": False, "default": None}[args.foreach]
    reps = 3 if args.quick else args.reps

    data = load_digits(seed=0)
    x, y = data.x_train.float(), data.y_train
    g = torch.Generator().manual_seed(0)
    cnn_batches = []
    for _ in range(8):
        idx = torch.randint(0, x.shape[0], (128,), generator=g)
        cnn_batches.append((x[idx], y[idx]))
    mlp_batches = [(torch.randn(128, 1024, generator=g), torch.randint(0, 10, (128,), generator=g))
                   for _ in range(4)]

    names = ["SGD", "NAG", "MSAM", "SAM"]
    n_mlp = sum(p.numel() for p in big_mlp().parameters())
    n_cnn = sum(p.numel() for p in digits_cnn().parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, foreach={foreach}, "
          f"{reps} interleaved repetitions\n")
    cnn = bench_training(lambda: digits_cnn(), cnn_batches, names, reps, 10, foreach)
    print(table(f"Training step, digits CNN ({n_cnn / 1e3:.0f}k parameters, batch 128)",
                cnn, "SGD", "Target: MSAM <= 1.03x SGD; SAM ~2x."))
    mlp = bench_training(big_mlp, mlp_batches, names, reps, 2, foreach)
    print(table(f"Training step, MLP ({n_mlp / 1e6:.1f}M parameters, batch 128)", mlp, "SGD",
                "Target: MSAM <= 1.10x SGD; SAM ~2x."))
    step = bench_step(big_mlp, ["SGD", "NAG", "MSAM"], reps, 3, foreach)
    print(table(f"optimizer.step() alone, MLP ({n_mlp / 1e6:.1f}M parameters)", step,
                "SGD(foreach=True)",
                "Target: MSAM <= 1.7x SGD(foreach=True) (memory-traffic limit about 1.6x)."))


if __name__ == "__main__":
    main()
