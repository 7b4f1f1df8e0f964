"""End to end on the architectures researchers analyze (issue 13, item 5).

A torchvision-style ResNet with BatchNorm, a ViT (patch embedding + ``nn.TransformerEncoder``),
a GPT-style causal LM on padded sequences and a Hugging Face ``GPT2LMHeadModel`` built from a
config, all tiny (a few hundred parameters; ``tests/arch_models.py``). Every routine is compared
with an independent reference: the dense float64 Hessian (``torch.autograd.functional.hessian``
through ``analysis.reference.dense_hessian``, computed under the math SDPA backend, which has double
backward), hand-evaluated losses at perturbed weights, and the data's BatchNorm statistics.

The attention models (ViT, LMs) are analyzed exactly as a user would call the library, with no
``sdpa_kernel`` context: the curvature code selects attention with double backward itself
(``analysis.second_order_attention``); ``test_math_backend_workaround`` checks that an
explicit ``sdpa_kernel(SDPBackend.MATH)`` around it changes nothing.
"""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import msam
from analysis import (
    HessianOperator,
    ParameterSpace,
    hessian_trace,
    random_direction,
    sharpness,
    sharpness_report,
    spectral_density,
    top_eigenpairs,
)
from analysis.reference import dense_hessian
from landscape import slice_1d, slice_2d
from landscape.cli import main
from tests import arch_models as A

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None

CASES = {
    # name: (model factory, data factory, loss, uses attention)
    "resnet": (A.resnet, A.image_data, "cross_entropy", False),
    "vit": (A.vit, A.image_data, "cross_entropy", True),
    "gpt": (A.causal_lm, A.lm_data, A.lm_loss, True),
    "hf_gpt2": (A.hf_gpt2_logits, A.lm_data, A.lm_loss, True),
    # eager attention is plain autograd: double backward works without any kernel choice
    "hf_gpt2_eager": (A.hf_gpt2_eager_logits, A.lm_data, A.lm_loss, False),
}


def _params(names):
    out = []
    for name in names:
        marks = []
        if name.startswith("hf") and not HAVE_TRANSFORMERS:
            marks = [pytest.mark.skip(reason="transformers is not installed (pip install .[huggingface])")]
        out.append(pytest.param(name, marks=marks, id=name))
    return out


ALL = _params(CASES)


_TRAINED: dict[str, dict] = {}


def _case(name, trained=True):
    """A fresh model with the weights of a short Adam run (a checkpoint worth analyzing: an
    untrained net at chance accuracy has no PAC-Bayes accuracy drop to find), its data, loss."""
    make, data, loss = CASES[name][:3]
    if name.startswith("hf"):
        pytest.importorskip("transformers", reason="the HF test needs transformers (extra 'hf')")
    model, d = make(), data()
    if not trained:
        return model, d, loss
    if name not in _TRAINED:
        fn = F.cross_entropy if loss == "cross_entropy" else loss
        opt = torch.optim.Adam(model.parameters(), lr=2e-2)
        for _ in range(40):  # full batch, eval mode: BatchNorm statistics stay the data's
            opt.zero_grad()
            fn(model(d[0]), d[1]).backward()
            opt.step()
        _TRAINED[name] = copy.deepcopy(model.state_dict())
    model.load_state_dict(_TRAINED[name])
    return model, d, loss


_DENSE: dict[str, torch.Tensor] = {}


def _dense(name) -> torch.Tensor:
    """The dense float64 Hessian (math attention: the reference has double backward)."""
    if name not in _DENSE:
        model, data, loss = _case(name)
        with sdpa_kernel(SDPBackend.MATH):
            _DENSE[name] = dense_hessian(model, loss, data)
    return _DENSE[name]


