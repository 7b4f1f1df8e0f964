"""per_layer_spectrum against the diagonal blocks of the dense float64 Hessian."""

from __future__ import annotations

import json

import pytest
import torch

from analysis import per_layer_spectrum
from analysis.reference import dense_hessian
from tests.models import classification_data, mlp


def _blocks(model):
    """Offsets of each module's own parameters in the flat (named_parameters) order."""
    out, off = {}, 0
    for name, p in model.named_parameters():
        mod = name.rsplit(".", 1)[0] if "." in name else ""
        a, b = out.get(mod, (off, off))
        out[mod] = (a, off + p.numel())
        off += p.numel()
    return out


def test_per_layer_matches_dense_blocks():
    model, data = mlp(), classification_data()
    H = dense_hessian(model, "cross_entropy", data)
    res = per_layer_spectrum(model, "cross_entropy", data, k=3, tol=1e-10)
    offsets = _blocks(model)
    assert res.names() == list(offsets)
    for layer in res.layers:
        a, b = offsets[layer.name]
        block = H[a:b, a:b]
        ev = torch.linalg.eigvalsh(block).flip(0)[:3]
        assert layer.num_params == b - a
        torch.testing.assert_close(torch.tensor(layer.eigenvalues, dtype=torch.float64), ev,
                                   rtol=1e-7, atol=1e-9)
        assert layer.trace == pytest.approx(float(block.trace()), rel=1e-8, abs=1e-10)
        assert layer.trace_std_error == 0.0  # small blocks: exact
    # the blocks' traces add up to the full trace
    assert sum(layer.trace for layer in res.layers) == pytest.approx(float(H.trace()), rel=1e-8)
    json.dumps(res.to_dict())


def test_per_layer_hutchpp_on_a_large_block_is_within_error():
    model, data = mlp(hidden=40), classification_data()
    H = dense_hessian(model, "cross_entropy", data)
    res = per_layer_spectrum(model, "cross_entropy", data, k=1, trace_matvecs=30, modules=["0"])
    n0 = model[0].weight.numel() + model[0].bias.numel()
    exact = float(H[:n0, :n0].trace())
    layer = res.layers[0]
    assert layer.trace_std_error > 0
    assert layer.trace_matvecs == 30  # Hutch++: 3 * (30 // 3)
    assert abs(layer.trace - exact) <= 5 * layer.trace_std_error + 1e-8


def test_per_layer_bad_input():
    model, data = mlp(), classification_data()
    with pytest.raises(ValueError, match="no module named 'nope'"):
        per_layer_spectrum(model, "cross_entropy", data, modules=["nope"])
    with pytest.raises(ValueError, match="k must be"):
        per_layer_spectrum(model, "cross_entropy", data, k=0)


def test_layer_plot_draws_one_bar_pair_per_layer(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from landscape import plot_layer_spectrum
    model, data = mlp(), classification_data()
    res = per_layer_spectrum(model, "cross_entropy", data, k=2)
    fig = plot_layer_spectrum(res, path=tmp_path / "layers.png")
    ax = fig.axes[0]
    heights = sorted(p.get_height() for p in ax.patches)
    expected = sorted([layer.eigenvalues[0] for layer in res.layers] +
                      [layer.trace for layer in res.layers])
    assert heights == pytest.approx(expected)
    assert (tmp_path / "layers.png").stat().st_size > 0
    with pytest.raises(TypeError, match="PerLayerSpectrum"):
        plot_layer_spectrum(object())


def test_cli_hessian_per_layer_matches_dense_blocks(tmp_path, capsys):
    # the `landscape hessian --per-layer` option (its fixtures are those of tests/landscape)
    import tests.landscape.cli_fixtures as fx
    from landscape.cli import main
    from tests.landscape.test_cli import SPEC64, _data, _model
    path = tmp_path / "a.pt"
    torch.save(fx.trained_state(20), path)
    code = main(["hessian", str(path), *SPEC64, "--top-k", "2", "--tol", "1e-9", "--trace",
                 "--per-layer", "--json", str(tmp_path / "h.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert "per-layer" in out
    doc = json.loads((tmp_path / "h.json").read_text())
    model = _model(path, torch.float64)
    H = dense_hessian(model, "cross_entropy", _data(torch.float64))
    offsets = _blocks(model)
    assert [layer["name"] for layer in doc["per_layer"]] == list(offsets)
    for layer in doc["per_layer"]:
        a, b = offsets[layer["name"]]
        ev = torch.linalg.eigvalsh(H[a:b, a:b]).flip(0)[:2]
        assert layer["eigenvalues"] == pytest.approx(ev.tolist(), rel=1e-6, abs=1e-8)
        assert layer["trace"] == pytest.approx(float(H[a:b, a:b].trace()), rel=1e-6, abs=1e-8)


def test_auto_is_timed_once_for_all_blocks(monkeypatch):
    """The product method is chosen on the whole model and passed on to every block."""
    import analysis.operators.hessian as hessian_ops

    calls = []
    real = hessian_ops.choose_method
    monkeypatch.setattr(hessian_ops, "choose_method",
                        lambda op, **kw: calls.append(op) or real(op, **kw))
    model = mlp()
    data = classification_data()
    res = per_layer_spectrum(model, "cross_entropy", data, k=1, batch_size=16, tol=1e-10)
    assert len(calls) == 1 and calls[0].shape[0] == sum(p.numel() for p in model.parameters())
    H = dense_hessian(model, "cross_entropy", data)
    top0 = float(torch.linalg.eigvalsh(H[:35, :35])[-1])  # block of layer "0": 6*5 + 5
    assert res.layers[0].eigenvalues[0] == pytest.approx(top0, rel=1e-6)


def test_products_used_are_reported_per_block_and_in_total():
    """Each block's Lanczos and trace counts add up to its operator's own product counter; the
    exact trace of a small block costs 2 n_l products (a budget of 3 n_l); the totals are sums."""
    model, data = mlp(), classification_data()
    res = per_layer_spectrum(model, "cross_entropy", data, k=1)
    for layer in res.layers:
        assert layer.eigen_matvecs >= 1
        assert layer.trace_matvecs == 2 * layer.num_params  # small blocks: exact
        assert layer.num_matvecs == layer.eigen_matvecs + layer.trace_matvecs
    assert res.num_matvecs == sum(x.num_matvecs for x in res.layers)
    assert res.eigen_matvecs == sum(x.eigen_matvecs for x in res.layers)
    assert res.trace_matvecs == sum(x.trace_matvecs for x in res.layers)
    assert res.to_dict()["trace_matvecs"] == res.trace_matvecs
    cheap = per_layer_spectrum(model, "cross_entropy", data, k=1, trace=False)
    assert cheap.trace_matvecs == 0
    assert cheap.num_matvecs == cheap.eigen_matvecs == res.eigen_matvecs  # same seeds
