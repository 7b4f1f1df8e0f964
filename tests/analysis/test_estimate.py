"""The peak-memory estimate before a run (:mod:`analysis.cost`, the product formula of
:mod:`analysis.operators.estimate`): its parts against hand counts, the command line's
``landscape estimate`` against the Python estimate, and the estimate against the measured peak
resident memory of a Lanczos run on a 4.2M-parameter MLP (within 25%; GPT-2 small is in
``benchmarks/llm_scale.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from analysis.cost import estimate_peak_bytes, planned_products, vectors_bytes
from analysis.operators.estimate import estimate_product_bytes, product_bytes
from landscape.cli import main
from tests.analysis.test_memory import PEAK_HELPERS
from tests.landscape import cli_fixtures as fx
from tests.models import classification_data, mlp


def test_the_parts_are_the_hand_counts():
    model, data = mlp(), classification_data()  # 53 float64 parameters, 48 samples
    n, s = 53, 8
    e = estimate_peak_bytes(model, "cross_entropy", data, method="finite-difference",
                            max_basis=4)
    # saved for backward: tanh's output (48 x 5), log-softmax (48 x 3), nll's total weight
    a = 48 * 5 * 8 + 48 * 3 * 8 + 8
    assert e.activation_bytes == a
    assert e.product_bytes == a + 3 * n * s
    assert e.vectors_bytes == (4 + 3) * n * s  # top_eigenpairs' documented bound
    assert e.peak_bytes == e.baseline_bytes + e.vectors_bytes + e.product_bytes
    assert e.products == min(max(300, 30), 10 * n) + 1 and not e.products_exact
    assert e.validated and e.to_dict()["method"] == "finite-difference"
    fwd = estimate_peak_bytes(model, "cross_entropy", data, method="forward-difference")
    assert fwd.product_bytes == a + 3 * n * s  # g(w) kept, the shifted copy, one gradient
    auto = estimate_peak_bytes(model, "cross_entropy", data, batch_size=16)
    # the cached graph of all 3 batches: 3 x (3 x the first batch's activations) > 2 A + 3 n s
    assert auto.method == "cached-graph" and auto.validated
    assert auto.product_bytes == 3 * 3 * auto.activation_bytes + 2 * n * s
    assert auto.vectors_bytes == (20 + 3) * n * s
    micro = estimate_product_bytes(model, "cross_entropy", data, microbatch_size=8)
    # microbatches: no cached graph; the larger of double backward and forward-over-reverse
    a8 = 8 * 8 * 8 + 8
    assert micro.activation_bytes == a8 and micro.chosen in ("double-backward",
                                                              "forward-over-reverse")
    assert micro.product_bytes == max(3 * a8 + 2 * n * s, 2 * a8 + 3 * n * s)
    trace = estimate_peak_bytes(model, "cross_entropy", data, analysis="trace", num_matvecs=30,
                                method="double-backward")
    assert trace.vectors_bytes == (10 + 4) * n * s and trace.products == 30 and trace.products_exact
    assert not trace.validated
    with pytest.raises(ValueError, match="analysis must be 'lanczos' or 'trace', got 'slq'"):
        estimate_peak_bytes(model, "cross_entropy", data, analysis="slq")
    with pytest.raises(ValueError, match="method must be 'auto' or one of .* got 'newton'"):
        estimate_product_bytes(model, "cross_entropy", data, method="newton")
    with pytest.raises(ValueError, match="got 'auto'"):
        product_bytes("auto", 1, 1, 4)


def test_the_formulas_of_the_half_precision_basis_and_the_small_trace():
    assert vectors_bytes("lanczos", 1000, 2, max_basis=4) == 7 * 1000 * 4  # a float32 basis
    assert vectors_bytes("lanczos", 10, 8, k=1) == (10 + 3) * 10 * 8  # max_basis <= n
    assert planned_products("trace", 5, num_matvecs=30) == (10, True)  # s = n: 2 n products
    assert planned_products("lanczos", 53, k=2, data_stderr=False) == (300, False)


def test_the_command_line_estimate_is_the_python_estimate(tmp_path, capsys):
    ckpt = tmp_path / "a.pt"
    torch.save(fx.trained_state(5), ckpt)
    spec = ["--model", "tests.landscape.cli_fixtures:model",
            "--data", "tests.landscape.cli_fixtures:data"]
    out = tmp_path / "e.json"
    code = main(["estimate", str(ckpt), *spec, "--top-k", "2", "--max-basis", "6",
                 "--method", "forward-difference", "--json", str(out)])
    text, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out.read_text())
    model = fx.model()
    model.load_state_dict(torch.load(ckpt, weights_only=True))
    ref = estimate_peak_bytes(model, "cross_entropy", fx.data(), k=2, max_basis=6,
                              method="forward-difference")
    for key in ("vectors_bytes", "product_bytes", "activation_bytes", "method", "products",
                "products_exact", "num_params", "validated"):
        assert doc[key] == ref.to_dict()[key], key
    assert doc["schema"] == "landscape.estimate/1" and doc["available_bytes"] > 0
    assert "Hessian-vector products: <= " in text and "peak resident memory" in text
    code = main(["estimate", str(ckpt), *spec, "--analysis", "trace", "--num-matvecs", "30",
                 "--json", "-"])
    text, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(text)
    ref = estimate_peak_bytes(model, "cross_entropy", fx.data(), analysis="trace",
                              num_matvecs=30)
    assert (doc["products"], doc["vectors_bytes"], doc["product_bytes"], doc["method"]) == (
        ref.products, ref.vectors_bytes, ref.product_bytes, ref.method)


_SCRIPT = PEAK_HELPERS + textwrap.dedent("""
    import json, sys
    import torch
    from analysis.cost import estimate_peak_bytes
    from analysis.lanczos import top_eigenpairs

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 4096), torch.nn.Tanh(),
                                torch.nn.Linear(4096, 512)).eval()
    x, y = torch.randn(64, 512), torch.randint(0, 512, (64,))
    method = sys.argv[1]
    est = estimate_peak_bytes(model, "cross_entropy", (x, y), max_basis=4, method=method)
    reset()
    base = peak()
    res = top_eigenpairs(model, "cross_entropy", (x, y), k=1, tol=1e-8, max_basis=4,
                         max_iter=12, method=method, data_stderr=False)
    print(json.dumps({"peak": peak(), "growth": peak() - base, "est": est.peak_bytes,
                      "extra": est.extra_bytes, "matvecs": res.num_matvecs}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
@pytest.mark.parametrize("method", ["forward-difference", "finite-difference"])
def test_the_estimate_is_within_25_percent_of_the_measured_peak(method):
    """4.2M float32 parameters (17 MB a vector): Lanczos with ``max_basis=4`` fills its basis
    (thick restarts) and the peak is ``(4 + 3)`` vectors plus one product over the process's
    resident memory; both the peak and its growth over the baseline are within 25%."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "1048576"}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, method], capture_output=True,
                          text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["matvecs"] == 12
    assert abs(out["est"] / out["peak"] - 1) <= 0.25, out
    assert abs(out["extra"] / out["growth"] - 1) <= 0.25, out