def _loss_at(model, loss, data, flat) -> float:
    """``L(flat)`` evaluated by hand (functional_call, math attention): the slice reference."""
    space = ParameterSpace(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    parts = torch.split(flat.to(space.dtype), [int(np.prod(s)) for s in shapes])
    params = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
    x, y = data
    fn = F.cross_entropy if loss == "cross_entropy" else loss
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        return float(fn(functional_call(model, params, (x,)), y))


# ------------------------------------------------------------------------------------------------
# curvature: operator, top-k, trace, density against the dense Hessian
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_operator_matches_dense_hessian(name):
    model, data, loss = _case(name)
    D = _dense(name)
    H = HessianOperator(model, loss, data)
    V = torch.randn(D.shape[0], 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for j in range(3):
        hv = (H @ V[:, j].float()).double()
        ref = D @ V[:, j]
        assert torch.allclose(hv, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max())), name


@pytest.mark.parametrize("name", ALL)
def test_top_eigenpairs_trace_density(name):
    model, data, loss = _case(name)
    D = _dense(name)
    evals = torch.linalg.eigvalsh(D).flip(0)
    res = top_eigenpairs(model, loss, data, k=3, tol=1e-4)
    assert res.converged
    np.testing.assert_allclose(res.eigenvalues.double().numpy(), evals[:3].numpy(),
                               rtol=2e-3, atol=1e-5 * float(evals[0]))
    # eigenvectors: Rayleigh quotients with the dense matrix
    Y = res.eigenvectors.double()
    np.testing.assert_allclose(torch.einsum("ki,ij,kj->k", Y, D, Y).numpy(), evals[:3].numpy(),
                               rtol=2e-3, atol=1e-5 * float(evals[0]))

    tr = hessian_trace(model, loss, data, num_matvecs=60, seed=1)
    exact = float(torch.trace(D))
    scale = float(torch.linalg.matrix_norm(D, "fro"))
    assert abs(tr.estimate - exact) <= 5 * tr.std_error + 0.05 * scale, (tr.estimate, exact)

    dens = spectral_density(model, loss, data, num_iter=30, num_runs=2, seed=2)
    assert abs(dens.integral() - 1) < 0.05
    lo, hi = float(evals[-1]), float(evals[0])
    pad = 1e-3 * max(abs(lo), abs(hi))
    assert dens.nodes.min() >= lo - pad and dens.nodes.max() <= hi + pad  # Ritz values interlace
    assert dens.nodes.max() == pytest.approx(hi, rel=1e-2)  # extremes converge first


@pytest.mark.parametrize("name", ALL)
def test_sharpness_metrics(name):
    model, data, loss = _case(name)
    D = _dense(name)
    n = len(data[1])
    before = copy.deepcopy(model.state_dict())
    metrics = ["worst", "average", "epsilon", "lambda_max", "trace"]
    if loss == "cross_entropy":  # PAC-Bayes flatness measures an accuracy drop: classifiers only
        metrics.append("pac_bayes")
    rep = sharpness_report(model, loss, data, metrics, options={"worst": {"steps": 3},
                                                       "average": {"samples": 4},
                                                       "trace": {"num_matvecs": 30}})
    assert all(np.isfinite(v) for v in rep.values.values()), rep.values
    assert rep.results["worst"].m == n  # small data: m = min(128, N)
    assert rep.values["lambda_max"] == pytest.approx(float(torch.linalg.eigvalsh(D)[-1]), rel=2e-3)
    for k, v in model.state_dict().items():  # nothing changed (BatchNorm statistics included)
        assert torch.equal(v, before[k]), k

    # worst-case sharpness, non-adaptive, one batch: at least the loss increase of the
    # normalized gradient step, at most the second-order bound rho ||g|| + rho^2 lambda_max / 2
    rho = 1e-2
    w = ParameterSpace(model).vector().detach()
    x, y = data
    fn = F.cross_entropy if loss == "cross_entropy" else loss
    model.zero_grad()
    with sdpa_kernel(SDPBackend.MATH):
        fn(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])
    model.zero_grad()
    l0 = _loss_at(model, loss, data, w)
    step = _loss_at(model, loss, data, w + rho * g / g.norm()) - l0
    res = sharpness(model, loss, data, rho=rho, adaptive=False, steps=10, progress=False)
    lam = max(float(torch.linalg.eigvalsh(D)[-1]), 0.0)
    assert res.m == n and res.num_batches == 1
    assert step - 1e-5 <= res.value <= rho * float(g.norm()) + 0.5 * rho**2 * lam * 1.5 + 1e-5


