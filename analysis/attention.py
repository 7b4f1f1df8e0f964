"""Attention kernels that can be differentiated twice, selected inside every curvature product.

PyTorch's fused attention kernels (the flash kernel on CPU; flash, memory-efficient and cuDNN
attention on CUDA) have no double backward and no forward-mode derivative, so a Hessian-vector
product through ``F.scaled_dot_product_attention`` fails with ``derivative for
aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented``. The same holds
for the fused "fast path" of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` in eval
mode without gradients (``torch._native_multi_head_attention``,
``torch._transformer_encoder_layer_fwd``).

:func:`second_order_attention` selects the math SDPA backend (attention written as
``softmax(Q K^T / sqrt(d) + mask) V`` in ordinary differentiable operations) and turns the MHA
fast path off. Every curvature product of the toolkit (:class:`~analysis.HessianOperator`,
:class:`~analysis.GGNOperator`, their gradients, :func:`~analysis.reference.dense_hessian`
and :func:`~analysis.reference.dense_ggn`, and everything built on them: Lanczos, trace,
density, sharpness and probes) runs inside it, so ``nn.MultiheadAttention``,
``nn.TransformerEncoder/Decoder``, ``F.scaled_dot_product_attention`` in user code and Hugging
Face models with ``attn_implementation="sdpa"`` (which call ``F.scaled_dot_product_attention``) or
``"eager"`` need nothing from the user. First-order work (evaluation, slices, training) is not
affected and keeps the fast kernels.

Cost: the math backend materializes the ``(batch, heads, T, T)`` attention matrix, so it needs
``O(T^2)`` memory per head and layer (the fused kernels need ``O(T)``) and is slower, typically by
a factor 1.5-3 on long sequences; for the short sequences of curvature analysis the difference
is small compared with the two to three passes each product costs anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def second_order_attention() -> Iterator[None]:
    """Context manager: attention that supports double backward and forward-mode AD.

    Inside it ``F.scaled_dot_product_attention`` uses ``SDPBackend.MATH`` (via
    ``torch.nn.attention.sdpa_kernel``) and the fused fast path of ``nn.MultiheadAttention`` and
    ``nn.TransformerEncoderLayer`` is disabled (``torch.backends.mha.set_fastpath_enabled``); both
    are restored on exit. Nested use is fine. Costs ``O(T^2)`` memory per attention head (see the
    module docstring).

    Example:
        >>> import torch
        >>> from analysis import second_order_attention
        >>> q = torch.randn(1, 2, 4, 3, requires_grad=True)
        >>> with second_order_attention():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        ...     (g,) = torch.autograd.grad(out.sum(), q, create_graph=True)
        ...     (h,) = torch.autograd.grad(g.sum(), q)     # double backward works
        >>> h.shape
        torch.Size([1, 2, 4, 3])
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
