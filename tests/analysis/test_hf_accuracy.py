"""Accuracy of Hugging Face classifiers (issue 27, item 4): evaluate() reads the logits the way
the loss does (``.logits`` of a ModelOutput; the labels of a batch dict), so BERT / ViT
``*ForSequenceClassification`` / ``*ForImageClassification`` get an accuracy, equal to the
argmax count computed by hand."""

from __future__ import annotations

import pytest
import torch

from analysis import evaluate
from analysis.evaluation import correct_count
from analysis.losses import ModelLoss, OutputLoss

transformers = pytest.importorskip("transformers")


def _bert():
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16, num_labels=3,
                                  max_position_embeddings=16)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg).eval()


def _vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                 num_labels=3)
    torch.manual_seed(0)
    return transformers.ViTForImageClassification(cfg).eval()


def _text(n=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (n, 6), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, torch.randint(0, 3, (n,), generator=g)


def _manual_accuracy(model, inputs, labels):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return (out.logits.argmax(-1) == labels).double().mean().item()


def test_bert_pair_cross_entropy_has_accuracy():
    model = _bert()
    x, y = _text()
    res = evaluate(model, "cross_entropy", (x, y))
    assert res.accuracy is not None and res.accuracy_unit == "sample"
    assert res.accuracy == pytest.approx(_manual_accuracy(model, x, y))


def test_bert_batch_dicts_with_labels_under_the_models_loss_have_accuracy():
    model = _bert()
    x, y = _text()
    batches = [{**{k: v[:6] for k, v in x.items()}, "labels": y[:6]},
               {**{k: v[6:] for k, v in x.items()}, "labels": y[6:]}]
    res = evaluate(model, "model", batches)
    assert res.accuracy is not None and res.accuracy_unit == "sample"
    assert res.accuracy == pytest.approx(_manual_accuracy(model, x, y))


def test_vit_image_classifier_has_accuracy():
    model = _vit()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    res = evaluate(model, "cross_entropy", (x, y))
    assert res.accuracy is not None
    assert res.accuracy == pytest.approx(_manual_accuracy(model, x, y))


def test_correct_count_reads_logits_like_the_loss_and_refuses_what_it_cannot_count():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    y = torch.tensor([0, 1, 1])
    assert int(correct_count({"logits": logits}, y, OutputLoss(None))) == 2
    assert int(correct_count({"logits": logits, "loss": torch.tensor(0.1)}, {"labels": y},
                             ModelLoss())) == 2
    assert correct_count({"logits": logits}, y.double(), OutputLoss(None)) is None  # regression
    assert correct_count({"loss": torch.tensor(0.1)}, {"labels": y}, ModelLoss()) is None
    # a token-weighted loss whose count fails gives no accuracy (not a per-sample count)
    assert correct_count({"logits": logits}, y, ModelLoss("causal_lm")) is None