# ------------------------------------------------------------------------------------------------
# slices against hand-evaluated losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ALL)
def test_slices_match_hand_evaluated_loss(name):
    model, data, loss = _case(name)
    w = ParameterSpace(model).vector().detach()
    d1 = random_direction(model, seed=0)
    d2 = random_direction(model, seed=1, orthogonal_to=d1)
    alphas = torch.tensor([-0.5, 0.0, 0.25, 1.0])
    s1 = slice_1d(model, loss, data, d1, alphas, progress=False)
    ref1 = [_loss_at(model, loss, data, w + float(a) * d1) for a in alphas]
    np.testing.assert_allclose(s1.loss, ref1, rtol=1e-4, atol=1e-6)
    xs = torch.tensor([-0.5, 0.5])
    ys = torch.tensor([-0.25, 0.0, 0.75])
    s2 = slice_2d(model, loss, data, d1, d2, xs, ys, progress=False)
    ref2 = np.array([[_loss_at(model, loss, data, w + float(a) * d1 + float(b) * d2) for a in xs]
                     for b in ys])
    assert s2.loss.shape == ref2.shape or s2.loss.T.shape == ref2.shape
    got = s2.loss if s2.loss.shape == ref2.shape else s2.loss.T
    np.testing.assert_allclose(got, ref2, rtol=1e-4, atol=1e-6)
    assert torch.equal(ParameterSpace(model).vector().detach(), w)


# ------------------------------------------------------------------------------------------------
# training with MSAM / AdamW-MSAM
# ------------------------------------------------------------------------------------------------
def _train(model, data, loss, opt, steps):
    fn = F.cross_entropy if loss == "cross_entropy" else loss
    x, y = data
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        fn(model(x), y).backward()
        opt.step()
    opt.eval()  # parameters -> w
    model.eval()


def test_msam_resnet_with_batchnorm_recalibration():
    model, data, loss = _case("resnet", trained=False)
    x, y = data
    with torch.no_grad():
        l0 = float(F.cross_entropy(model(x), y))
    opt = msam.MSAM(model.parameters(), lr=0.1, momentum=0.9, rho=0.3)
    _train(model, data, loss, opt, 15)
    # reference: the statistics of the data at w, from a single train-mode pass
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives exactly its statistics
    ref.train()
    with torch.no_grad():
        ref(x)
    running = [k for k in model.state_dict() if "running" in k]
    # the statistics MSAM's training left were collected at the perturbed points w~, not at w
    assert not all(torch.allclose(model.state_dict()[k], ref.state_dict()[k], rtol=1e-3)
                   for k in running)
    msam.recalibrate_batchnorm(model, data, batch_size=len(y))
    for k in running:
        assert torch.allclose(model.state_dict()[k], ref.state_dict()[k], rtol=1e-4, atol=1e-6), k
    with torch.no_grad():
        assert float(F.cross_entropy(model(x), y)) < l0


@pytest.mark.parametrize("name", [p for p in ALL if p.id != "resnet"])
def test_adamw_msam_attention_models(name):
    model, data, loss = _case(name, trained=False)
    x, y = data
    fn = F.cross_entropy if loss == "cross_entropy" else loss
    with torch.no_grad():
        l0 = float(fn(model(x), y))
    opt = msam.AdamWMSAM(model.parameters(), lr=3e-2, weight_decay=0.0, rho=0.3)
    _train(model, data, loss, opt, 20)
    with torch.no_grad():
        l1 = float(fn(model(x), y))
    assert l1 < 0.8 * l0, (l0, l1)


