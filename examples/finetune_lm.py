"""Fine-tune a tiny causal language model with MSAM and AdamW-MSAM, then measure sharpness.

A GPT-style model (token and position embeddings, ``nn.TransformerEncoder`` with a causal mask,
linear head) is pre-trained with AdamW on padded sequences that count up by one, then fine-tuned
on sequences that count up by two with AdamW, AdamW-MSAM (the MSAM paper's optimizer for
transformers) and MSAM on SGD. Each fine-tuned model is evaluated *at w* (``optimizer.eval()``;
MSAM optimizers keep the model at the perturbed point ``w~`` between steps) on held-out
sequences, together with its worst-case adaptive m-sharpness (Andriushchenko et al. 2023).

The loss is the mean next-token cross-entropy over the real tokens: padding targets are ``-100``
(``ignore_index``), and right padding never reaches the real tokens through the causal mask.

Run::

    python examples/finetune_lm.py                 # a few seconds on a CPU
    python examples/finetune_lm.py --steps 200 --optimizers adamw adamw_msam

``main()`` returns the numbers as a dict (the test suite runs it with few steps).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import msam
from analysis import evaluate, sharpness

VOCAB, MAX_LEN, PAD, IGNORE = 16, 8, 0, -100


class TinyCausalLM(nn.Module):
    """Embeddings + a pre-LN ``nn.TransformerEncoder`` run causally + a linear head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, heads: int = 2, depth: int = 2,
                 max_len: int = MAX_LEN):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(0.02 * torch.randn(max_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        h = self.embed(ids) + self.position[:t]
        h = self.encoder(h, mask=causal, is_causal=True)
        return self.head(self.norm(h))  # (batch, time, vocab)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that are not ``-100``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE)


def counting_data(n: int, stride: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` right-padded sequences ``a, a + stride, a + 2 stride, ...`` (mod ``VOCAB - 1``,
    tokens ``1..VOCAB-1``) of random lengths, and their next-token targets (``-100`` at padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, MAX_LEN + 1, (n,), generator=g)
    starts = torch.randint(0, VOCAB - 1, (n,), generator=g)
    steps = torch.arange(MAX_LEN)
    ids = (starts[:, None] + stride * steps[None, :]) % (VOCAB - 1) + 1
    real = steps[None, :] < lengths[:, None]
    ids = torch.where(real, ids, torch.full_like(ids, PAD))
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = torch.where(real[:, 1:], ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE))
    return ids, targets


def make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    """``adamw``, ``adamw_msam`` (rho = 1, the paper's ViT setting scaled to this model) or
    ``msam`` (MSAM on SGD with momentum 0.9, rho = 3)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    if name == "adamw_msam":
        return msam.AdamWMSAM(params, lr=lr, weight_decay=0.01, rho=1.0)
    if name == "msam":
        return msam.MSAM(params, lr=30 * lr, momentum=0.9, rho=3.0)
    raise ValueError(f"unknown optimizer {name!r}; choose adamw, adamw_msam or msam")


def train(model: nn.Module, data, opt: torch.optim.Optimizer, steps: int, batch: int,
          seed: int) -> nn.Module:
    ids, targets = data
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(ids), (batch,), generator=gen)
        opt.zero_grad()
        lm_loss(model(ids[idx]), targets[idx]).backward()
        opt.step()
    if hasattr(opt, "eval"):
        opt.eval()  # MSAM / AdamW-MSAM: parameters back at w (not the perturbed w~)
    return model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--steps", type=int, default=60, help="fine-tuning steps per optimizer")
    p.add_argument("--optimizers", nargs="+", default=["adamw", "adamw_msam", "msam"])
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--rho", type=float, default=0.05, help="radius of the sharpness metric")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    base = TinyCausalLM()
    train(base, counting_data(256, 1, seed=1), torch.optim.AdamW(base.parameters(), lr=1e-2),
          args.pretrain_steps, batch=32, seed=args.seed)
    task, held_out = counting_data(128, 2, seed=2), counting_data(64, 2, seed=3)

    results: dict[str, dict[str, float]] = {}
    rows = [("pretrained", base)]
    for name in args.optimizers:
        model = copy.deepcopy(base)
        opt = make_optimizer(name, model.parameters(), args.lr)
        rows.append((name, train(model, task, opt, args.steps, batch=16, seed=args.seed + 1)))
    for name, model in rows:
        ev = evaluate(model, lm_loss, held_out)
        sh = sharpness(model, lm_loss, task, rho=args.rho, kind="worst", steps=5, progress=False)
        results[name] = {"held_out_loss": ev.loss, "train_loss": evaluate(model, lm_loss, task).loss,
                         "sharpness": sh.value, "m": sh.m}
    sys.stdout.write(f"{'model':<12}{'held-out loss':>14}{'train loss':>12}{'sharpness':>11}\n")
    for name, r in results.items():
        sys.stdout.write(f"{name:<12}{r['held_out_loss']:>14.4f}{r['train_loss']:>12.4f}"
                         f"{r['sharpness']:>11.4f}\n")
    return results


if __name__ == "__main__":
    main()
