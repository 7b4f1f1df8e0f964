import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from analysis import evaluate
from analysis.data import as_data
from analysis.evaluation import model_mode
from tests.models import classification_data, cnn_bn, mlp


def _sizes(source):
    return [b.size for b in source]


def test_pair_is_split_with_uneven_last_batch():
    x, y = classification_data(n=10)
    src = as_data((x, y), batch_size=4)
    assert _sizes(src) == [4, 4, 2]
    assert src.num_samples() == 10


def test_forms_agree():
    x, y = classification_data(n=10)
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=False)
    assert _sizes(as_data(batches)) == _sizes(as_data(loader)) == [4, 4, 2]
    assert not as_data(loader).is_shuffled
    assert as_data(DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)).is_shuffled


def test_max_samples_truncates():
    x, y = classification_data(n=10)
    assert _sizes(as_data((x, y), batch_size=4, max_samples=6)) == [4, 2]


def test_bad_data_errors():
    x, y = classification_data(n=10)
    with pytest.raises(ValueError, match="10 samples but targets have 9"):
        as_data((x, y[:9]))
    with pytest.raises(ValueError, match="empty"):
        as_data([])
    with pytest.raises(TypeError, match="single tensor"):
        as_data(x)
    with pytest.raises(ValueError, match="batch_size"):
        as_data((x, y), batch_size=0)
    with pytest.raises(TypeError, match="unsupported data"):
        as_data(42)


def test_evaluate_weights_exactly_by_sample_count():
    model = mlp()
    x, y = classification_data(n=10)
    full = F.cross_entropy(model(x), y).item()
    res = evaluate(model, "cross_entropy", (x, y), batch_size=3)  # batches 3,3,3,1
    assert res.loss == pytest.approx(full, rel=1e-12)
    acc = (model(x).argmax(1) == y).double().mean().item()
    assert res.accuracy == pytest.approx(acc)
    assert res.num_samples == 10
    assert set(res.to_dict()) == {"loss", "accuracy", "num_samples", "num_terms", "accuracy_unit"}
    assert res.num_terms == 10 and res.accuracy_unit == "sample"


def test_evaluate_casts_float32_data_to_model_dtype():
    model = mlp()
    x, y = classification_data(n=8)
    res32 = evaluate(model, None, (x.float(), y))
    assert res32.loss == pytest.approx(F.cross_entropy(model(x.float().double()), y).item())


def test_model_mode_restores_mixed_modes():
    model = cnn_bn()
    model.train()
    model[1].eval()
    with model_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert model.training and not model[1].training and model[0].training


def test_evaluate_regression_has_no_accuracy():
    model = torch.nn.Linear(3, 1).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    y = torch.randn(5, 1, dtype=torch.float64)
    res = evaluate(model, "mse", (x, y))
    assert res.accuracy is None
    assert res.loss == pytest.approx(F.mse_loss(model(x), y).item())


@pytest.mark.parametrize("kwargs", [{"batch_size": True}, {"batch_size": 2.5}, {"batch_size": "4"},
                                    {"max_samples": False}, {"max_samples": 3.0},
                                    {"shard": "yes"}])
def test_wrong_types_are_refused_with_type_error(kwargs):
    x, y = classification_data(n=6)
    name = next(iter(kwargs))
    with pytest.raises(TypeError, match=f"{name} must be"):
        as_data((x, y), **kwargs)


def _token_dict(n=5, t=4):
    ids = torch.arange(n * t).reshape(n, t) % 7
    mask = torch.ones(n, t, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def test_dict_data_is_split_and_each_batch_is_its_own_target():
    data = _token_dict()
    src = as_data(data, batch_size=2)
    assert src.kind == "dict" and _sizes(src) == [2, 2, 1]
    batches = list(src)
    assert all(b.targets is b.inputs for b in batches)
    torch.testing.assert_close(torch.cat([b.inputs["input_ids"] for b in batches]),
                               data["input_ids"])
    assert src.num_samples() == 5


def test_batch_dicts_in_lists_and_loaders_with_max_samples():
    batches = [_token_dict(3), _token_dict(2)]
    src = as_data(batches, max_samples=4)
    got = list(src)
    assert [b.size for b in got] == [3, 1]
    assert got[1].targets is got[1].inputs and got[1].inputs["labels"].shape == (1, 4)
    loader = DataLoader(batches, batch_size=None)
    assert _sizes(as_data(loader)) == [3, 2]


def test_bad_dict_data_is_refused():
    data = _token_dict()
    with pytest.raises(ValueError, match="disagree in length"):
        as_data({**data, "labels": data["labels"][:3]})
    with pytest.raises(TypeError, match="a data dict must map names to tensors"):
        as_data({"input_ids": [1, 2, 3]})
    with pytest.raises(TypeError, match="batch 1 is a int"):
        as_data([_token_dict(), 3])


# -- a single dict batch (a tokenizer's output) is in-memory data -----------------------------

def test_data_forms_say_whether_they_are_in_memory():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    assert as_data((x, y)).in_memory and as_data([(x, y)]).in_memory
    assert as_data(_token_dict()).in_memory and as_data([_token_dict()]).in_memory
    assert not as_data(DataLoader(TensorDataset(x, y), batch_size=2)).in_memory


@pytest.mark.parametrize("method", ["auto", "forward-over-reverse", "double-backward",
                                    "cached-graph"])
def test_hessian_of_one_dict_batch_matches_dense_hessian_of_the_batch_in_a_list(method):
    # regression: a dict batch was treated like a DataLoader (no device cache, so
    # method="cached-graph" was refused and "auto" skipped it)
    from analysis import HessianOperator
    from analysis.reference import dense_hessian
    from tests.lm_models import lm_model, pad_batch, token_sequences

    model = lm_model()
    batch = pad_batch(token_sequences((5, 2, 4)))  # uneven padding: token weighting matters
    reference = dense_hessian(model, "lm", [batch])  # float64, torch.autograd.functional.hessian
    H = HessianOperator(model, "lm", batch, method=method)
    assert H._cached is not None and len(H._cached) == 1
    assert H.num_terms == 4 + 1 + 3  # next-token targets of the three sequences
    dense = H.matmat(torch.eye(H.shape[0], dtype=torch.float64))
    torch.testing.assert_close(dense, reference, rtol=1e-9, atol=1e-11)
    if method == "cached-graph":
        assert H.method == "cached-graph"


def test_slice_caches_a_dict_batch_and_agrees_with_the_batch_in_a_list():
    from analysis import random_direction
    from analysis.evaluation import resolve_loss
    from landscape import slice_1d
    from landscape.slices._points import Evaluator
    from tests.lm_models import lm_model, pad_batch, token_sequences

    model = lm_model()
    batch = pad_batch(token_sequences((5, 2, 4)))
    ev = Evaluator(model, resolve_loss("lm"), as_data(batch),
                   want_accuracy=True, cache="auto", bn_source=None)
    assert ev.batches is not None  # kept on the device for the whole slice
    d = random_direction(model, seed=0)
    alphas = [-0.5, 0.0, 0.5]
    a = slice_1d(model, "lm", batch, d, alphas, progress=False)
    b = slice_1d(model, "lm", [batch], d, alphas, progress=False)
    np.testing.assert_allclose(a.loss, b.loss, rtol=1e-12)
    assert a.loss[1] == pytest.approx(evaluate(model, "lm", batch).loss, rel=1e-12)
