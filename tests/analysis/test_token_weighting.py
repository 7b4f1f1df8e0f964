"""Padded language-model batches are weighted by their counted tokens everywhere: m-sharpness
means over batches, the probes' losses, and accuracy counted per next token (hand counts and
the term-weighted full-data loss of :func:`analysis.evaluate` are the references)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from analysis import (
    CausalLMLoss,
    MechanismProbe,
    ParameterSpace,
    evaluate,
    pac_bayes_flatness,
    sharpness,
)
from analysis.evaluation import accuracy_unit, correct_count
from analysis.losses import ModelLoss
from tests import lm_models as lm
from tests.models import classification_data, mlp

LENGTHS = (5, 5, 2, 2, 4, 3)   # batches of 2 sequences hold 8, 2 and 5 next-token targets
SIZES = (2, 2, 2)
TERMS = (8, 2, 5)


def _batches(seqs=None):
    return lm.padded_batches(lm.token_sequences(LENGTHS) if seqs is None else seqs, SIZES)


def _hand_terms(batch) -> int:
    """Next-token targets of a right-padded batch dict: positions 1.. whose label counts."""
    labels = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    return sum(1 for row in labels.tolist() for v in row[1:] if v != -100)


def _hand_accuracy(model, batches) -> tuple[int, int]:
    """(correct, counted) next-token predictions, one position at a time."""
    correct = total = 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"])
            labels = b["labels"].masked_fill(b["attention_mask"] == 0, -100)
            for i in range(labels.shape[0]):
                for t in range(labels.shape[1] - 1):
                    target = int(labels[i, t + 1])
                    if target == -100:
                        continue
                    total += 1
                    correct += int(int(logits[i, t].argmax()) == target)
    return correct, total


@pytest.fixture(scope="module")
def trained():
    """The tiny causal LM fitted to the padded batches (token accuracy well above chance)."""
    model = lm.lm_model()
    data = _batches()
    loss = CausalLMLoss()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(100):
        opt.zero_grad()
        total = sum(loss(model(**b), b) * loss.num_terms(None, b) for b in data) / sum(TERMS)
        total.backward()
        opt.step()
    return model.eval(), data


# -- token accuracy ------------------------------------------------------------------------------
def test_token_accuracy_is_a_hand_count_of_next_token_predictions(trained):
    model, data = trained
    # a prompt position masked with -100 inside a real sequence is not counted either
    data = [dict(b) for b in data]
    data[0]["labels"] = data[0]["labels"].clone()
    data[0]["labels"][0, 2] = -100
    correct, total = _hand_accuracy(model, data)
    assert total == sum(TERMS) - 1 and 0 < correct < total
    r = evaluate(model, "lm", data)
    assert r.accuracy == correct / total
    assert r.num_terms == total and r.num_samples == 6 and r.accuracy_unit == "token"
    # pairs (inputs without labels, label tensor) count the same positions
    pairs = [({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"])
             for b in data]
    assert evaluate(model, "lm", pairs).accuracy == correct / total
    assert r.to_dict()["accuracy_unit"] == "token"


def test_token_accuracy_counts_batches_by_their_tokens(trained):
    # the data set's accuracy is not the mean of the batches' accuracies when they differ in tokens
    model, data = trained
    per_batch = [_hand_accuracy(model, [b]) for b in data]
    assert [t for _, t in per_batch] == list(TERMS)
    want = sum(c for c, _ in per_batch) / sum(TERMS)
    assert evaluate(model, "lm", data).accuracy == want
    assert want != pytest.approx(sum(c / t for c, t in per_batch) / 3, abs=1e-3)


def test_correct_count_of_the_lm_losses_and_of_classification():
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = logits[0, 1, 0] = logits[0, 2, 1] = 1.0   # predicts 2, 0, 1 for t = 1, 2, 3
    labels = torch.tensor([[0, 2, 1, -100]])
    assert int(correct_count(logits, labels, CausalLMLoss())) == 1   # t=1 right, t=2 wrong, t=3 ignored
    assert int(CausalLMLoss(shift=False).num_correct(logits, torch.tensor([[2, 0, 1, -100]]))) == 3
    out = type("Out", (), {"logits": logits, "loss": torch.tensor(0.0)})()
    assert int(correct_count(out, {"input_ids": labels.clamp(min=0), "labels": labels},
                             ModelLoss("causal_lm"))) == 1
    assert correct_count(out, labels, ModelLoss()) is None           # the model's own loss: none
    # a model that returns only its loss still evaluates, without an accuracy
    assert correct_count({"loss": torch.tensor(1.0)}, labels, ModelLoss("causal_lm")) is None
    z, y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.tensor([0, 1, 1])
    assert int(correct_count(z, y)) == int(correct_count(z, y, F.cross_entropy)) == 2
    assert accuracy_unit(CausalLMLoss()) == "token" and accuracy_unit(F.cross_entropy) == "sample"
    assert accuracy_unit(ModelLoss()) == "sample" and accuracy_unit(ModelLoss("tokens")) == "token"


def test_hf_model_lm_token_accuracy_equals_lm():
    pytest.importorskip("transformers")
    model = lm.hf_gpt2("sdpa")
    data = _batches()
    a, b = evaluate(model, "model_lm", data), evaluate(model, "lm", data)
    assert a.accuracy == b.accuracy and a.accuracy_unit == "token" and a.num_terms == sum(TERMS)
    assert evaluate(model, "model", data).accuracy is None

    class LossOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, **batch):
            return {"loss": self.inner(**batch).loss}

    r = evaluate(LossOnly(), "model_lm", data)
    assert r.accuracy is None and r.accuracy_unit is None and r.loss == a.loss


def test_classification_accuracy_stays_per_sample():
    model = mlp(seed=0)
    x, y = classification_data(n=23, seed=0)
    r = evaluate(model, "cross_entropy", (x, y), batch_size=5)
    with torch.no_grad():
        hand = sum(int(int(model(x[i:i + 1]).argmax()) == int(y[i])) for i in range(23))
    assert r.accuracy == hand / 23 and r.num_terms == 23 and r.accuracy_unit == "sample"
    m = evaluate(model, "mse", (x, torch.zeros(23, 3, dtype=x.dtype)))
    assert m.accuracy is None and m.accuracy_unit is None


# -- m-sharpness ---------------------------------------------------------------------------------
def _weighted_stderr(values, weights):
    n, nb = sum(weights), len(values)
    mean = sum(w * v for w, v in zip(weights, values)) / n
    return math.sqrt(nb / (nb - 1) * sum((w / n) ** 2 * (v - mean) ** 2 for w, v in zip(weights, values)))


@pytest.mark.parametrize("kind", ["worst", "average"])
def test_m_sharpness_weights_batches_by_their_tokens(kind):
    model = lm.lm_model()
    data = _batches()
    assert [_hand_terms(b) for b in data] == list(TERMS)
    r = sharpness(model, "lm", data, rho=0.05, kind=kind, m=2, steps=5, samples=8, progress=False)
    assert r.num_batches == 3 and r.batch_terms == TERMS and r.num_terms == sum(TERMS)
    v = r.batch_values
    want = sum(t * x for t, x in zip(TERMS, v)) / sum(TERMS)
    assert r.value == pytest.approx(want, rel=1e-12, abs=0)
    assert r.stderr == pytest.approx(_weighted_stderr(v, TERMS), rel=1e-10)
    # the unperturbed loss is the full-data (token-weighted) loss: m = batch size covers all data
    assert r.loss == pytest.approx(evaluate(model, "lm", data).loss, rel=1e-12)
    assert r.perturbed_loss == pytest.approx(r.loss + r.value, rel=1e-14)
    # and not the mean over batches a sample weighting would give
    assert r.value != pytest.approx(sum(v) / 3, rel=1e-3)


def test_worst_case_batch_values_are_each_batch_on_its_own():
    # init="zero" makes the ascent deterministic, so every batch value can be recomputed alone
    model = lm.lm_model()
    data = _batches()
    r = sharpness(model, "lm", data, rho=0.05, m=2, init="zero", steps=4, progress=False)
    alone = [sharpness(model, "lm", [b], rho=0.05, m=2, init="zero", steps=4, progress=False)
             for b in data]
    assert r.batch_values == pytest.approx([a.value for a in alone], rel=1e-12)
    hand = sum(t * a.value for t, a in zip(TERMS, alone)) / sum(TERMS)
    assert r.value == pytest.approx(hand, rel=1e-12)
    assert r.loss == pytest.approx(sum(t * a.loss for t, a in zip(TERMS, alone)) / sum(TERMS),
                                   rel=1e-12)


def test_a_batch_without_counted_tokens_weighs_nothing():
    model = lm.lm_model()
    data = _batches()
    empty = lm.pad_batch(lm.token_sequences((1, 1), seed=3))   # one token each: no next token
    assert _hand_terms(empty) == 0
    kw = dict(rho=0.05, m=2, init="zero", steps=3, progress=False)
    with_empty = sharpness(model, "lm", [data[0], empty, data[2]], **kw)
    without = sharpness(model, "lm", [data[0], data[2]], **kw)
    assert with_empty.batch_terms == (8, 0, 5) and with_empty.num_batches == 3
    assert with_empty.value == pytest.approx(without.value, rel=1e-13)
    assert with_empty.loss == pytest.approx(without.loss, rel=1e-13)
    with pytest.raises(ValueError, match="hold no loss terms"):
        sharpness(model, "lm", [empty, empty], **kw)


def test_equal_terms_keep_the_plain_mean_bit_for_bit():
    model = mlp(seed=0)
    x, y = classification_data(n=24, seed=0)
    r = sharpness(model, "cross_entropy", (x, y), rho=0.05, kind="average", m=6, samples=4,
                  progress=False)
    v = r.batch_values
    assert r.batch_terms == (6, 6, 6, 6) and r.num_terms == r.num_samples == 24
    assert r.value == sum(v) / 4                       # the unweighted formula, exactly
    s2 = max(sum(t * t for t in v) - 4 * r.value ** 2, 0.0) / 3
    assert r.stderr == math.sqrt(s2 / 4)


@pytest.mark.parametrize("terms", [(8, 2, 5, 0, 3), (4, 4, 4, 4, 4)])
def test_sharded_batch_statistics_are_sums_over_ranks(monkeypatch, terms):
    # rank 0 holds batches 0, 2, 4 and rank 1 batches 1, 3: the all-reduced sums give the whole
    from analysis.sharpness import m_sharpness as ms

    values, losses = [0.3, -0.1, 0.25, 0.0, 0.05], [2.0, 1.0, 1.5, 0.0, 3.0]
    whole = ms._batch_statistics(values, losses, list(terms), torch.device("cpu"), False)
    parts = [[i for i in range(5) if i % 2 == r] for r in (0, 1)]
    sent = []
    monkeypatch.setattr(ms.dist, "all_reduce_sum", lambda t: sent.append(t.clone()) or t)
    ms._batch_statistics([values[i] for i in parts[1]], [losses[i] for i in parts[1]],
                         [terms[i] for i in parts[1]], torch.device("cpu"), True)
    monkeypatch.setattr(ms.dist, "all_reduce_sum", lambda t: t.add_(sent[0]))
    sharded = ms._batch_statistics([values[i] for i in parts[0]], [losses[i] for i in parts[0]],
                                   [terms[i] for i in parts[0]], torch.device("cpu"), True)
    assert sharded == pytest.approx(whole, rel=1e-12)
    assert whole[0] == pytest.approx(sum(t * v for t, v in zip(terms, values)) / sum(terms))


def test_m_that_would_join_different_padded_lengths_is_refused():
    # batches padded to 5, 2 and 4 tokens: an m-batch of 3 sequences would mix two lengths
    with pytest.raises(ValueError, match="different shapes"):
        sharpness(lm.lm_model(), "lm", _batches(), rho=0.05, m=3, steps=2, progress=False)


def test_pac_bayes_flatness_on_a_language_model_uses_token_accuracy(trained):
    model, data = trained
    p = pac_bayes_flatness(model, "lm", data, draws=3, max_evaluations=10, tolerance=0.05)
    assert p.accuracy == evaluate(model, "lm", data).accuracy and p.accuracy_unit == "token"
    assert p.deviation == pytest.approx(0.1, abs=0.05) and p.sigma > 0


# -- probes --------------------------------------------------------------------------------------
def _hand_lm_loss_at(model, w, batch):
    """The token loss of ``batch`` at the flat weights ``w``, one next-token term at a time."""
    m = copy.deepcopy(model)
    ParameterSpace(m).copy_(w)
    with torch.no_grad():
        logits = m(batch["input_ids"])
    labels = batch["labels"]
    terms = [-torch.log_softmax(logits[i, t], -1)[labels[i, t + 1]]
             for i in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
             if labels[i, t + 1] != -100]
    return float(torch.stack(terms).mean())


def _stepped_lm():
    model = lm.lm_model()
    data = _batches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss = CausalLMLoss()
    for b in data:
        opt.zero_grad()
        loss(model(**b), b).backward()
        opt.step()
    return model, opt, data


def test_probe_losses_equal_evaluate_on_padded_batches():
    model, opt, data = _stepped_lm()
    probe = MechanismProbe(model, "lm", opt, rho=0.5)
    w = ParameterSpace(model).vector()
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    for b in data:
        ref = evaluate(model, "lm", [b]).loss
        pair = ({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]}, b["labels"])
        for form in (b, pair, (b, b)):
            row = probe.msam_loss(form)
            assert row["loss"] == pytest.approx(ref, rel=1e-12)
            assert row["loss"] == pytest.approx(_hand_lm_loss_at(model, w, b), rel=1e-12)
            assert row["loss_msam"] == pytest.approx(
                _hand_lm_loss_at(model, w - 0.5 * v / v.norm(), b), rel=1e-12)
            assert probe.cosine(form)["loss"] == pytest.approx(ref, rel=1e-12)
    assert torch.equal(ParameterSpace(model).vector(), w)


def test_probe_curvature_on_a_padded_batch_matches_the_dense_token_hessian():
    model, opt, data = _stepped_lm()
    b = data[0]
    probe = MechanismProbe(model, "lm", opt)
    out = probe.curvature(b, directions=("momentum", "gradient"))
    params = dict(model.named_parameters())
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]
    w0 = torch.cat([p.detach().reshape(-1) for p in params.values()])
    loss = CausalLMLoss()

    def f(w):
        state = {n: c.reshape(s) for n, c, s in zip(names, torch.split(w, sizes), shapes)}
        return loss(functional_call(model, state, args=(), kwargs={"input_ids": b["input_ids"]}), b)

    with sdpa_kernel(SDPBackend.MATH):
        H = torch.autograd.functional.hessian(f, w0)
        g = torch.autograd.functional.jacobian(f, w0)
    v = torch.cat([opt.state[p]["momentum_buffer"].reshape(-1) for p in model.parameters()])
    for name, d in (("momentum", v), ("gradient", g)):
        assert out[f"curv_{name}"] == pytest.approx(float(d @ H @ d / (d @ d)), rel=1e-9)


# -- slices and the gradient direction weight by tokens, too -------------------------------------
def test_slice_weights_batches_by_their_tokens(trained):
    # the loss on a slice is the dataset loss evaluate() reports (token-weighted), at the origin
    # and at a moved point; accuracy is per token; num_samples counts sequences
    from landscape import slice_1d

    model, data = trained
    model = copy.deepcopy(model).double()
    space = ParameterSpace(model)
    d = torch.randn(space.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = slice_1d(model, "lm", data, d, [0.0, 0.01], progress=False)
    ref = evaluate(model, "lm", data)
    correct, total = _hand_accuracy(model, data)
    assert s.num_terms == total == sum(TERMS) and s.num_samples == sum(SIZES)
    assert s.loss_at_origin == pytest.approx(ref.loss, rel=1e-12)
    assert s.accuracy_at_origin == pytest.approx(correct / total, rel=1e-12)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        ParameterSpace(moved).add_(d, alpha=0.01)
    assert s.loss[1] == pytest.approx(evaluate(moved, "lm", data).loss, rel=1e-10)


def test_gradient_direction_weights_batches_by_their_tokens(trained):
    # against autograd of the hand token-weighted loss sum_b t_b L_b / sum_b t_b
    from analysis import gradient_direction

    model, data = trained
    model = copy.deepcopy(model).double()
    loss = CausalLMLoss()
    total = sum(loss(model(**b), b) * t for b, t in zip(data, TERMS)) / sum(TERMS)
    ref = torch.autograd.grad(total, list(model.parameters()))
    ref = torch.cat([g.reshape(-1) for g in ref])
    g = gradient_direction(model, "lm", data)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
