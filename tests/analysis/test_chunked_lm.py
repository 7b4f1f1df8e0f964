"""The fused, token-chunked output layer + cross-entropy (:mod:`analysis.chunked_lm`).

References: ``F.cross_entropy`` on full logits (values and gradients, float64), the Hugging Face
model's gradient under ``"lm"``, and the dense float64 Hessian of the unwrapped model (for the
finite-difference products, the one product method a first-order loss allows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from analysis import HessianOperator
from analysis.chunked_lm import ChunkedCausalLM, linear_cross_entropy
from analysis.reference import dense_hessian
from tests.lm_models import VOCAB, hf_gpt2, padded_batches, token_sequences

pytest.importorskip("transformers")


def _inputs(bias: bool):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    y = torch.randint(0, 9, (11,), generator=g)
    y[[3, 4, 5]] = -100  # with chunk_tokens=3 the second chunk has no counted position
    return h, w, b, y


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_values_and_gradients_equal_full_logits(bias, chunk):
    h, w, b, y = _inputs(bias)
    leaves = [t for t in (h, w, b) if t is not None]
    ref = F.cross_entropy(F.linear(h, w, b), y, ignore_index=-100, reduction="sum")
    got = linear_cross_entropy(h, w, y, bias=b, chunk_tokens=chunk)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    for a, r in zip(torch.autograd.grad(3.0 * got, leaves), torch.autograd.grad(3.0 * ref, leaves)):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-13)


def test_second_derivatives_raise_instead_of_missing_the_softmax_curvature():
    h, w, b, y = _inputs(True)
    (gh,) = torch.autograd.grad(linear_cross_entropy(h, w, y, bias=b), [h], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once.*finite-difference"):
        torch.autograd.grad(gh.sum(), [h])
    with pytest.raises(ValueError, match="chunk_tokens must be a positive integer, got 0"):
        linear_cross_entropy(h, w, y, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"labels must be \(11,\)"):
        linear_cross_entropy(h, w, y[:3])


def _saved_shapes(fn):
    dims = []

    def pack(t):
        dims.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return dims


def test_the_wrapped_lm_has_the_models_loss_gradient_and_hessian_products():
    model = hf_gpt2()
    data = padded_batches(token_sequences())
    wrapped = ChunkedCausalLM(model, chunk_tokens=5)
    H = HessianOperator(wrapped, "model_lm", data, method="finite-difference")
    R = HessianOperator(model, "lm", data, method="double-backward")
    torch.testing.assert_close(H.gradient(), R.gradient(), rtol=1e-10, atol=1e-13)
    A = dense_hessian(model, "lm", data)
    v = torch.randn(A.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(H @ v, A @ v, rtol=1e-6, atol=1e-8)
    sliced = HessianOperator(wrapped, "model_lm", data, method="finite-difference",
                             microbatch_size=1)
    torch.testing.assert_close(sliced @ v, H @ v, rtol=1e-7, atol=1e-9)
    # no tensor of vocabulary width is kept for the backward pass (the plain model keeps logits)
    batch = data[0]
    wide = [s for s in _saved_shapes(lambda: wrapped(**batch).loss) if s and s[-1] == VOCAB]
    assert wide == []
    assert any(s and s[-1] == VOCAB for s in _saved_shapes(lambda: model(**batch).logits))
    for method in ("double-backward", "auto"):
        with pytest.raises(RuntimeError, match="differentiable once"):
            HessianOperator(wrapped, "model_lm", data, method=method) @ v
    with pytest.raises(TypeError, match="needs a causal LM with base_model"):
        ChunkedCausalLM(torch.nn.Linear(2, 2))
