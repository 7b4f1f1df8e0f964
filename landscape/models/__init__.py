"""Reference models to try the toolkit on, and deterministic synthetic data for them.

- the bundled digits (8x8 grey images): :func:`digits_cnn`, :func:`digits_mlp`;
- CIFAR-shaped images: :func:`resnet` (CIFAR-style ResNet-10/18/34/50/101/152 with torchvision's
  blocks; ResNet-18 has 11,173,962 parameters) and :func:`vit` (a Vision Transformer);
- language: :func:`gpt` (a GPT-2-style causal LM taking padded batch dicts and ``-100``
  labels) and :func:`hf_gpt2` (a Hugging Face ``GPT2LMHeadModel`` from a config; needs
  ``pip install msam-landscape[huggingface]``);
- data: :func:`image_data`, :func:`lm_sequences`, :func:`lm_data`, :func:`lm_batches`.

No torchvision needed. Every factory checks its arguments (one-line ``TypeError`` /
``ValueError`` naming the value) and documents its parameter count.
"""

from .causal_lm import GPT, IGNORE_INDEX, GPTBlock, gpt
from .digits import digits_cnn, digits_mlp
from .huggingface import hf_gpt2
from .residual import RESNET_DEPTHS, BasicBlock, Bottleneck, ResNet, resnet
from .synthetic import image_data, lm_batches, lm_data, lm_sequences
from .vision_transformer import ViT, vit

__all__ = [
    # digits
    "digits_cnn", "digits_mlp",
    # images
    "resnet", "ResNet", "BasicBlock", "Bottleneck", "RESNET_DEPTHS", "vit", "ViT",
    # language
    "gpt", "GPT", "GPTBlock", "IGNORE_INDEX", "hf_gpt2",
    # synthetic data
    "image_data", "lm_sequences", "lm_data", "lm_batches",
]
