"""Tiny attention models and token data shared by the tests (float64 by default).

Small enough for dense float64 Hessians (a few hundred parameters) yet with every attention
implementation users have: ``nn.MultiheadAttention``, ``nn.TransformerEncoder`` / ``Decoder``,
``F.scaled_dot_product_attention`` in user code, and Hugging Face GPT-2 built from a config.
:class:`TinyCausalLM` is deliberately smaller than :class:`landscape.models.GPT` (one head, no
second LayerNorm, a tanh MLP); the reference architectures are in :mod:`landscape.models`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from landscape.models import hf_gpt2 as hf_gpt2_model

VOCAB = 7


class MHAClassifier(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) self-attention, mean-pooled, linear head."""

    def __init__(self, d: int = 4, heads: int = 2, classes: int = 3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h, _ = self.attn(x, x, x, need_weights=False)
        return self.head(h.mean(1))


class EncoderClassifier(nn.Module):
    """``nn.TransformerEncoder`` (batch_first, no dropout) over a sequence, mean-pooled."""

    def __init__(self, d: int = 4, heads: int = 2, ff: int = 6, classes: int = 3, layers: int = 1):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.enc(x).mean(1))


class DecoderClassifier(nn.Module):
    """``nn.TransformerDecoder`` (batch_first, causal self-attention, cross-attention to a memory
    made from the input)."""

    def __init__(self, d: int = 4, heads: int = 2, ff: int = 6, classes: int = 3):
        super().__init__()
        layer = nn.TransformerDecoderLayer(d, heads, ff, dropout=0.0, batch_first=True)
        self.dec = nn.TransformerDecoder(layer, 1)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, dtype=x.dtype)
        return self.head(self.dec(x, x.flip(1), tgt_mask=mask, tgt_is_causal=True).mean(1))


class SDPAClassifier(nn.Module):
    """One attention head written with ``F.scaled_dot_product_attention`` in user code."""

    def __init__(self, d: int = 4, classes: int = 3):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                           is_causal=True)
        return self.head(h.squeeze(1).mean(1))


class TinyCausalLM(nn.Module):
    """A GPT-style causal LM: token + position embeddings, one pre-norm block with
    ``F.scaled_dot_product_attention(is_causal=True)`` and a tanh MLP, tied output head.

    ``forward(input_ids, attention_mask=None, labels=None)`` returns ``(B, T, vocab)`` logits
    (``labels`` is accepted and unused, so batch dicts can be passed whole); with right
    padding and causal attention the logits of real tokens do not depend on the padding.
    """

    def __init__(self, vocab: int = VOCAB, d: int = 4, max_len: int = 8):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(max_len, d)
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))

    def forward(self, input_ids, attention_mask=None, labels=None):
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        q, k, v = self.qkv(self.ln(h)).chunk(3, dim=-1)
        a = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                           is_causal=True).squeeze(1)
        h = h + self.proj(a)
        h = h + self.mlp(h)
        return h @ self.tok.weight.T / math.sqrt(h.shape[-1])


def lm_model(*, seed: int = 0, dtype: torch.dtype = torch.float64, **kwargs) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(**kwargs).to(dtype).eval()


def sequence_data(n: int = 6, t: int = 5, d: int = 4, classes: int = 3, *, seed: int = 0,
                  dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded ``(X, y)`` pair of ``(n, t, d)`` sequences with class targets."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, d, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)


def token_sequences(lengths=(5, 2, 4, 3, 5, 2), *, vocab: int = VOCAB, seed: int = 0) -> list[torch.Tensor]:
    """Seeded token sequences of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g) for n in lengths]


def pad_batch(seqs: list[torch.Tensor], *, length: int | None = None, pad_id: int = 0) -> dict:
    """A right-padded batch dict ``{"input_ids", "attention_mask", "labels"}`` (labels are the
    input ids with ``-100`` at padding)."""
    length = length or max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = s
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def padded_batches(seqs: list[torch.Tensor], sizes=(2, 3, 1)) -> list[dict]:
    """Consecutive batch dicts of ``sizes`` sequences, each padded to its own longest one."""
    out, start = [], 0
    for s in sizes:
        out.append(pad_batch(seqs[start:start + s]))
        start += s
    return out


def hf_gpt2(attn_implementation: str = "sdpa", *, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A tiny Hugging Face ``GPT2LMHeadModel`` (:func:`landscape.models.hf_gpt2`; needs
    ``transformers``)."""
    torch.manual_seed(seed)
    model = hf_gpt2_model(VOCAB, 8, 4, 1, 2, attn_implementation=attn_implementation)
    return model.to(dtype).eval()
