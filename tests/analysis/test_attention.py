"""Second derivatives through attention: every attention implementation vs a dense float64 Hessian.

The reference is built here independently of the library: ``torch.autograd.functional.hessian``
over ``torch.func.functional_call`` of a float64 model, with the math SDPA backend selected by
hand (``sdpa_kernel(SDPBackend.MATH)``) and the MHA fast path off.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import analysis.operators.empirical_risk as hessian_module  # where the products enter the context
from analysis import (
    CausalLMLoss,
    GGNOperator,
    HessianOperator,
    directional_curvature,
    hessian_trace,
    second_order_attention,
    top_eigenpairs,
)
from analysis.reference import dense_ggn, dense_hessian
from tests import lm_models as lm

CLASSIFIERS = {
    "mha": lm.MHAClassifier,
    "encoder": lm.EncoderClassifier,
    "decoder": lm.DecoderClassifier,
    "sdpa": lm.SDPAClassifier,
}


def _classifier(name):
    torch.manual_seed(0)
    return CLASSIFIERS[name]().double().eval()


@contextlib.contextmanager
def _math_attention():
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)


def _dense_reference(model, loss, x, y):
    """Hessian of loss(model_w(x), y) in the flat trainable parameters, by autograd.functional."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p.detach() for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    def f(w):
        chunks = torch.split(w, sizes)
        state = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        out = functional_call(model, state, args=(), kwargs=x) if isinstance(x, dict) else \
            functional_call(model, state, (x,))
        return loss(out, y)

    w0 = torch.cat([p.reshape(-1) for p in params])
    with _math_attention():
        H = torch.autograd.functional.hessian(f, w0)
    return 0.5 * (H + H.T)


def _vectors(n, k=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward", "cached-graph"])
def test_hvp_through_attention_matches_dense(name, method):
    model = _classifier(name)
    x, y = lm.sequence_data()
    H_ref = _dense_reference(model, F.cross_entropy, x, y)
    op = HessianOperator(model, "cross_entropy", (x, y), method=method)
    V = _vectors(op.shape[0])
    torch.testing.assert_close(op @ V, H_ref @ V, rtol=1e-9, atol=1e-11)
    assert op.method == method and op.fallback_reason is None  # forward mode worked too
    assert torch.backends.mha.get_fastpath_enabled()  # restored for first-order work


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_dense_references_and_ggn_through_attention(name):
    model = _classifier(name)
    x, y = lm.sequence_data()
    H_ref = _dense_reference(model, F.cross_entropy, x, y)
    torch.testing.assert_close(dense_hessian(model, "cross_entropy", (x, y)), H_ref,
                               rtol=1e-9, atol=1e-11)
    G = GGNOperator(model, "cross_entropy", (x, y))
    V = _vectors(G.shape[0])
    torch.testing.assert_close(G @ V, dense_ggn(model, "cross_entropy", (x, y)) @ V,
                               rtol=1e-9, atol=1e-11)
    # the eval-mode fused fast path (torch._transformer_encoder_layer_fwd) is off in the jvp
    assert G.method == "forward-over-reverse", G.fallback_reason


def test_top_eigenpairs_and_curvature_through_encoder():
    model = _classifier("encoder")
    x, y = lm.sequence_data()
    H_ref = _dense_reference(model, F.cross_entropy, x, y)
    res = top_eigenpairs(model, "cross_entropy", (x, y), k=2, tol=1e-8)
    top = torch.linalg.eigvalsh(H_ref).flip(0)[:2]
    torch.testing.assert_close(torch.as_tensor(res.eigenvalues, dtype=torch.float64), top,
                               rtol=1e-6, atol=1e-9)
    d = _vectors(H_ref.shape[0], 1)[:, 0]
    op = HessianOperator(model, "cross_entropy", (x, y), batch_size=4)
    assert directional_curvature(op, d) == pytest.approx(float(d @ H_ref @ d / (d @ d)), rel=1e-9)


def test_hutchpp_trace_through_user_sdpa_is_exact_with_a_full_sketch():
    model = _classifier("sdpa")
    x, y = lm.sequence_data()
    H_ref = _dense_reference(model, F.cross_entropy, x, y)
    n = H_ref.shape[0]
    res = hessian_trace(model, "cross_entropy", (x, y), num_matvecs=3 * n)  # Q spans R^n
    assert res.estimate == pytest.approx(float(torch.trace(H_ref)), rel=1e-8)


def test_without_second_order_attention_the_fused_kernel_fails(monkeypatch):
    """Regression: before the fix, products through SDPA failed on CPU (flash kernel)."""
    monkeypatch.setattr(hessian_module, "second_order_attention", contextlib.nullcontext)
    model = _classifier("sdpa")
    x, y = lm.sequence_data()
    op = HessianOperator(model, "cross_entropy", (x, y), method="double-backward")
    try:
        op @ torch.zeros(op.shape[0], dtype=torch.float64)
    except RuntimeError as err:
        assert "not implemented" in str(err)
    else:
        pytest.skip("this torch build differentiates the default SDPA kernel twice")


def test_context_restores_state_and_leaves_first_order_results_alone():
    model = _classifier("encoder")
    x, _ = lm.sequence_data()
    with torch.no_grad():
        fast = model(x)
        with second_order_attention():
            assert not torch.backends.mha.get_fastpath_enabled()
            with second_order_attention():  # nested
                pass
            assert not torch.backends.mha.get_fastpath_enabled()
            slow = model(x)
    assert torch.backends.mha.get_fastpath_enabled()
    torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hf_gpt2_hvp_matches_dense(impl):
    pytest.importorskip("transformers")
    model = lm.hf_gpt2(impl)
    assert model.config._attn_implementation == impl
    batch = lm.pad_batch(lm.token_sequences()[:3])
    loss = CausalLMLoss()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    H_ref = _dense_reference(model, loss, inputs, batch)
    op = HessianOperator(model, "lm", [batch], method="forward-over-reverse")
    V = _vectors(op.shape[0], 2)
    torch.testing.assert_close(op @ V, H_ref @ V, rtol=1e-8, atol=1e-10)
    # the model's own loss (labels in the batch dict) gives the same Hessian, up to the float32
    # cast that transformers' ForCausalLMLoss applies to the logits (logits.float())
    own = HessianOperator(model, "model_lm", [batch], method="double-backward")
    torch.testing.assert_close(own @ V, H_ref @ V, rtol=1e-4, atol=1e-5)
    res = top_eigenpairs(op, k=1, tol=1e-6)
    assert res.eigenvalues[0] == pytest.approx(float(torch.linalg.eigvalsh(H_ref)[-1]), rel=1e-5)
