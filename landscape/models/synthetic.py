"""Deterministic synthetic data for the reference models: images with learnable classes and
token sequences with a learnable next-token rule, padded like a tokenizer pads them.

Nothing is downloaded; the same arguments always give the same tensors (own
``torch.Generator``, the global RNG is not touched).
"""

from __future__ import annotations

import torch

from ._args import int_arg, ints_arg
from .causal_lm import IGNORE_INDEX


def image_data(n: int = 256, *, num_classes: int = 10, image_size: int = 32, channels: int = 3,
               seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` standard-normal CIFAR-shaped images whose class depends on a colour and a
    spatial pattern; the defaults fit :func:`~landscape.models.resnet` and
    :func:`~landscape.models.vit` (256 images 3 x 32 x 32, 10 classes).

    The score ``s = mean(x[0]) - mean(x[1, :S/2])`` (channel 0's mean minus the mean of the top
    half of channel 1, or of channel 0 for grey images) is cut at ``num_classes - 1`` equally
    spaced thresholds in ``[-2.4 / S, 2.4 / S]`` (``S = image_size``; about +-1.4 standard
    deviations of ``s``), so the classes are learnable and the outer ones rarer.

    Args:
        n: number of images.
        num_classes: number of classes (>= 2).
        image_size: height and width ``S``.
        channels: image channels.
        seed: seed of the generator.

    Returns:
        ``(x, y)``: float32 images ``(n, channels, S, S)`` and int64 labels ``(n,)``.

    Raises:
        TypeError / ValueError: an argument that is not an integer in range.
    """
    n, seed = int_arg("n", n, 1), int_arg("seed", seed, 0)
    num_classes = int_arg("num_classes", num_classes, 2)
    size, channels = int_arg("image_size", image_size, 2), int_arg("channels", channels, 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, size, size, generator=g)
    score = x[:, 0].mean((1, 2)) - x[:, min(1, channels - 1), : size // 2].mean((1, 2))
    edge = 2.4 / size
    cuts = edge * torch.linspace(-1, 1, num_classes - 1) if num_classes > 2 else torch.zeros(1)
    return x, torch.bucketize(score, cuts)


def lm_sequences(n: int = 64, *, vocab_size: int = 256, max_len: int = 64, min_len: int = 2,
                 pad_id: int = 0, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token sequences of random lengths ``min_len .. max_len`` and their mask.

    Tokens ``1 .. vocab_size - 1`` follow the rule "next = previous + 1, wrapping around"
    from a random start, so a causal LM can learn them; ``pad_id`` fills the rest. The
    defaults fit :func:`~landscape.models.gpt` (vocabulary 256, up to 256 positions).

    Args:
        n: number of sequences.
        vocab_size: token ids are ``0 .. vocab_size - 1`` (>= 2).
        max_len: padded length.
        min_len: shortest sequence (1 .. ``max_len``).
        pad_id: the padding id.
        seed: seed of the generator.

    Returns:
        ``(ids, attention_mask)``: int64 ``(n, max_len)`` tensors, the mask 1 at real tokens.

    Raises:
        TypeError / ValueError: an argument that is not an integer in range.
    """
    n, seed = int_arg("n", n, 1), int_arg("seed", seed, 0)
    vocab = int_arg("vocab_size", vocab_size, 2)
    max_len = int_arg("max_len", max_len, 1)
    min_len = int_arg("min_len", min_len, 1)
    if min_len > max_len:
        raise ValueError(f"min_len={min_len} must be <= max_len={max_len}")
    pad_id = int_arg("pad_id", pad_id, 0)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=g)
    ids = torch.full((n, max_len), pad_id, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        start = int(torch.randint(1, vocab, (1,), generator=g))
        ids[i, :length] = torch.tensor([(start - 1 + j) % (vocab - 1) + 1 for j in range(length)])
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return ids, mask


def lm_data(n: int = 64, **kwargs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, targets)`` of :func:`lm_sequences` for a loss on pre-shifted targets: the target
    at ``t`` is the token at ``t + 1``, ``-100`` at padding and at the last position.

    Args:
        n: number of sequences.
        **kwargs: passed to :func:`lm_sequences`.
    """
    ids, mask = lm_sequences(n, **kwargs)
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:]
    targets[:, :-1][mask[:, 1:] == 0] = IGNORE_INDEX
    return ids, targets


def lm_batches(sizes: tuple[int, ...] = (16, 16, 16, 16), **kwargs: int) -> list[dict[str, torch.Tensor]]:
    """:func:`lm_sequences` as tokenizer-style batch dicts of the given (uneven) sizes:
    ``input_ids``, ``attention_mask`` and ``labels`` (the ids, ``-100`` at padding), ready for
    ``loss_fn="lm"`` or ``model(**batch)``.

    Args:
        sizes: sequences per batch.
        **kwargs: passed to :func:`lm_sequences`.
    """
    sizes = ints_arg("sizes", sizes, 1)
    ids, mask = lm_sequences(sum(sizes), **kwargs)
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    out, i = [], 0
    for n in sizes:
        out.append({"input_ids": ids[i:i + n], "attention_mask": mask[i:i + n],
                    "labels": labels[i:i + n]})
        i += n
    return out
