"""Issue 27, item 7: the cost claims re-measured on small Hugging Face configs, and the kinks a
ReLU network's Hessian does not see.

1. GPT-2 (``landscape.models.hf_gpt2``, 4 blocks, width 256, vocabulary 256; 4 batch dicts of 8
   sequences of 32 tokens, ``loss="lm"``): the first Hessian-vector product of a fresh
   ``HessianOperator(method="auto")`` (its calibration included) and a steady product, in
   gradients (forward + backward over the same batches, timed in the same process).
2. Llama (``LlamaForCausalLM`` from a tiny ``LlamaConfig``, same data): a 1-D slice
   (``landscape.slices.slice_1d``, ``cache=False``) per point against one bare forward pass over
   the same batches (``torch.no_grad``, eval mode), timed in the same process.
3. ReLU: a two-hidden-layer ReLU MLP (float64, 32 samples, trained 300 steps);
   ``lambda_max`` of the autograd Hessian against the top eigenvalue of the central
   finite-difference operator ``v -> (g(w + h v) - g(w - h v)) / (2 h)`` of the gradient
   (power iteration) for several ``h``: the Hessian of a piecewise-linear network is the
   curvature inside one linear region, and the kinks crossed at a finite ``h`` add curvature it
   does not contain (at ``h = 1e-6`` no kink is crossed and the two agree).
4. The memory estimate the CLI checks (``landscape.cli.memory.product_memory``) against the
   peak resident memory of a first product (``VmHWM`` of a fresh subprocess).

All times are process CPU time, the median of ``--repeats``; run with one thread::

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/mixed_claims.py           # about a minute
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the repository first: benchmarks/landscape.py would shadow the landscape package
sys.path = [p for p in sys.path if pathlib.Path(p or ".").resolve() != ROOT / "benchmarks"]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

#: width and depth of the GPT-2 and Llama configs (``--dim``, ``--depth``)
DIM, DEPTH = 256, 4


def _cpu(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def _batches(vocab=256, n=4, b=8, t=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(2, vocab, (b, t), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def _gradient(model, loss_fn, batches):
    from analysis.evaluation import forward

    model.zero_grad(set_to_none=True)
    for x in batches:
        loss_fn(forward(model, x), x).backward()


def gpt2_first_product(repeats: int) -> dict:
    from analysis import HessianOperator
    from analysis.evaluation import resolve_loss
    from landscape.models import hf_gpt2

    torch.manual_seed(0)
    model = hf_gpt2(vocab_size=256, max_len=64, dim=DIM, depth=DEPTH, heads=4).float().eval()
    batches, lm = _batches(), resolve_loss("lm")
    _gradient(model, lm, batches)  # warm-up
    grad = statistics.median(_cpu(lambda: _gradient(model, lm, batches)) for _ in range(repeats))
    firsts, steadies, methods = [], [], []
    for r in range(repeats):
        op = HessianOperator(model, "lm", batches)
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(r))
        product = functools.partial(operator.matmul, op, v)
        firsts.append(_cpu(product))
        steadies.append(statistics.median(_cpu(product) for _ in range(3)))
        methods.append(op.method)
        op.clear_cache()
    return {"parameters": sum(p.numel() for p in model.parameters()), "gradient_s": grad,
            "first_product_gradients": statistics.median(firsts) / grad,
            "steady_product_gradients": statistics.median(steadies) / grad,
            "first_products_gradients_all": [f / grad for f in firsts], "auto_choice": methods}


def llama_slice(repeats: int, points: int = 9) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from analysis import random_direction
    from analysis.evaluation import forward, resolve_loss
    from landscape import slice_1d

    cfg = LlamaConfig(vocab_size=256, hidden_size=DIM, intermediate_size=2 * DIM,
                      num_hidden_layers=DEPTH, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    batches, lm = _batches(), resolve_loss("lm")
    d = random_direction(model, seed=0)

    def bare():
        with torch.no_grad():
            for x in batches:
                lm(forward(model, x), x)

    bare()
    fwd = statistics.median(_cpu(bare) for _ in range(repeats))
    alphas = torch.linspace(-1, 1, points)
    run = lambda: slice_1d(model, "lm", batches, d, alphas, progress=False, cache=False)  # noqa: E731
    run()
    per_point = statistics.median(_cpu(run) for _ in range(repeats)) / (points + 1)
    run_nocheck = lambda: slice_1d(model, "lm", batches, d, alphas, progress=False,  # noqa: E731
                                   cache=False, check_deterministic=False)
    nocheck = statistics.median(_cpu(run_nocheck) for _ in range(repeats)) / (points + 1)
    run_loss = lambda: slice_1d(model, "lm", batches, d, alphas, progress=False,  # noqa: E731
                                cache=False, check_deterministic=False, metrics=("loss",))
    loss_only = statistics.median(_cpu(run_loss) for _ in range(repeats)) / (points + 1)
    return {"parameters": sum(p.numel() for p in model.parameters()), "forward_s": fwd,
            "slice_point_forwards": per_point / fwd,
            "slice_point_forwards_without_determinism_check": nocheck / fwd,
            "slice_point_forwards_loss_only_without_check": loss_only / fwd, "points": points}


def relu_kinks(n: int = 32, width: int = 32, iters: int = 30) -> dict:
    from analysis import ParameterSpace, top_eigenpairs

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 10, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(300):  # near a minimum, where the sharpness is read
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    lam = float(top_eigenpairs(model, "cross_entropy", (x, y), k=1, tol=1e-8).eigenvalues[0])
    space = ParameterSpace(model)
    w0 = space.vector().clone()

    def grad_at(w):
        space.copy_(w)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return space.flatten([p.grad for p in space.params])

    out = {"samples": n, "width": width, "lambda_max": lam, "finite_difference_top": {}}
    for h in (1e-6, 1e-3, 1e-2, 1e-1):  # power iteration on v -> (g(w + h v) - g(w - h v)) / 2h
        v = torch.randn(w0.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        v /= v.norm()
        for _ in range(iters):
            u = (grad_at(w0 + h * v) - grad_at(w0 - h * v)) / (2 * h)
            ray, v = float(v @ u), u / u.norm()
        out["finite_difference_top"][f"{h:g}"] = ray
    space.copy_(w0)
    return out


_MEM_CHILD = """
import sys, torch
from landscape.models import hf_gpt2
from analysis import HessianOperator
from landscape.cli.memory import product_memory
sys.path.insert(0, '.')
from benchmarks.mixed_claims import _batches
torch.manual_seed(0)
model = hf_gpt2(vocab_size=256, max_len=64, dim=%d, depth=%d, heads=4).float().eval()
batches = _batches()
from analysis.host_memory import peak_resident_bytes as hwm  # VmHWM of this process
est = product_memory(model, "lm", batches)
base = hwm()
op = HessianOperator(model, "lm", batches)
op @ torch.randn(op.shape[0])
peak = hwm()
print(est.product_bytes, est.activation_bytes, peak - base, op.method)
"""


def memory_check() -> dict:
    out = subprocess.run([sys.executable, "-c", _MEM_CHILD % (DIM, DEPTH)], capture_output=True, text=True,
                         check=True)
    est, act, used, method = out.stdout.split()
    return {"estimate_bytes": int(est), "activation_bytes": int(act),
            "measured_peak_growth_bytes": int(used), "method": method,
            "estimate_over_measured": int(est) / max(1, int(used))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--depth", type=int, default=DEPTH)
    args = p.parse_args()
    globals().update(DIM=args.dim, DEPTH=args.depth)
    torch.set_num_threads(1)
    text = json.dumps({"gpt2": gpt2_first_product(args.repeats),
                       "llama_slice": llama_slice(args.repeats), "relu": relu_kinks(),
                       "memory": memory_check()}, indent=1)
    print(text)
    if args.json:
        pathlib.Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