# ------------------------------------------------------------------------------------------------
# the CLI on a saved checkpoint
# ------------------------------------------------------------------------------------------------
_SPECS = {
    "resnet": ["--model", "tests.arch_models:resnet", "--data", "tests.arch_models:image_data"],
    "vit": ["--model", "tests.arch_models:vit", "--data", "tests.arch_models:image_data"],
    "gpt": ["--model", "tests.arch_models:causal_lm", "--data", "tests.arch_models:lm_data",
            "--loss", "tests.arch_models:lm_loss"],
    "hf_gpt2": ["--model", "tests.arch_models:hf_gpt2_logits", "--data", "tests.arch_models:lm_data",
                "--loss", "tests.arch_models:lm_loss"],
    "hf_gpt2_eager": ["--model", "tests.arch_models:hf_gpt2_eager_logits", "--data",
                      "tests.arch_models:lm_data", "--loss", "tests.arch_models:lm_loss"],
}


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_cli_on_a_checkpoint(name, tmp_path, capsys):
    model, data, loss = _case(name)
    with torch.no_grad():  # a checkpoint that is not the factory's initialization
        for p in model.parameters():
            p.mul_(1.1)
    ckpt = tmp_path / "model.pt"
    torch.save({"model": model.state_dict(), "epoch": 3}, ckpt)
    spec = [*_SPECS[name], "--quiet"]
    with sdpa_kernel(SDPBackend.MATH):
        evals = torch.linalg.eigvalsh(dense_hessian(model, loss, data)).flip(0)
    out = tmp_path / "h.json"
    assert main(["hessian", str(ckpt), *spec, "--top-k", "2", "--json", str(out)]) == 0, \
        capsys.readouterr().err
    got = json.loads(out.read_text())
    text = json.dumps(got)
    top = [v for v in _find_list(got, "eigenvalues")]
    assert top, text[:500]
    np.testing.assert_allclose(top[:2], evals[:2].numpy(), rtol=2e-3)
    sj = tmp_path / "s.json"
    assert main(["sharpness", str(ckpt), *spec, "--json", str(sj)]) == 0, capsys.readouterr().err
    assert "worst" in sj.read_text()
    png = tmp_path / "slice.png"
    assert main(["slice", str(ckpt), *spec, "--steps", "3", "--out", str(png)]) == 0, \
        capsys.readouterr().err
    assert png.stat().st_size > 0


def _find_list(obj, key):
    """The first list stored under ``key`` anywhere in a JSON document."""
    if isinstance(obj, dict):
        if key in obj and isinstance(obj[key], list):
            return obj[key]
        for v in obj.values():
            r = _find_list(v, key)
            if r:
                return r
    if isinstance(obj, list):
        for v in obj:
            r = _find_list(v, key)
            if r:
                return r
    return []


# ------------------------------------------------------------------------------------------------
# the explicit workaround that works today
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [pytest.param(n, id=n) for n in ("vit", "gpt")])
def test_math_backend_workaround(name):
    """Inside ``sdpa_kernel(SDPBackend.MATH)`` the attention models' products are exact."""
    model, data, loss = _case(name)
    D = _dense(name)
    v = torch.randn(D.shape[0], generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        hv = (HessianOperator(model, loss, data) @ v.float()).double()
    ref = D @ v
    assert torch.allclose(hv, ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))


@pytest.mark.slow
def test_cli_report_on_resnet_checkpoints(tmp_path, capsys):
    """``landscape report`` on two ResNet checkpoints (BatchNorm buffers included): one HTML
    file whose headline lambda_max is the dense Hessian's."""
    model, data, loss = _case("resnet")
    torch.save(model.state_dict(), tmp_path / "a.pt")
    evals = torch.linalg.eigvalsh(_dense("resnet"))
    other, _, _ = _case("resnet", trained=False)
    torch.save(other.state_dict(), tmp_path / "b.pt")
    out, js = tmp_path / "r.html", tmp_path / "r.json"
    code = main(["report", str(tmp_path / "a.pt"), str(tmp_path / "b.pt"), *_SPECS["resnet"],
                 "--quiet", "--steps-1d", "3", "--steps-2d", "3", "--no-density", "--out", str(out),
                 "--json", str(js)])
    assert code == 0, capsys.readouterr().err
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>") or "<html" in html[:200]
    text = js.read_text()
    assert "a.pt" in text and "b.pt" in text
    lam = _find_number(json.loads(text), "lambda_max")
    assert lam == pytest.approx(float(evals[-1]), rel=2e-3)


def _find_number(obj, key):
    """The first number stored under ``key`` anywhere in a JSON document (``None`` if none)."""
    if isinstance(obj, dict):
        if isinstance(obj.get(key), (int, float)):
            return obj[key]
        children = obj.values()
    elif isinstance(obj, list):
        children = obj
    else:
        return None
    for v in children:
        r = _find_number(v, key)
        if r is not None:
            return r
    return None


