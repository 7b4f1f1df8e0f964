"""Bad inputs through every public entry point of the numerical API (issue 15, items 13-15).

Every row of the table must raise a ONE-LINE ``ValueError``/``TypeError`` naming the bad value,
before anything is changed: parameters, ``.grad`` tensors (the same objects), buffers
(BatchNorm running statistics), train/eval flags and the global RNG are compared bit for bit.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from analysis import (
    HessianOperator,
    MechanismProbe,
    ParameterSpace,
    directional_sharpness,
    epsilon_sharpness,
    evaluate,
    feature_rank,
    gradient_direction,
    hessian_trace,
    pac_bayes_flatness,
    random_direction,
    sharpness,
    sharpness_report,
    top_eigenpairs,
)
from analysis.directions import orthogonalize
from analysis.probes import rank_for_variance
from landscape import interpolate, slice_1d, slice_2d
from landscape.models import digits_cnn, digits_mlp
from tests.models import image_data

DT = torch.float64


class Net(nn.Module):
    """A small CNN with BatchNorm; ``random=True`` adds F.dropout(training=True) in forward."""

    def __init__(self, random: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(12, 3)
        self.random = random
        self.double()

    def forward(self, x):
        h = F.adaptive_avg_pool2d(torch.tanh(self.bn(self.conv(x))), 2).flatten(1)
        if self.random:
            h = F.dropout(h, 0.5, training=True)
        return self.head(h)


def _prepared(random: bool = False) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    model = Net(random)
    x, y = image_data(n=16)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.2, 0.2)
    F.cross_entropy(model.eval()(x), y).backward()  # every parameter has a .grad
    model.train()
    model.head.eval()  # mixed flags, to see them restored exactly
    return model, (x, y)


def _snapshot(model: nn.Module):
    return (
        [p.detach().clone() for p in model.parameters()],
        [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()],
        [b.detach().clone() for b in model.buffers()],
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        torch.get_rng_state(),
    )


def _assert_unchanged(model: nn.Module, snap) -> None:
    params, grads, buffers, modes, rgs, rng = snap
    assert all(torch.equal(p, v) for p, v in zip(model.parameters(), params))
    for p, (obj, val) in zip(model.parameters(), grads):
        assert p.grad is obj and torch.equal(p.grad, val)
    assert all(torch.equal(b, v) for b, v in zip(model.buffers(), buffers))
    assert [m.training for m in model.modules()] == modes
    assert [p.requires_grad for p in model.parameters()] == rgs
    assert torch.equal(torch.get_rng_state(), rng)


def _n(model):
    return ParameterSpace(model).numel


def _dirs(model):
    d1 = random_direction(model, seed=0)
    return d1, random_direction(model, seed=1, orthogonal_to=d1)


def _meta():
    with torch.device("meta"):
        return nn.Linear(4, 3)


S = dict(rho=0.1, m=8, steps=2, progress=False)

# (id, call(model, (x, y)) -> anything, exception, regex the one-line message must match)
CASES = [
    # item 13: the first batch against the model and the loss
    ("int inputs", lambda m, d: sharpness(m, "cross_entropy", (d[0].long(), d[1]), **S),
     ValueError, r"sharpness\(\): the forward pass failed on batch 0 \(inputs int64 \(16, 2, 5, 5\)"),
    ("float class targets", lambda m, d: sharpness(m, "cross_entropy", (d[0], d[1].double()), **S),
     TypeError, r"integer class indices of shape \(16,\).*float64 \(16,\)"),
    ("mse on labels", lambda m, d: epsilon_sharpness(m, "mse", d, steps=2),
     TypeError, r"epsilon_sharpness\(\): mse needs floating targets.*int64 \(16,\).*class labels"),
    ("mse wrong shape", lambda m, d: directional_sharpness(m, "mse", (d[0], torch.zeros(16, 1, dtype=DT)),
                                                           torch.ones(_n(m), dtype=DT), [0.1]),
     ValueError, r"mse needs targets of the outputs' shape \(16, 3\), got float64 \(16, 1\)"),
    ("wrong input shape", lambda m, d: slice_1d(m, "cross_entropy", (d[0][:, :1], d[1]),
                                                torch.ones(_n(m), dtype=DT), [0.0], progress=False),
     ValueError, r"slice_1d\(\): the forward pass failed on batch 0 \(inputs float64 \(16, 1, 5, 5\)"),
    ("target out of range", lambda m, d: pac_bayes_flatness(m, "cross_entropy", (d[0], d[1] + 5)),
     ValueError, r"class indices in \[0, 3\).*got 5"),
    ("negative target", lambda m, d: sharpness(m, "cross_entropy", (d[0], d[1] - 7), **S),
     ValueError, r"class indices in \[0, 3\).*got -7"),
    ("target of wrong rank", lambda m, d: sharpness(m, "cross_entropy", (d[0], d[1][:, None]), **S),
     ValueError, r"needs class-index targets of shape \(16,\), got int64 \(16, 1\)"),
    ("failing loss", lambda m, d: slice_2d(m, lambda o, t: o.sum(dim=5), d, *_dirs(m), [0], [0],
                                           progress=False),
     ValueError, r"slice_2d\(\): the loss failed on batch 0 .*IndexError"),
    ("non-scalar loss", lambda m, d: sharpness(m, lambda o, t: o, d, **S),
     ValueError, r"must return a scalar tensor.*float64 \(16, 3\)"),
    ("meta-device model", lambda m, d: sharpness(_meta(), "cross_entropy", (torch.zeros(8, 4), d[1][:8]), **S),
     ValueError, r"meta device.*'weight'"),
    ("store under a file", lambda m, d: slice_2d(m, "cross_entropy", d, *_dirs(m), [0], [0],
                                                 store=__file__ + "/x.npz", progress=False),
     ValueError, r"test_api_inputs.py is a file, not a directory"),
    ("store of wrong type", lambda m, d: slice_2d(m, "cross_entropy", d, *_dirs(m), [0], [0],
                                                  store=3.5, progress=False),
     TypeError, r"store must be a path.*float"),
    # item 14: arguments of the wrong type or range
    ("probe layer", lambda m, d: MechanismProbe(m, "cross_entropy", torch.optim.SGD(m.parameters(), lr=0.1),
                                                layer="nope"),
     ValueError, r"unknown layer 'nope'; the model has \['conv', 'bn', 'head'\]"),
    ("probe seed", lambda m, d: MechanismProbe(m, "cross_entropy", torch.optim.SGD(m.parameters(), lr=0.1),
                                               seed="1"),
     TypeError, r"seed must be an integer, got str '1'"),
    ("copy_ numpy", lambda m, d: ParameterSpace(m).copy_(np.zeros(_n(m))),
     TypeError, r"copy_\(\) needs a flat torch.Tensor, got ndarray"),
    ("add_ integer tensor", lambda m, d: ParameterSpace(m).add_(torch.zeros(_n(m), dtype=torch.long)),
     TypeError, r"add_\(\) needs a floating-point vector, got dtype torch.int64"),
    ("copy_ wrong length", lambda m, d: ParameterSpace(m).copy_(torch.zeros(3, dtype=DT)),
     ValueError, r"shape \(3,\), expected"),
    ("params a string", lambda m, d: ParameterSpace(m, "head.weight"),
     TypeError, r"got the string 'head.weight'"),
    ("feature_rank layer", lambda m, d: feature_rank(m, d, "nope"),
     ValueError, r"unknown layer 'nope'"),
    ("rank_for_variance list", lambda m, d: rank_for_variance([[1.0, 2.0]]),
     TypeError, r"features must be a tensor, got list"),
    ("sharpness adaptive", lambda m, d: sharpness(m, "cross_entropy", d, adaptive="no", **S),
     TypeError, r"adaptive must be True or False, got str 'no'"),
    ("sharpness eta", lambda m, d: sharpness(m, "cross_entropy", d, eta=float("nan"), **S),
     ValueError, r"eta must be a finite number >= 0, got nan"),
    ("sharpness seed", lambda m, d: sharpness(m, "cross_entropy", d, seed=0.5, **S),
     TypeError, r"seed must be an integer, got float 0.5"),
    ("sharpness restarts", lambda m, d: sharpness(m, "cross_entropy", d, restarts=-1, **S),
     ValueError, r"restarts must be a non-negative integer, got -1"),
    ("epsilon seed", lambda m, d: epsilon_sharpness(m, "cross_entropy", d, seed="x"),
     TypeError, r"seed must be an integer, got str 'x'"),
    ("pac_bayes target", lambda m, d: pac_bayes_flatness(m, "cross_entropy", d, target=1.5),
     ValueError, r"target=1.5"),
    ("pac_bayes flag", lambda m, d: pac_bayes_flatness(m, "cross_entropy", d, magnitude_aware="yes"),
     TypeError, r"magnitude_aware must be True or False, got str 'yes'"),
    ("report options", lambda m, d: sharpness_report(m, "cross_entropy", d, ["worst", "average"],
                                                     options={"average": {"rhoo": 0.1}}),
     ValueError, r"options\['average'\] has unknown option\(s\) \['rhoo'\]"),
    ("report options type", lambda m, d: sharpness_report(m, "cross_entropy", d, ["worst"], options=[1]),
     TypeError, r"options must be a dict.*got list"),
    ("report metrics type", lambda m, d: sharpness_report(m, "cross_entropy", d, 3),
     TypeError, r"metrics must be a metric name or a list of names, got int"),
    ("gradient_direction targets", lambda m, d: gradient_direction(m, "cross_entropy", (d[0], d[1].double())),
     TypeError, r"gradient_direction\(\): cross_entropy needs integer class indices"),
    ("orthogonalize against None", lambda m, d: orthogonalize(torch.ones(3, dtype=DT), None),
     TypeError, r"against must be a flat tensor or a list of them, got NoneType"),
    ("digits_cnn width 0", lambda m, d: digits_cnn(width=0), ValueError, r"width must be >= 1, got 0"),
    ("digits_cnn width float", lambda m, d: digits_cnn(width=2.5), TypeError, r"width must be an integer, got float 2.5"),
    ("digits_cnn batchnorm", lambda m, d: digits_cnn(batchnorm="no"), TypeError, r"batchnorm must be True or False"),
    ("digits_mlp depth", lambda m, d: digits_mlp(depth=-1), ValueError, r"depth must be >= 0, got -1"),
    ("digits_mlp classes", lambda m, d: digits_mlp(num_classes=0), ValueError, r"num_classes must be >= 1, got 0"),
]

# item 15: a random forward (F.dropout(training=True) inside forward) under every routine that
# assumes a fixed function of the weights
RANDOM = [
    ("sharpness", lambda m, d: sharpness(m, "cross_entropy", d, **S)),
    ("average sharpness", lambda m, d: sharpness(m, "cross_entropy", d, kind="average", samples=2, **S)),
    ("epsilon", lambda m, d: epsilon_sharpness(m, "cross_entropy", d, steps=2)),
    ("directional", lambda m, d: directional_sharpness(m, "cross_entropy", d, torch.ones(_n(m), dtype=DT), [0.1])),
    ("pac_bayes", lambda m, d: pac_bayes_flatness(m, "cross_entropy", d)),
    ("report", lambda m, d: sharpness_report(m, "cross_entropy", d, ["worst"], options={"worst": {"m": 8}})),
    ("slice_1d", lambda m, d: slice_1d(m, "cross_entropy", d, torch.ones(_n(m), dtype=DT), [0.0], progress=False)),
    ("slice_2d", lambda m, d: slice_2d(m, "cross_entropy", d, *_dirs(m), [0], [0], progress=False)),
    ("interpolate", lambda m, d: interpolate(m, _shifted(m), "cross_entropy", d, [0.0], progress=False)),
    ("HessianOperator", lambda m, d: HessianOperator(m, "cross_entropy", d)),
    ("top_eigenpairs", lambda m, d: top_eigenpairs(m, "cross_entropy", d, k=1)),
    ("hessian_trace", lambda m, d: hessian_trace(m, "cross_entropy", d, num_matvecs=3)),
]


def _shifted(model):
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    return other


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_error_and_changes_nothing(case):
    _, call, exc, match = case
    model, data = _prepared()
    snap = _snapshot(model)
    with pytest.raises(exc, match=match) as err:
        call(model, data)
    assert type(err.value) is exc  # not a subclass leaking from deep inside torch
    assert "\n" not in str(err.value)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("case", RANDOM, ids=[c[0] for c in RANDOM])
def test_random_forward_is_refused_everywhere(case):
    _, call = case
    model, data = _prepared(random=True)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"the model's forward is random \(two evaluations of batch 0 "
                                         r"differ at output entry \d+: -?[\d.e+-]+ vs -?[\d.e+-]+\)") as err:
        call(model, data)
    assert "\n" not in str(err.value) and "check_deterministic=False" in str(err.value)
    _assert_unchanged(model, snap)


def test_the_same_model_without_randomness_passes_every_check():
    model, data = _prepared(random=False)
    snap = _snapshot(model)
    sharpness(model, "cross_entropy", data, **S)
    slice_1d(model, "cross_entropy", data, torch.ones(_n(model), dtype=DT), [0.0], progress=False)
    top_eigenpairs(model, "cross_entropy", data, k=1)
    _assert_unchanged(model, snap)


# -- a language model under a classification loss: one line that says to use "lm" ------------

LM_HINT = "use loss 'lm' (next-token, shifted) or 'model_lm' (the model computes its own loss from labels)"

LM_CALLS = [
    ("evaluate", lambda m, loss, d: evaluate(m, loss, d)),
    ("sharpness", lambda m, loss, d: sharpness(m, loss, d, **S)),
    ("epsilon", lambda m, loss, d: epsilon_sharpness(m, loss, d, steps=2)),
    ("pac_bayes", lambda m, loss, d: pac_bayes_flatness(m, loss, d, draws=2)),
    ("gradient_direction", lambda m, loss, d: gradient_direction(m, loss, d)),
    ("slice_1d", lambda m, loss, d: slice_1d(m, loss, d, torch.ones(_n(m), dtype=DT), [0.0], progress=False)),
    ("HessianOperator", lambda m, loss, d: HessianOperator(m, loss, d)),
    ("HessianOperator-no-check", lambda m, loss, d: HessianOperator(m, loss, d, check_deterministic=False)),
    ("top_eigenpairs", lambda m, loss, d: top_eigenpairs(m, loss, d, k=1)),
    ("hessian_trace", lambda m, loss, d: hessian_trace(m, loss, d, num_matvecs=3)),
]


def _lm_data(form: str):
    from tests.lm_models import pad_batch, token_sequences

    batch = pad_batch(token_sequences((5, 3, 4, 5)))
    return batch if form == "dict" else (batch["input_ids"], batch["input_ids"])


@pytest.mark.parametrize("form", ["dict", "ids-pair"])
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("case", LM_CALLS, ids=[c[0] for c in LM_CALLS])
def test_language_model_under_a_classification_loss_says_use_lm(case, loss, form):
    # regression: raw torch errors (TypeError "argument 'target' must be Tensor, not dict",
    # RuntimeError "Expected target size [4, 7], got [4, 5]"), or none (HessianOperator)
    from analysis import CausalLMLoss
    from tests.lm_models import lm_model

    name, call = case
    model = lm_model()
    batch = _lm_data("dict")
    CausalLMLoss()(model(**batch), batch).backward()  # every parameter has a .grad
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    snap = _snapshot(model)
    exc = TypeError if form == "dict" else ValueError
    with pytest.raises(exc, match=r"\(B, T, V\) logits") as err:
        call(model, loss, _lm_data(form))
    msg = str(err.value)
    assert type(err.value) is exc and "\n" not in msg and msg.endswith(LM_HINT), msg
    assert f"which {loss} does not fit" in msg and "(4, 5, 7)" in msg, msg
    assert len(forwards) <= 2, f"{name}: {len(forwards)} forward passes before the error"
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("form", ["dict", "ids-pair"])
def test_hugging_face_output_with_logits_under_cross_entropy_says_use_lm(form):
    pytest.importorskip("transformers")
    from tests.lm_models import hf_gpt2

    model = hf_gpt2()
    exc = TypeError if form == "dict" else ValueError
    for call in (lambda d: top_eigenpairs(model, "cross_entropy", d, k=1),
                 lambda d: evaluate(model, "cross_entropy", d)):
        with pytest.raises(exc, match=r"float64 \(4, 5, 7\) of batch 0 are a language model's") as err:
            call(_lm_data(form))
        assert str(err.value).endswith(LM_HINT)


def test_a_dict_batch_under_cross_entropy_for_a_classifier_says_it_is_no_tensor():
    class DictClassifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, features, labels=None):
            return self.lin(features)

    batch = {"features": torch.randn(4, 3, dtype=DT), "labels": torch.tensor([0, 1, 1, 0])}
    for call in (lambda m: HessianOperator(m, "cross_entropy", batch),
                 lambda m: evaluate(m, "cross_entropy", batch),
                 lambda m: sharpness(m, "cross_entropy", batch, **S)):
        with pytest.raises(TypeError, match=r"cross_entropy needs a tensor of targets, got a batch "
                                            r"dict of \['features', 'labels'\] on batch 0.*"
                                            r"loss 'model'") as err:
            call(DictClassifier())
        assert "\n" not in str(err.value)


def test_language_model_losses_still_pass_the_checks():
    from tests.lm_models import lm_model

    model = lm_model()
    batch = _lm_data("dict")
    ids = batch["input_ids"]
    assert np.isfinite(evaluate(model, "lm", batch).loss)
    assert np.isfinite(evaluate(model, "lm", (ids, ids)).loss)
    H = HessianOperator(model, "lm", batch)
    assert torch.isfinite(H @ torch.ones(H.shape[0], dtype=DT)).all()
