"""Tiny versions of the architectures researchers analyze (no torchvision needed).

- :func:`resnet`: a torchvision-style ResNet (``BasicBlock``, BatchNorm, a strided stage with a
  1x1 downsample shortcut) on CIFAR-shaped ``3 x 8 x 8`` images;
- :func:`vit`: a Vision Transformer (patch embedding, cls token, learned positions,
  ``nn.TransformerEncoder``, LayerNorm, linear head) on the same images;
- :func:`causal_lm`: a GPT-style causal language model (token and position embeddings, a
  pre-LN block with causal ``F.scaled_dot_product_attention``, tied output head) on padded
  sequences (targets ``-100`` at padding);
- :func:`hf_gpt2`: a Hugging Face ``GPT2LMHeadModel`` built from a tiny ``GPT2Config``
  (needs ``transformers``).

Each model comes with deterministic data (``*_data``) and is small enough for a dense float64
Hessian reference (a few hundred parameters). Named by the CLI tests as
``tests.arch_models:resnet`` and ``tests.arch_models:image_data``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLASSES = 4
IMAGE = 8  # 3 x 8 x 8 images
VOCAB = 11
SEQ = 6
PAD = 0
IGNORE = -100


# ------------------------------------------------------------------------------------------------
# ResNet (torchvision's BasicBlock layout)
# ------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: conv-BN-ReLU-conv-BN plus the (downsampled) input, ReLU."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A CIFAR-style ResNet: 3x3 stem, one block per stage, global average pool, linear head."""

    def __init__(self, widths: tuple[int, ...] = (2, 4), num_classes: int = CLASSES):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        inplanes = widths[0]
        for i, planes in enumerate(widths):
            stride = 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False),
                                     nn.BatchNorm2d(planes))
            layers.append(BasicBlock(inplanes, planes, stride, down))
            inplanes = planes
        self.layers = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet() -> nn.Module:
    """The tiny ResNet with BatchNorm statistics of :func:`image_data` (eval mode is meaningful)."""
    torch.manual_seed(0)
    net = ResNet()
    x, _ = image_data()
    net.train()
    with torch.no_grad():  # running statistics of the data, as after training
        for _ in range(3):
            net(x)
    return net.eval()


# ------------------------------------------------------------------------------------------------
# ViT
# ------------------------------------------------------------------------------------------------
class ViT(nn.Module):
    """Patch embedding (strided conv) + cls token + positions + TransformerEncoder + head."""

    def __init__(self, dim: int = 8, heads: int = 2, depth: int = 1, patch: int = 4,
                 num_classes: int = CLASSES):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        n = (IMAGE // patch) ** 2
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(len(t), -1, -1), t], dim=1) + self.pos
        t = self.encoder(t)
        return self.head(self.norm(t[:, 0]))


def vit() -> nn.Module:
    torch.manual_seed(0)
    return ViT().eval()


def image_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` CIFAR-shaped images whose class depends on the mean colour and a spatial pattern."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
    score = x[:, 0].mean((1, 2)) - x[:, 1, :4].mean((1, 2))
    y = torch.bucketize(score, torch.tensor([-0.3, 0.0, 0.3]))
    return x, y


# ------------------------------------------------------------------------------------------------
# GPT-style causal LM on padded sequences
# ------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """Token + position embeddings, pre-LN causal blocks, final LN, head tied to the embedding."""

    def __init__(self, vocab: int = VOCAB, dim: int = 8, heads: int = 2, depth: int = 1,
                 max_len: int = SEQ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.Sequential(*[Block(dim, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.ln(self.blocks(self.tok(ids) + self.pos(pos)))
        return h @ self.tok.weight.T  # (batch, time, vocab) logits


def causal_lm() -> nn.Module:
    torch.manual_seed(0)
    return TinyGPT().eval()


def lm_sequences(n: int = 12, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token sequences of lengths 2..SEQ and a 0/1 attention mask.

    Tokens follow a noisy "next = previous + 1 (mod VOCAB - 1)" rule, so the LM can learn.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, SEQ + 1, (n,), generator=g)
    ids = torch.full((n, SEQ), PAD, dtype=torch.long)
    for i, L in enumerate(lengths.tolist()):
        start = int(torch.randint(1, VOCAB, (1,), generator=g))
        seq = [(start - 1 + j) % (VOCAB - 1) + 1 for j in range(L)]
        ids[i, :L] = torch.tensor(seq)
    mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
    return ids, mask


def lm_data(n: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, targets)``: targets are the next token, ``-100`` at padding and the last position."""
    ids, mask = lm_sequences(n)
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    targets[:, :-1][mask[:, 1:] == 0] = IGNORE
    return ids, targets


def hf_batches(sizes: tuple[int, ...] = (5, 3, 4)) -> list[dict[str, torch.Tensor]]:
    """The :func:`lm_sequences` as tokenizer-style batch dicts of uneven sizes and padding:
    ``input_ids``, ``attention_mask`` and ``labels`` (the ids, ``-100`` at padding)."""
    ids, mask = lm_sequences(sum(sizes))
    labels = ids.masked_fill(mask == 0, IGNORE)
    out, i = [], 0
    for n in sizes:
        out.append({"input_ids": ids[i:i + n], "attention_mask": mask[i:i + n],
                    "labels": labels[i:i + n]})
        i += n
    return out


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-padding targets (a user-written LM loss)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE)


# ------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 from a config
# ------------------------------------------------------------------------------------------------
def hf_gpt2(attn_implementation: str = "sdpa") -> nn.Module:
    """A 1-layer ``GPT2LMHeadModel`` with 8-dim embeddings over :data:`VOCAB` tokens."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=8, n_layer=1, n_head=2,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                     eos_token_id=1, pad_token_id=PAD)
    try:
        model = GPT2LMHeadModel(cfg, attn_implementation=attn_implementation)
    except TypeError:  # older transformers: the implementation is a config attribute
        cfg._attn_implementation = attn_implementation
        model = GPT2LMHeadModel(cfg)
    return model.eval()


class LogitsOf(nn.Module):
    """``model(ids).logits``: the user glue a Hugging Face model needs without built-in adapters."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def hf_gpt2_logits() -> nn.Module:
    return LogitsOf(hf_gpt2())


def hf_gpt2_eager_logits() -> nn.Module:
    """The same with ``attn_implementation="eager"`` (matmul + softmax attention)."""
    return LogitsOf(hf_gpt2("eager"))
