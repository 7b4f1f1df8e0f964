"""CurvatureTracker cost: Hessian-vector products per check and the overhead on a training run.

Run standalone: ``python benchmarks/tracker.py`` (about a minute on one CPU core). Trains the
digits CNN (landscape.models.digits_cnn(16), batch 64, MSAM rho=1, 20 % label noise) for
``--epochs`` epochs (10: 200 steps) with and without a :class:`analysis.CurvatureTracker`
checking ``lambda_max`` every ``--every`` steps on a fixed probe batch of ``--probe`` images
(64), repetitions interleaved in the same process (untracked, tracked, and with ``--baseline
REV`` the tracker of git revision ``REV`` loaded next to the current one; the order rotates from
one repetition to the next), and prints:

- the median wall-clock and CPU-time ratio tracked / untracked (the overhead), per tracker;
- Hessian-vector products per check (warm-started checks; the first check is cold) and, for
  reference, a cold-start Lanczos at the same weights (``tol=1e-6``) and the relative error of
  the tracked ``lambda_max`` against it.

``--methods default,double-backward`` times trackers of several product methods
(``CurvatureTracker(method=)``) in the same repetitions.

Target (issue 12): <= 5 products per warm check at 1e-2 relative error; <= 10 % overhead at N=50.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.append(os.path.dirname(os.path.abspath(__file__)))

from analysis import CurvatureTracker, HessianOperator, top_eigenpairs  # noqa: E402
from landscape.datasets import load_digits  # noqa: E402
from landscape.models import digits_cnn  # noqa: E402
from msam import MSAM  # noqa: E402


def train(x, y, probe, *, epochs: int, every: int, tracked: bool, reference: bool = False,
          tracker_cls=CurvatureTracker):
    torch.manual_seed(0)
    model = digits_cnn(16)
    opt = MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=1.0, weight_decay=5e-4)
    tracker = tracker_cls(model, "cross_entropy", probe, optimizer=opt, every=every) \
        if tracked else None
    gen = torch.Generator().manual_seed(1)
    errors = []
    step = 0
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i:i + 64]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            step += 1
            if tracker is not None:
                rec = tracker.maybe_measure(step)
                if rec is not None and reference:
                    with opt.unperturbed():
                        model.eval()
                        ref = top_eigenpairs(HessianOperator(model, "cross_entropy", [probe]),
                                             k=1, tol=1e-6)
                        model.train()
                    errors.append(abs(rec.lambda_max - float(ref.eigenvalues[0]))
                                  / abs(float(ref.eigenvalues[0])))
    return time.perf_counter() - wall, time.process_time() - cpu, tracker, errors


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--probe", type=int, default=64, help="probe batch size")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--methods", default="default",
                    help="comma-separated product methods of the trackers timed side by side "
                         "(CurvatureTracker(method=); 'default' is method=None), e.g. "
                         "'default,double-backward' (forward differences are unfit for this "
                         "ReLU CNN: benchmarks/relu_differences.py)")
    ap.add_argument("--baseline", default=None,
                    help="a git revision whose analysis/tracker.py is timed alongside")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    d = load_digits(seed=0, label_noise=0.2)
    x, y = d.train
    probe = (x[:args.probe], y[:args.probe])
    trackers = {("tracker" if m == "default" else f"tracker, {m}"):
                CurvatureTracker if m == "default" else functools.partial(CurvatureTracker, method=m)
                for m in args.methods.split(",")}
    if args.baseline:
        from baseline import load_at

        trackers[f"baseline {args.baseline}"] = load_at(
            args.baseline, "analysis/tracker.py", "analysis.tracker_at_baseline").CurvatureTracker
    print(f"torch {torch.__version__}, 1 thread; digits CNN, MSAM, {args.epochs} epochs, "
          f"check every {args.every} steps on {args.probe} probe images")
    for name, cls in trackers.items():
        _, _, tracker, errors = train(x, y, probe, epochs=args.epochs, every=args.every,
                                      tracked=True, reference=True, tracker_cls=cls)
        recs = list(tracker.history)
        warm = [r.lanczos_hvps for r in recs if r.warm]
        print(f"{name}: checks {len(recs)}; HVPs per check {[r.lanczos_hvps for r in recs]} "
              f"(first cold); warm median {statistics.median(warm) if warm else float('nan')}; "
              f"relative error vs cold Lanczos (tol 1e-6): max {max(errors):.2e}, "
              f"median {statistics.median(errors):.2e}")
    runs = [("untracked", None)] + list(trackers.items())
    times: dict[str, list] = {name: [] for name, _ in runs}
    for rep in range(args.reps):
        order = runs[rep % len(runs):] + runs[:rep % len(runs)]
        for name, cls in order:
            w, c, _, _ = train(x, y, probe, epochs=args.epochs, every=args.every,
                               tracked=cls is not None, tracker_cls=cls or CurvatureTracker)
            times[name].append((w, c))
        print(f"  rep {rep}: " + ", ".join(f"{n} {times[n][-1][0]:.2f} s" for n, _ in runs))
    print(f"\n| tracker (every {args.every}) | overhead, wall | overhead, CPU |")
    print("|---|---:|---:|")
    base = times["untracked"]
    for name, _ in runs[1:]:
        wall = statistics.median(t[0] / b[0] - 1 for t, b in zip(times[name], base))
        cpu = statistics.median(t[1] / b[1] - 1 for t, b in zip(times[name], base))
        print(f"| {name} | {100 * wall:.1f} % | {100 * cpu:.1f} % |")
    print(f"\n(median of {args.reps} repetitions of tracked / untracked - 1, each pair from the "
          "same repetition)")


if __name__ == "__main__":
    main()
