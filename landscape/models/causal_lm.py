"""A GPT-style causal language model (Radford et al., 2019), GPT-2's layout without dropout.

Token and learned position embeddings, pre-norm blocks (LayerNorm, causal multi-head
self-attention with ``F.scaled_dot_product_attention``, residual; LayerNorm, GELU MLP,
residual), a final LayerNorm and an output head tied to the token embedding. With GPT-2's sizes
(``vocab_size=50257, max_len=1024, dim=768, depth=12, heads=12``) it has GPT-2 small's
124,439,808 parameters. No dropout: the loss is a fixed function of the weights.

Padding: ``forward(input_ids, attention_mask=None, labels=None)`` takes tokenizer-style batch
dicts as they are (``model(**batch)``). Causal attention already keeps real tokens of a
right-padded sequence from seeing the padding; an ``attention_mask`` also masks padded keys and
counts positions from the first real token, so left padding gives the same logits too. With
``labels`` (the input ids, ``-100`` where a token does not count) the model also returns the
mean next-token cross-entropy, as a Hugging Face causal LM does.

Reference: A. Radford, J. Wu, R. Child, D. Luan, D. Amodei, I. Sutskever, "Language Models are
Unsupervised Multitask Learners", 2019.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._args import divisible, float_arg, int_arg

IGNORE_INDEX = -100
"""The label of positions that do not count in the loss (PyTorch's and Hugging Face's)."""


class GPTBlock(nn.Module):
    """A pre-norm transformer block with causal self-attention.

    ``x + proj(attention(ln1(x)))``, then ``+ mlp(ln2(x))`` with a GELU MLP of width ``hidden``;
    ``4 d^2 + 2 d hidden + 9 d + hidden`` parameters (``d = dim``).

    Args:
        dim: embedding width; must be divisible by ``heads``.
        heads: attention heads.
        hidden: hidden width of the MLP.
    """

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: a boolean ``(B, 1, T, T)`` mask of allowed keys (``None``: causal)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if mask is None:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Token + position embeddings, :class:`GPTBlock` s, final LayerNorm, tied output head.

    With ``V = vocab_size``, ``L = max_len``, ``d = dim`` and ``m = int(mlp_ratio d)`` it has
    ``(V + L) d + depth (4 d^2 + 2 d m + 9 d + m) + 2 d`` parameters (the head is the token
    embedding).

    Args:
        vocab_size: number of token ids.
        max_len: longest sequence (positions).
        dim: embedding width; must be divisible by ``heads``.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim`` (GPT-2: 4).

    Raises:
        TypeError / ValueError: a size that is not a positive integer, ``dim`` not divisible by
            ``heads``, ``mlp_ratio`` not positive.
    """

    def __init__(self, vocab_size: int = 256, max_len: int = 256, dim: int = 256, depth: int = 4,
                 heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        vocab_size, max_len = int_arg("vocab_size", vocab_size, 1), int_arg("max_len", max_len, 1)
        dim, heads = int_arg("dim", dim, 1), int_arg("heads", heads, 1)
        divisible("dim", dim, "heads", heads)
        depth = int_arg("depth", depth, 1)
        hidden = max(1, int(float_arg("mlp_ratio", mlp_ratio, 0.0) * dim))
        self.max_len = max_len
        self.tok = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([GPTBlock(dim, heads, hidden) for _ in range(depth)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Next-token logits ``(B, T, vocab_size)`` of ``(B, T)`` token ids.

        Args:
            input_ids: ``(B, T)`` token ids, ``T <= max_len``.
            attention_mask: ``(B, T)``, 1 at real tokens, 0 at padding (``None``: all real).
            labels: ``(B, T)`` labels aligned with ``input_ids`` (shifted here), ``-100`` where
                a target does not count.

        Returns:
            The logits, or with ``labels`` the dict ``{"loss", "logits"}``: ``loss`` is the
            mean cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]`` over the counted
            targets, those not ``-100`` whose position ``t`` is not padding. With right padding
            this is ``loss_fn="lm"``'s loss; with left padding the first real token (predicted
            from padding) is not counted either, so the loss is that of the unpadded sequences
            (Hugging Face models and ``loss_fn="lm"`` count it).

        Raises:
            ValueError: ``input_ids`` longer than ``max_len`` or not ``(B, T)``.
        """
        if input_ids.dim() != 2 or input_ids.shape[1] > self.max_len:
            raise ValueError(f"input_ids must be (batch, time) with time <= max_len="
                             f"{self.max_len}, got shape {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        mask = None
        if attention_mask is None:
            pos = self.pos(torch.arange(t, device=input_ids.device))
        else:
            real = attention_mask.bool()
            pos = self.pos((real.long().cumsum(1) - 1).clamp(min=0))
            eye = torch.eye(t, dtype=torch.bool, device=input_ids.device)
            causal = torch.ones(t, t, dtype=torch.bool, device=input_ids.device).tril()
            mask = ((causal & real[:, None, None, :]) | eye)  # a query always sees itself
        h = self.tok(input_ids) + pos
        for block in self.blocks:
            h = block(h, mask)
        logits = self.ln(h) @ self.tok.weight.T
        if labels is None:
            return logits
        targets = labels[:, 1:]
        if attention_mask is not None:  # a padded position predicts nothing (left padding)
            targets = targets.masked_fill(attention_mask[:, :-1] == 0, IGNORE_INDEX)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                               targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return {"loss": loss, "logits": logits}


def gpt(vocab_size: int = 256, max_len: int = 256, dim: int = 256, depth: int = 4,
        heads: int = 4, *, mlp_ratio: float = 4.0) -> GPT:
    """A GPT-style causal LM; the defaults (byte-level vocabulary, 256 positions, 4 blocks of
    width 256 with 4 heads) have 3,290,624 parameters.

    ``gpt(50257, 1024, 768, 12, 12)`` is GPT-2 small's shape (124,439,808 parameters, build it
    on ``torch.device("meta")`` to count without allocating); see :class:`GPT` for the formula
    and the ``forward`` signature (padding mask, ``-100`` labels).

    Args:
        vocab_size: number of token ids.
        max_len: longest sequence.
        dim: embedding width; must be divisible by ``heads``.
        depth: number of blocks.
        heads: attention heads per block.
        mlp_ratio: hidden width of the MLP as a multiple of ``dim``.

    Raises:
        TypeError / ValueError: as :class:`GPT`.

    Example:
        >>> lm = gpt(vocab_size=11, max_len=6, dim=8, depth=1, heads=2).eval()
        >>> lm(torch.tensor([[1, 2, 3]])).shape
        torch.Size([1, 3, 11])
    """
    return GPT(vocab_size, max_len, dim, depth, heads, mlp_ratio)
