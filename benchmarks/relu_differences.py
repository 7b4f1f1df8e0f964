"""Finite-difference products on a ReLU network: how far the kinks put them from ``H v``.

Run standalone: ``python benchmarks/relu_differences.py`` (seconds). The digits CNN
(``landscape.models.digits_cnn(4)``, ReLU and max-pooling, float32, eval mode) on 64 probe
images, one unit random ``v``: the relative error ``||P v - H v|| / ||H v||`` of the forward
(``method="forward-difference"``) and central (``"finite-difference"``) products against the
exact one (``"cached-graph"``), at initialization and after 300 SGD steps. The step of a
difference crosses kinks, so the product is a secant (the LLM and distributed guides cite these
numbers: forward differences and the sharded path are for smooth models; the Hessian guide's
"ReLU networks" section has the same effect on an MLP).
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from analysis import HessianOperator  # noqa: E402
from landscape.datasets import load_digits  # noqa: E402
from landscape.models import digits_cnn  # noqa: E402


def errors(model, probe, v) -> dict[str, float]:
    exact = HessianOperator(model, "cross_entropy", probe, method="cached-graph") @ v
    out = {"|Hv|": float(exact.norm())}
    for method in ("forward-difference", "finite-difference"):
        p = HessianOperator(model, "cross_entropy", probe, method=method) @ v
        out[method] = float((p - exact).norm() / exact.norm())
    return out


def main() -> None:
    x, y = load_digits(seed=0, label_noise=0.2, train_size=384).train
    torch.manual_seed(0)
    model = digits_cnn(4).eval()
    probe = (x[:64], y[:64])
    v = torch.randn(sum(p.numel() for p in model.parameters()),
                    generator=torch.Generator().manual_seed(0))
    v /= v.norm()
    print("at initialization:", errors(model, probe, v))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(3)
    model.train()
    for _ in range(300):
        idx = torch.randint(0, len(y), (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    print("after 300 SGD steps:", errors(model.eval(), probe, v))


if __name__ == "__main__":
    main()
