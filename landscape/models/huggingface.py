"""A Hugging Face ``GPT2LMHeadModel`` built from a config (needs the ``huggingface`` extra).

``transformers`` is imported when :func:`hf_gpt2` is called, never at import time.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._args import choice_arg, divisible, int_arg

EXTRA = "pip install msam-landscape[huggingface]"


def hf_gpt2(vocab_size: int = 256, max_len: int = 256, dim: int = 256, depth: int = 4,
            heads: int = 4, *, attn_implementation: str = "sdpa") -> nn.Module:
    """A randomly initialized ``GPT2LMHeadModel`` of the given size, without dropout, in eval
    mode, with GPT-2's layout; it has the parameter count of :func:`landscape.models.gpt` with
    the same sizes (3,290,624 with the defaults; ``(V + L) d + depth (12 d^2 + 13 d) + 2 d``).

    Token id 0 is the padding id, 1 the begin/end-of-sequence id. The model returns a
    ``ModelOutput`` (``.logits``; ``.loss`` when called with ``labels``), which the analyses read
    as it is (``loss_fn="lm"`` or ``"model_lm"``, dict batches).

    Args:
        vocab_size: number of token ids (>= 2).
        max_len: positions (``n_positions``).
        dim: embedding width (``n_embd``); must be divisible by ``heads``.
        depth: number of blocks (``n_layer``).
        heads: attention heads (``n_head``).
        attn_implementation: ``"sdpa"`` (``F.scaled_dot_product_attention``) or ``"eager"``
            (matmul and softmax).

    Raises:
        ImportError: ``transformers`` is not installed (``pip install msam-landscape[huggingface]``).
        TypeError / ValueError: a size that is not a positive integer, ``dim`` not divisible by
            ``heads``, an unknown ``attn_implementation``.
    """
    vocab_size, max_len = int_arg("vocab_size", vocab_size, 2), int_arg("max_len", max_len, 1)
    dim, heads, depth = int_arg("dim", dim, 1), int_arg("heads", heads, 1), int_arg("depth", depth, 1)
    divisible("dim", dim, "heads", heads)
    choice_arg("attn_implementation", attn_implementation, ("sdpa", "eager"))
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:
        raise ImportError(f"hf_gpt2 needs transformers: {EXTRA}") from err
    cfg: Any = GPT2Config(vocab_size=vocab_size, n_positions=max_len, n_embd=dim, n_layer=depth,
                          n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                          bos_token_id=1, eos_token_id=1, pad_token_id=0)
    try:
        model = GPT2LMHeadModel(cfg, attn_implementation=attn_implementation)
    except TypeError:  # older transformers: the implementation is a config attribute
        cfg._attn_implementation = attn_implementation
        model = GPT2LMHeadModel(cfg)
    return model.eval()
