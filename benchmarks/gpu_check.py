"""Top-5 Hessian eigenvalues of a ResNet-50-sized CNN and a GPT-2-small-sized LM on one GPU.

Hand-written models (no torchvision): a bottleneck ResNet with the ResNet-50 stage layout
(3, 4, 6, 3 blocks, ~25M parameters) on 32 images of 64x64, and a 12-layer, 768-wide decoder
(~124M parameters, the head tied to the token embedding as in GPT-2) on 8
sequences of 128 tokens. Prints wall time, products and peak GPU memory
(``torch.cuda.max_memory_allocated``), and the cost estimate before each run. Run through
``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from analysis import HessianOperator, top_eigenpairs
from analysis.krylov import default_max_basis


class Bottleneck(nn.Module):
    def __init__(self, cin, mid, stride):
        super().__init__()
        cout = 4 * mid
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = (nn.Identity() if stride == 1 and cin == cout else
                     nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet50(classes=100):
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for i, (mid, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            layers.append(Bottleneck(cin, mid, 2 if b == 0 and i > 0 else 1))
            cin = 4 * mid
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=x.device), 1)
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=50257, d=768, layers=12, heads=12, ctx=128):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # tied, as GPT-2
        nn.init.normal_(self.tok.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.01)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


def lm_loss(logits, targets):
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def run(name, model, loss, data, k, max_iter, basis_device):
    model = model.cuda().eval()
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    max_basis = default_max_basis(n, k)
    est = (max_basis + 3) * n * 4
    print(f"{name}: {n / 1e6:.1f}M parameters; top-{k}: at most {max_iter} products, "
          f"basis bound {est / 2**30:.2f} GiB on {basis_device or 'cuda'}", flush=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    op = HessianOperator(model, loss, data)
    t = time.perf_counter()
    res = top_eigenpairs(op, k=k, max_iter=max_iter, basis_device=basis_device)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated() - base
    print(f"  {wall:.1f} s, {res.num_matvecs} products ({op.method}), converged={res.converged}, "
          f"peak extra GPU memory {peak / 2**30:.2f} GiB, basis {res.basis_bytes / 2**30:.2f} GiB",
          flush=True)
    print("  eigenvalues", [f"{v:.4g}" for v in res.eigenvalues.tolist()],
          "bounds", [f"{v:.1e}" for v in res.error_bounds.tolist()], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-iter", type=int, default=120)
    ap.add_argument("--gpt-basis-device", default=None,
                    help="'cpu' keeps the GPT basis in pinned host memory (slower steps)")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(32, 3, 64, 64, device="cuda")
    y = torch.randint(0, 100, (32,), device="cuda")
    run("resnet50-sized", resnet50(), "cross_entropy", (x, y), args.k, args.max_iter, None)
    idx = torch.randint(0, 50257, (8, 129), device="cuda")
    run("gpt2-small-sized", GPT(), lm_loss, (idx[:, :-1], idx[:, 1:]), args.k, args.max_iter,
        args.gpt_basis_device)


if __name__ == "__main__":
    main()
