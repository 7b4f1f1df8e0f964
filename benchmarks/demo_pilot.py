"""The pilot that fixed the demo's setting (landscape/demo.py), on seeds that the demo never shows.

Run: ``python benchmarks/demo_pilot.py`` (a few minutes on one core). Trains SGD, NAG, SAM and
MSAM (training only, with the lambda_max tracker) for each candidate setting on seeds 100 and 101
and prints test accuracy, s/epoch and the final tracked lambda_max.
"""

from __future__ import annotations

import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from landscape.demo import OPTIMIZERS, DemoConfig, _train  # noqa: E402
from landscape.models import digits_cnn  # noqa: E402
from landscape.reproduce import digits_problem  # noqa: E402

SEEDS = (100, 101)
CANDIDATES = {
    "reproduction: 30 epochs, 20% noise": {},
    "15 epochs, 20% noise": {"epochs": 15},
    "30 epochs, 30% noise": {"label_noise": 0.3},
}


def main() -> None:
    torch.set_num_threads(1)
    for title, over in CANDIDATES.items():
        print(f"## {title}")
        for name in OPTIMIZERS:
            accs, secs, lams = [], [], []
            for seed in SEEDS:
                cfg = DemoConfig(seed=seed, **over)
                problem = digits_problem(cfg.repro(), data_seed=0)
                x, y = problem.train
                torch.manual_seed(seed)
                init = digits_cnn(cfg.width).state_dict()
                model, opt, hist, _, seconds, tracker = _train(name, cfg, init, x, y, problem.test,
                                                               (x[:256], y[:256]))
                accs.append(100 * hist[-1])
                secs.append(seconds / cfg.epochs)
                lams.append(tracker.history[-1].lambda_max)
            print(f"{name:5s} test acc {statistics.mean(accs):6.2f} ({', '.join(f'{a:.2f}' for a in accs)})"
                  f"  s/epoch {statistics.mean(secs):.3f}  final lambda_max {statistics.mean(lams):.2f}")


if __name__ == "__main__":
    main()
