"""landscape: what people touch (slices, figures, reports, checkpoints, the CLI, the demo).

May import :mod:`analysis` and :mod:`msam`.
"""

from .datasets import Digits, load_digits
from .models import digits_cnn, digits_mlp

__all__ = ["Digits", "load_digits", "digits_cnn", "digits_mlp"]