def test_resnet_ggn_matches_dense_ggn():
    """The Gauss-Newton operator of the BatchNorm ResNet (eval mode) against the dense float64
    ``J^T H_out J``, and its top eigenvalue against the dense matrix's."""
    from analysis import GGNOperator
    from analysis.reference import dense_ggn

    model, data, _ = _case("resnet")
    G = dense_ggn(model, "cross_entropy", data)
    op = GGNOperator(model, "cross_entropy", data)
    v = torch.randn(G.shape[0], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = G @ v
    assert torch.allclose((op @ v.float()).double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
    top = top_eigenpairs(op, k=1, tol=1e-5).eigenvalues[0]
    assert float(top) == pytest.approx(float(torch.linalg.eigvalsh(G)[-1]), rel=1e-3)


# ------------------------------------------------------------------------------------------------
# Hugging Face without glue: ModelOutput, dict batches, the built-in LM losses
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (pip install .[huggingface])")
@pytest.mark.parametrize("loss", [pytest.param("lm", marks=pytest.mark.slow),  # dense: ~20 s
                                  "model_lm"])
def test_hf_gpt2_dict_batches_without_glue(loss):
    """The raw GPT2LMHeadModel on uneven, padded dict batches with ``--loss lm`` (shifted labels,
    attention mask) or ``model_lm`` (the model's own ``output.loss``) has the token-weighted
    Hessian of the hand-written glue (``model(ids).logits``, shifted targets, one batch)."""
    _case("hf_gpt2")  # trains and caches the weights
    model = A.hf_gpt2()
    model.load_state_dict({k[len("model."):]: v for k, v in _TRAINED["hf_gpt2"].items()})
    batches = A.hf_batches()
    ref = _dense("hf_gpt2")  # LogitsOf + lm_loss on (ids, next-token targets), one batch
    if loss == "lm":  # model_lm: HF computes its loss on float32 logits even for a float64 model
        D = dense_hessian(model, loss, batches)
        assert torch.allclose(D, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
    H = HessianOperator(model, loss, batches)
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    hv, want = (H @ v.float()).double(), ref @ v
    assert torch.allclose(hv, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
    top = top_eigenpairs(model, loss, batches, k=1, tol=1e-4)
    assert float(top.eigenvalues[0]) == pytest.approx(float(torch.linalg.eigvalsh(ref)[-1]), rel=2e-3)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed (pip install .[huggingface])")
def test_cli_hf_gpt2_with_lm_loss_on_dict_batches(tmp_path, capsys):
    """``landscape hessian --loss lm`` on a raw GPT2LMHeadModel checkpoint and dict batches."""
    _case("hf_gpt2")
    model = A.hf_gpt2()
    model.load_state_dict({k[len("model."):]: v for k, v in _TRAINED["hf_gpt2"].items()})
    ckpt = tmp_path / "gpt2.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "h.json"
    code = main(["hessian", str(ckpt), "--model", "tests.arch_models:hf_gpt2", "--data",
                 "tests.arch_models:hf_batches", "--loss", "lm", "--top-k", "1", "--quiet",
                 "--json", str(out)])
    assert code == 0, capsys.readouterr().err
    top = _find_list(json.loads(out.read_text()), "eigenvalues")
    assert top[0] == pytest.approx(float(torch.linalg.eigvalsh(_dense("hf_gpt2"))[-1]), rel=2e-3)


# ------------------------------------------------------------------------------------------------
# landscape.models.GPT on dict batches: its attention mask and its own loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["lm", "model_lm"])
def test_gpt_dict_batches_match_dense_hessian(loss):
    """The GPT called as ``model(**batch)`` on uneven padded dict batches (masked attention,
    ``-100`` labels; ``model_lm``: the model's own loss) has the dense Hessian of the pairs
    ``(ids, next-token targets)`` in one batch."""
    model, _, _ = _case("gpt")
    batches = A.hf_batches()
    ref = _dense("gpt")
    with sdpa_kernel(SDPBackend.MATH):
        D = dense_hessian(model, loss, batches)
    assert torch.allclose(D, ref, rtol=1e-5, atol=1e-7 * float(ref.abs().max()))
    H = HessianOperator(model, loss, batches)  # no kernel context: the library picks it
    v = torch.randn(ref.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    hv, want = (H @ v.float()).double(), ref @ v
    assert torch.allclose(hv, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()))
