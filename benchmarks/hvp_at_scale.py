"""One multi-batch Hessian-vector product at the scale issue 14 planned: ours vs curvlinops.

The full top-5 benchmark (``benchmarks/scale.py``) could be run on 4 samples only on a 2-core
CPU; this measures what one product costs at the planned 256 CIFAR-shaped samples in 4 batches
of 64 (CIFAR ResNet-18, 11.17M parameters, eval-mode BatchNorm, float32): one gradient over the
batches (the unit), ours (``method="auto"``: its first product includes the calibration; then
steady products), curvlinops' ``HessianLinearOperator``, and last ours with
``method="cached-graph"`` forced (``"auto"`` leaves it out when the graphs of all batches would
exceed its cache budget, ``analysis.operators.cache_budget``; the growth of the peak resident memory over that stage is its price).
Wall time, the smallest of ``--repeats`` steady products; the products are checked to agree.

    PYTHONPATH=. .venv-oracle/bin/python benchmarks/hvp_at_scale.py --json out.json  # ~5 min
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

# the project before this folder: benchmarks/landscape.py must not shadow the landscape package
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis import HessianOperator  # noqa: E402
from landscape.models import resnet  # noqa: E402


def _wall(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--no-cached", action="store_true", help="skip the forced cached graph")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = resnet(18, width=a.width).eval()
    x = torch.randn(a.samples, 3, 32, 32)
    y = torch.randint(0, 10, (a.samples,))
    batches = list(zip(x.chunk(a.batches), y.chunk(a.batches)))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    crit = torch.nn.CrossEntropyLoss()
    v = torch.randn(n)

    def gradient():
        grads = [torch.zeros_like(p) for p in params]
        for xb, yb in batches:
            g = torch.autograd.grad(crit(model(xb), yb) * len(xb) / a.samples, params)
            for acc, gi in zip(grads, g):
                acc.add_(gi)
        return grads

    out = dict(parameters=n, samples=a.samples, batches=a.batches, threads=torch.get_num_threads(),
               machine=platform.processor() or platform.machine(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    gradient()
    out["gradient_s"] = min(_wall(gradient)[0] for _ in range(a.repeats))

    H = HessianOperator(model, "cross_entropy", batches, method="auto")
    out["ours_first_s"], ours = _wall(lambda: H @ v)
    out["ours_method"] = H.method
    out["ours_auto_timings_s"] = H.auto_choice.timings
    out["ours_auto_skipped"] = H.auto_choice.skipped
    out["ours_s"] = min(_wall(lambda: H @ v)[0] for _ in range(a.repeats))

    try:
        from curvlinops import HessianLinearOperator
    except ImportError:
        out["curvlinops"] = "not installed"
    else:
        C = HessianLinearOperator(model, crit, params, batches, check_deterministic=False)
        out["curvlinops_first_s"], theirs = _wall(lambda: C @ v)
        out["curvlinops_s"] = min(_wall(lambda: C @ v)[0] for _ in range(a.repeats))
        out["rel_difference"] = float((ours - theirs).norm() / theirs.norm())
        out["curvlinops_over_ours"] = out["curvlinops_s"] / out["ours_s"]
        del C
    out["ours_gradients_per_hvp"] = out["ours_s"] / out["gradient_s"]
    if not a.no_cached:
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        G = HessianOperator(model, "cross_entropy", batches, method="cached-graph")
        out["cached_graph_first_s"], cached = _wall(lambda: G @ v)
        out["cached_graph_s"] = min(_wall(lambda: G @ v)[0] for _ in range(a.repeats))
        out["cached_graph_gradients_per_hvp"] = out["cached_graph_s"] / out["gradient_s"]
        out["cached_graph_rel_difference"] = float((cached - ours).norm() / ours.norm())
        out["cached_graph_peak_growth_bytes"] = (
            resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
