"""Built-in losses, output adapters and exact weighting by loss terms (tokens for an LM)."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader

from analysis import CausalLMLoss, GGNOperator, HessianOperator, evaluate
from analysis.evaluation import resolve_loss
from analysis.losses import ModelLoss, logits_of, loss_terms
from analysis.reference import dense_ggn, dense_hessian
from tests import lm_models as lm

LENGTHS = (3, 2, 4, 3, 5, 2)   # batches (2, 3, 1) are padded to 3, 5 and 2 tokens
SIZES = (2, 3, 1)


def _hand_lm_loss(logits, seqs):
    """Mean over all next-token targets of -log softmax, written as a loop over tokens."""
    terms = []
    for i, s in enumerate(seqs):
        for t in range(len(s) - 1):
            terms.append(-torch.log_softmax(logits[i, t], dim=-1)[s[t + 1]])
    return torch.stack(terms).mean()


# -- adapters and losses -------------------------------------------------------------------------
def test_logits_of_every_output_form():
    z = torch.randn(2, 3)
    assert logits_of(z) is z
    assert logits_of({"logits": z, "loss": 1}) is z
    assert logits_of(types.SimpleNamespace(logits=z)) is z
    assert logits_of((z, torch.zeros(1))) is z
    with pytest.raises(TypeError, match="cannot take the logits of a model output of type str"):
        logits_of("nope")


def test_cross_entropy_and_mse_accept_output_objects():
    z, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    ce = resolve_loss("cross_entropy")
    assert ce(types.SimpleNamespace(logits=z), y) == F.cross_entropy(z, y)
    assert ce({"logits": z}, y) == F.cross_entropy(z, y)
    assert resolve_loss(None)((z,), y) == F.cross_entropy(z, y)
    t = torch.randn(4, 3)
    assert resolve_loss("mse")({"logits": z}, t) == F.mse_loss(z, t)


def test_causal_lm_loss_matches_a_hand_written_token_loop():
    seqs = lm.token_sequences(LENGTHS)
    batch = lm.pad_batch(seqs)
    logits = torch.randn(*batch["input_ids"].shape, lm.VOCAB, dtype=torch.float64)
    want = _hand_lm_loss(logits, seqs)
    loss = CausalLMLoss()
    torch.testing.assert_close(loss(logits, batch["labels"]), want, rtol=1e-12, atol=0)
    # the batch dict as target: labels, or input_ids masked by the attention mask
    torch.testing.assert_close(loss(logits, batch), want, rtol=1e-12, atol=0)
    no_labels = {k: batch[k] for k in ("input_ids", "attention_mask")}
    torch.testing.assert_close(loss({"logits": logits}, no_labels), want, rtol=1e-12, atol=0)
    n = sum(len(s) - 1 for s in seqs)
    assert loss.num_terms(None, batch) == loss.num_terms(None, batch["labels"]) == n
    assert loss_terms(loss, None, batch, 6) == n and loss_terms(F.cross_entropy, None, batch, 6) == 6
    assert resolve_loss("lm").num_terms(None, no_labels) == n
    assert isinstance(resolve_loss("causal_lm"), CausalLMLoss)


def test_unshifted_token_loss_and_errors():
    logits = torch.randn(1, 3, 4)
    labels = torch.tensor([[1, -100, 3]])
    want = F.cross_entropy(logits[0, [0, 2]], torch.tensor([1, 3]))
    torch.testing.assert_close(CausalLMLoss(shift=False)(logits, labels), want)
    assert CausalLMLoss(shift=False).num_terms(None, labels) == 2
    with pytest.raises(ValueError, match=r"\(B, T, V\)"):
        CausalLMLoss()(torch.randn(2, 3), labels)
    with pytest.raises(ValueError, match="do not match labels"):
        CausalLMLoss()(torch.randn(1, 4, 4), labels)
    with pytest.raises(ValueError, match="needs 'labels' or 'input_ids'"):
        CausalLMLoss().num_terms(None, {"mask": labels})
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        CausalLMLoss(ignore_index=True)
    with pytest.raises(ValueError, match="terms must be one of"):
        ModelLoss("words")


def test_model_loss_reads_output_loss():
    out = types.SimpleNamespace(loss=torch.tensor(2.5), logits=None)
    assert ModelLoss()(out, None) == 2.5
    assert ModelLoss()({"loss": torch.tensor(1.0)}, None) == 1.0
    with pytest.raises(TypeError, match="has no loss"):
        ModelLoss()(types.SimpleNamespace(logits=torch.zeros(1)), None)
    batch = lm.pad_batch(lm.token_sequences(LENGTHS))
    assert ModelLoss().num_terms(batch, batch) == 6
    assert ModelLoss("causal_lm").num_terms(batch, batch) == sum(n - 1 for n in LENGTHS)
    assert ModelLoss("tokens").num_terms(batch, batch) == sum(LENGTHS)


def test_hf_model_loss_equals_lm_loss():
    pytest.importorskip("transformers")
    model = lm.hf_gpt2("sdpa")
    batches = lm.padded_batches(lm.token_sequences(LENGTHS), SIZES)
    a = evaluate(model, "model_lm", batches).loss
    b = evaluate(model, "lm", batches).loss
    assert a == pytest.approx(b, rel=1e-6)  # HF computes its loss in float32


# -- exact weighting by tokens -------------------------------------------------------------------
def _big_batch_reference(model, seqs):
    """Loss, gradient and Hessian of the concatenated single batch holding every token."""
    big = lm.pad_batch(seqs)
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    w0 = torch.cat([p.detach().reshape(-1) for p in params.values()])

    def f(w):
        state = {n: c.reshape(s) for n, c, s in zip(names, torch.split(w, sizes), shapes)}
        logits = functional_call(model, state, args=(), kwargs={"input_ids": big["input_ids"]})
        return _hand_lm_loss(logits, seqs)

    w = w0.clone().requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernel has no double backward
        loss = f(w)
        (g,) = torch.autograd.grad(loss, w)
        H = torch.autograd.functional.hessian(f, w0)
    return loss.item(), g, 0.5 * (H + H.T)


@pytest.fixture(scope="module")
def reference():
    model = lm.lm_model()
    seqs = lm.token_sequences(LENGTHS)
    return model, seqs, _big_batch_reference(model, seqs)


def _inputs_only(batches):
    return [({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"])
            for b in batches]


@pytest.mark.parametrize("form, method", [
    (form, method) for form in ("dicts", "pairs", "loader")
    for method in ("forward-over-reverse", "double-backward", "cached-graph")
    if not (form == "loader" and method == "cached-graph")  # cached-graph needs in-memory data
])
def test_token_weighted_operator_equals_one_big_batch(reference, form, method):
    model, seqs, (loss0, g0, H0) = reference
    batches = lm.padded_batches(seqs, SIZES)
    if form == "pairs":
        data = _inputs_only(batches)
    elif form == "loader":
        data = DataLoader(batches, batch_size=None)  # yields the batch dicts
    else:
        data = batches
    op = HessianOperator(model, "lm", data, method=method)
    V = torch.randn(op.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(op @ V, H0 @ V, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(op.gradient(), g0, rtol=1e-8, atol=1e-12)
    assert op.num_terms == sum(n - 1 for n in LENGTHS) and op.num_samples == len(LENGTHS)
    assert evaluate(model, "lm", data).loss == pytest.approx(loss0, rel=1e-10)


def test_token_weighted_dense_references_and_ggn(reference):
    model, seqs, (_, _, H0) = reference
    batches = lm.padded_batches(seqs, SIZES)
    torch.testing.assert_close(dense_hessian(model, "lm", batches), H0, rtol=1e-8, atol=1e-12)
    G_big = dense_ggn(model, "lm", [lm.pad_batch(seqs)])
    torch.testing.assert_close(dense_ggn(model, "lm", batches), G_big, rtol=1e-8, atol=1e-12)
    op = GGNOperator(model, "lm", batches)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(op @ V, G_big @ V, rtol=1e-8, atol=1e-12)


def test_sample_weighting_would_differ(reference):
    """The test above can fail: weighting the same batches by sequences gives another Hessian."""
    model, seqs, (loss0, _, H0) = reference
    batches = lm.padded_batches(seqs, SIZES)
    lm_loss = CausalLMLoss()
    op = HessianOperator(model, lambda out, y: lm_loss(out, y), batches)  # no num_terms
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert not torch.allclose(op @ V, H0 @ V, rtol=1e-3)
    assert evaluate(model, lambda out, y: lm_loss(out, y), batches).loss != pytest.approx(loss0)


def test_dict_data_split_by_batch_size_matches(reference):
    model, seqs, (loss0, g0, H0) = reference
    big = lm.pad_batch(seqs)  # a tokenizer-style dict of tensors, split into batches of 4 and 2
    op = HessianOperator(model, "lm", big, batch_size=4)
    V = torch.randn(op.shape[0], 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(op @ V, H0 @ V, rtol=1e-8, atol=1e-12)
    assert evaluate(model, "lm", big, batch_size=4).loss == pytest.approx(loss0, rel=1e-10)


def test_ggn_refuses_the_models_own_loss(reference):
    model, seqs, _ = reference
    with pytest.raises(TypeError, match="GGNOperator needs a loss of the model outputs"):
        GGNOperator(model, "model_lm", lm.padded_batches(seqs, SIZES))


def test_bad_num_terms_is_refused():
    class Bad:
        def __call__(self, out, y):
            return out.sum()

        def num_terms(self, inputs, targets):
            return -1

    with pytest.raises(ValueError, match="num_terms returned -1"):
        loss_terms(Bad(), None, None, 3)


def test_cli_accepts_the_new_loss_names():
    from landscape.cli.specs import resolve_loss

    assert isinstance(resolve_loss("lm"), CausalLMLoss)
    assert isinstance(resolve_loss("model"), ModelLoss)
    assert resolve_loss("model_lm").terms == "causal_lm"


@pytest.mark.parametrize("form", ["dicts", "loader"])
@pytest.mark.parametrize("method", ["forward-over-reverse", "double-backward"])
def test_batched_products_are_token_weighted(reference, form, method):
    """matmat's one-pass blocks use the same term weighting (and attention backend) as matvec."""
    model, seqs, (_, _, H0) = reference
    batches = lm.padded_batches(seqs, SIZES)
    data = DataLoader(batches, batch_size=None) if form == "loader" else batches
    op = HessianOperator(model, "lm", data, method=method)
    V = torch.randn(op.shape[0], 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(op.matmat(V, block_size=4), H0 @ V, rtol=1e-8, atol=1e-12)
    assert op.method == method and op.batched_fallback_reason is None
